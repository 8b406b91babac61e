//! Human output of `hastctl status`, `list` and `dump`, in the original's
//! `field: value` form.

use std::fmt::Write as _;

use hast_datapath::metadata::Metadata;

use console::Style;

use crate::proto::{ReloadReport, ResourceReport, VerifyState, VerifySummary};
use crate::size::with_human;

/// `hastctl status`: the terse table.
pub fn status_table(resources: &[ResourceReport]) -> String {
    status_table_styled(resources, false)
}

/// The status table, with the Status column coloured when `colour` is set
/// (complete green, degraded red, errors red): only for a terminal.
pub fn status_table_styled(resources: &[ResourceReport], colour: bool) -> String {
    let paint = |style: Style, text: String| {
        if colour {
            style.force_styling(true).apply_to(text).to_string()
        } else {
            text
        }
    };
    let mut out = String::new();
    if resources.is_empty() {
        return out;
    }
    out.push_str("Name\tStatus\t Role\t\tComponents\n");
    for r in resources {
        let _ = write!(out, "{}\t", r.name);
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "{}",
                paint(Style::new().red().bold(), format!("ERROR {e}"))
            );
            continue;
        }
        let status = r.status.as_deref().unwrap_or("-");
        let style = match status {
            "complete" => Style::new().green(),
            "degraded" => Style::new().red(),
            _ => Style::new(),
        };
        let _ = writeln!(
            out,
            "{}{:<15}{}\t{}",
            paint(style, format!("{status:<9}")),
            r.role,
            r.localpath,
            r.remoteaddr
        );
    }
    out
}

/// `hastctl reload`: what changed, one line per setting and resource.
pub fn reload(report: &ReloadReport) -> String {
    let mut out = format!("reloaded {}\n", report.config);
    for s in &report.settings {
        let when = if s.applied {
            ""
        } else {
            " (at the next start of hastd)"
        };
        let _ = writeln!(out, "  {}: {} -> {}{when}", s.setting, s.old, s.new);
    }
    for r in &report.resources {
        let why = if r.changed.is_empty() {
            String::new()
        } else {
            format!(" ({} changed)", r.changed.join(", "))
        };
        let what = match r.action.as_str() {
            "added" => "added in role init".to_string(),
            "removed" => format!("removed (was {})", r.role),
            "stored" => "role init: used from the next role change".to_string(),
            "restarted" => format!("restarted as {}", r.role),
            "live" => format!("applied to the running {}", r.role),
            "unchanged" => "unchanged".to_string(),
            other => other.to_string(),
        };
        let _ = write!(out, "  {}: {what}{why}", r.name);
        match &r.error {
            Some(e) => {
                let _ = writeln!(out, ": FAILED: {e}");
            }
            None => out.push('\n'),
        }
    }
    out
}

/// `hastctl list`: every field, one per line.
pub fn list(resources: &[ResourceReport]) -> String {
    let mut out = String::new();
    for r in resources {
        let _ = writeln!(out, "{}:", r.name);
        if let Some(e) = &r.error {
            let _ = writeln!(out, "  error: {e}");
            continue;
        }
        let _ = writeln!(out, "  role: {}", r.role);
        let _ = writeln!(out, "  provname: {}", r.provname);
        let _ = writeln!(out, "  localpath: {}", r.localpath);
        let _ = writeln!(out, "  extentsize: {}", with_human(r.extentsize));
        let _ = writeln!(out, "  keepdirty: {}", r.keepdirty);
        let _ = writeln!(out, "  remoteaddr: {}", r.remoteaddr);
        if let Some(s) = &r.sourceaddr {
            let _ = writeln!(out, "  sourceaddr: {s}");
        }
        let _ = writeln!(out, "  replication: {}", r.replication);
        if !r.compression.is_empty() {
            let _ = writeln!(out, "  compression: {}", r.compression);
        }
        if !r.syncmode.is_empty() {
            let _ = writeln!(out, "  syncmode: {}", r.syncmode);
        }
        if let Some(s) = &r.status {
            let _ = writeln!(out, "  status: {s}");
        }
        if r.workerpid != 0 {
            let _ = writeln!(out, "  workerpid: {}", r.workerpid);
        }
        let _ = writeln!(out, "  dirty: {}", with_human(r.dirty));
        if let Some(sy) = &r.sync {
            let pct = (sy.done * 100).checked_div(sy.total).unwrap_or(100);
            let eta = sy
                .eta_seconds
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "unknown".into());
            let _ = writeln!(
                out,
                "  sync: {}, {} of {} ({pct}%), {}/s, eta {eta}",
                sy.direction,
                crate::size::humanize(sy.done),
                crate::size::humanize(sy.total),
                crate::size::humanize(sy.rate)
            );
        }
        if let Some(v) = &r.verify {
            verify_lines(&mut out, v);
        }
        if r.split_brain {
            let _ = writeln!(out, "  split-brain: yes");
        }
        if r.out_of_date {
            let _ = writeln!(
                out,
                "  warning: this node's data is out of date: extents not copied from the \
                 secondary yet are read from it{}",
                if r.connected {
                    ""
                } else {
                    ", and fail while it is not connected"
                }
            );
        }
        if let Some(d) = &r.disk {
            match &r.disk_error {
                Some(why) => {
                    let _ = writeln!(out, "  disk: {d} ({why})");
                }
                None => {
                    let _ = writeln!(out, "  disk: {d}");
                }
            }
        }
        if let Some(d) = &r.peer_disk {
            let _ = writeln!(out, "  peer disk: {d}");
        }
        if let Some(w) = only_copy_warning(r) {
            let _ = writeln!(out, "  warning: {w}");
        }
        if r.auth_failures != 0 {
            let _ = writeln!(out, "  authentication failures: {}", r.auth_failures);
        }
        if let Some(e) = &r.last_error {
            let _ = writeln!(out, "  last error: {e}");
        }
        if r.datasize != 0 {
            let _ = writeln!(out, "  datasize: {}", with_human(r.datasize));
        }
        if let Some(e) = &r.export {
            let _ = writeln!(out, "  export: {e}");
            let _ = writeln!(out, "  clients: {}", r.clients);
        }
        let s = &r.statistics;
        let _ = writeln!(out, "  statistics:");
        let _ = writeln!(out, "    reads: {}", s.reads);
        let _ = writeln!(out, "    writes: {}", s.writes);
        let _ = writeln!(out, "    deletes: {}", s.deletes);
        let _ = writeln!(out, "    flushes: {}", s.flushes);
        let _ = writeln!(out, "    activemap updates: {}", s.activemap_updates);
        let _ = writeln!(out, "    reads served by the peer: {}", r.reads_from_peer);
        let e = &r.local_errors;
        let _ = writeln!(
            out,
            "    local errors: read: {}, write: {}, delete: {}, flush: {}",
            e.read, e.write, e.delete, e.flush
        );
        let q = &r.queues;
        let _ = writeln!(
            out,
            "    queues: local: {}, send: {}, recv: {}, done: {}, idle: {}",
            q.local, q.send, q.recv, q.done, q.idle
        );
    }
    out
}

/// When one node holds the only copy of the data because a disk failed,
/// `hastctl list` says so (the data is never on one disk silently).
pub fn only_copy_warning(r: &ResourceReport) -> Option<&'static str> {
    let failed = |d: &Option<String>| d.as_deref() == Some("failed");
    match (r.role.as_str(), failed(&r.disk), failed(&r.peer_disk)) {
        (_, true, true) => Some("both disks failed: no copy of the data is being served"),
        ("primary", true, _) => Some(
            "this node's disk failed: reads and writes go to the secondary, which holds the only copy",
        ),
        ("primary", false, true) => {
            Some("the secondary's disk failed: this node holds the only copy")
        }
        ("secondary", false, true) => {
            Some("the primary's disk failed: this node holds the only copy of the data")
        }
        _ => None,
    }
}

/// Ranges of a verify shown in `hastctl list` (the JSON has up to 256).
pub const LIST_RANGES: usize = 8;

/// The `verify:` lines of `hastctl list`.
fn verify_lines(out: &mut String, v: &VerifySummary) {
    use crate::size::humanize;
    let r = &v.report;
    let state = match r.state {
        VerifyState::Running => "running",
        VerifyState::Done => "done",
        VerifyState::Failed => "failed",
    };
    let pct = (r.done * 100).checked_div(r.length).unwrap_or(100);
    let mut head = format!(
        "  verify: {state} ({}{}), {} of {} ({pct}%), {}/s",
        r.algorithm,
        if r.repair { ", repair" } else { "" },
        humanize(r.done),
        humanize(r.length),
        humanize(v.rate)
    );
    if let Some(eta) = v.eta_seconds {
        let _ = write!(head, ", eta {eta}s");
    }
    let _ = writeln!(out, "{head}");
    let _ = writeln!(
        out,
        "    blocks compared: {}, different: {} ({}) in {} ranges, skipped: {}",
        r.blocks_compared,
        r.blocks_different,
        humanize(r.bytes_different),
        r.ranges_total,
        humanize(r.bytes_skipped)
    );
    if !r.ranges.is_empty() {
        let shown: Vec<String> = r
            .ranges
            .iter()
            .take(LIST_RANGES)
            .map(|(o, l)| format!("{o}+{l}"))
            .collect();
        let more = if r.ranges_total as usize > shown.len() {
            format!(" (and {} more)", r.ranges_total as usize - shown.len())
        } else {
            String::new()
        };
        let _ = writeln!(out, "    differ at: {}{more}", shown.join(", "));
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "    error: {e}");
    }
}

/// `hastctl dump`: the metadata read from disk, plus what the on-disk
/// activemap marks (the extents a restart would resynchronise).
pub fn dump(md: &Metadata, ondisk_extents: u64, written: Option<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "resource: {}", md.resource);
    let _ = writeln!(out, "    datasize: {}", with_human(md.datasize));
    let _ = writeln!(
        out,
        "    extentsize: {}",
        with_human(u64::from(md.extentsize))
    );
    let _ = writeln!(out, "    keepdirty: {}", md.keepdirty);
    let _ = writeln!(out, "    localoff: {}", md.localoff);
    let _ = writeln!(out, "    resuid: {}", md.resuid);
    let _ = writeln!(out, "    localcnt: {}", md.localcnt);
    let _ = writeln!(out, "    remotecnt: {}", md.remotecnt);
    let _ = writeln!(out, "    prevrole: {}", md.prevrole);
    let bytes = (ondisk_extents * u64::from(md.extentsize)).min(md.datasize);
    let _ = writeln!(
        out,
        "    dirty: {ondisk_extents} extents, {}",
        with_human(bytes)
    );
    match written {
        Some(w) => {
            let bytes = (w * u64::from(md.extentsize)).min(md.datasize);
            let _ = writeln!(out, "    written: {w} extents, {}", with_human(bytes));
        }
        None => {
            let _ = writeln!(out, "    written: all (format 1 metadata: no written map)");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ResourceReport {
        ResourceReport {
            name: "disk1".into(),
            role: "primary".into(),
            provname: "disk1".into(),
            localpath: "/tmp/d1.img".into(),
            extentsize: 2 << 20,
            keepdirty: 64,
            remoteaddr: "none".into(),
            replication: "memsync".into(),
            status: Some("degraded".into()),
            workerpid: 42,
            dirty: 4 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn list_has_the_original_fields() {
        let text = list(&[sample()]);
        for line in [
            "disk1:",
            "  role: primary",
            "  extentsize: 2097152 (2.0MB)",
            "  status: degraded",
            "  dirty: 4194304 (4.0MB)",
            "    activemap updates: 0",
            "    local errors: read: 0, write: 0, delete: 0, flush: 0",
            "    queues: local: 0, send: 0, recv: 0, done: 0, idle: 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn status_colours_only_when_asked() {
        let plain = status_table_styled(&[sample()], false);
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        let coloured = status_table_styled(&[sample()], true);
        assert!(
            coloured.contains("\u{1b}[31mdegraded \u{1b}[0m"),
            "{coloured:?}"
        );
    }

    #[test]
    fn status_table_columns() {
        let text = status_table(&[sample()]);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("Name\tStatus\t Role\t\tComponents"));
        assert_eq!(
            lines.next(),
            Some("disk1\tdegraded primary        /tmp/d1.img\tnone")
        );
    }
}
