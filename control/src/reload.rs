//! What a configuration reload changes: the difference between the
//! running configuration and the file read again, as a plan hastd then
//! carries out (pure: no I/O, unit-tested).
//!
//! The rules (the original's, docs/hast.conf.md "Reloading"):
//! - `control`, `listen` and `metrics` are rebound together or not at all;
//! - a resource gone from the file is set to init and dropped, a new one is
//!   added in role init;
//! - a change of `local`, of the device name (`name`) or of where its
//!   export lives (`exportdir`) restarts the resource in its role;
//! - any other change (remote, source, secret, tls, replication, checksum, compression,
//!   timeout, exec, metaflush, splitbrain) restarts a secondary, is stored
//!   for the next role change in role init, and is applied to a running
//!   primary without a restart.
//!
//! extentsize and keepdirty are not in hast.conf: they are written into
//! the metadata by `hastctl create` and no reload changes them.

use hast_datapath::node::SpecChange;

use crate::config::{Config, ResourceConfig};
use crate::proto::SettingChange;

/// What a reload will do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Node-wide settings that changed.
    pub settings: Vec<SettingChange>,
    /// Resources of the old file missing from the new one.
    pub removed: Vec<String>,
    /// Resources new in the file.
    pub added: Vec<String>,
    /// Resources in both whose settings differ.
    pub changed: Vec<ResourceDiff>,
    /// Resources in both with nothing changed.
    pub unchanged: Vec<String>,
}

/// How one resource's settings differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDiff {
    /// Resource name.
    pub name: String,
    /// The statements whose value changed, as written in hast.conf.
    pub fields: Vec<&'static str>,
    /// What kind of restart or live change that means.
    pub change: SpecChange,
}

impl Plan {
    /// The setting named `setting` changed.
    pub fn setting(&self, setting: &str) -> Option<&SettingChange> {
        self.settings.iter().find(|s| s.setting == setting)
    }

    /// Nothing at all changed.
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty()
            && self.removed.is_empty()
            && self.added.is_empty()
            && self.changed.is_empty()
    }
}

/// The plan that turns `old` into `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan {
        settings: settings(old, new),
        ..Default::default()
    };
    for r in &old.resources {
        match new.resource(&r.name) {
            None => p.removed.push(r.name.clone()),
            Some(n) => {
                let diff = diff_resource(old, r, new, n);
                if diff.fields.is_empty() {
                    p.unchanged.push(r.name.clone());
                } else {
                    p.changed.push(diff);
                }
            }
        }
    }
    p.added = new
        .resources
        .iter()
        .filter(|r| old.resource(&r.name).is_none())
        .map(|r| r.name.clone())
        .collect();
    p
}

fn settings(old: &Config, new: &Config) -> Vec<SettingChange> {
    let list = |c: &Config| {
        c.listen
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let metrics = |c: &Config| {
        c.metrics
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "none".into())
    };
    let pairs = [
        (
            "control",
            old.control.display().to_string(),
            new.control.display().to_string(),
            true,
        ),
        ("listen", list(old), list(new), true),
        ("metrics", metrics(old), metrics(new), true),
        (
            "exportdir",
            old.exportdir.display().to_string(),
            new.exportdir.display().to_string(),
            true,
        ),
        (
            "pidfile",
            old.pidfile.display().to_string(),
            new.pidfile.display().to_string(),
            false,
        ),
    ];
    pairs
        .into_iter()
        .filter(|(_, o, n, _)| o != n)
        .map(|(setting, old, new, applied)| SettingChange {
            setting: setting.into(),
            old,
            new,
            applied,
        })
        .collect()
}

/// The statements of a resource whose value differs, and what that means.
fn diff_resource(
    old_cfg: &Config,
    old: &ResourceConfig,
    new_cfg: &Config,
    new: &ResourceConfig,
) -> ResourceDiff {
    let mut fields = Vec::new();
    let mut change = SpecChange::default();
    let mut note = |field: &'static str, differs: bool, flag: &mut bool| {
        if differs {
            fields.push(field);
            *flag = true;
        }
    };
    let (mut provider, mut peer, mut other) = (false, false, false);
    note("local", old.localpath != new.localpath, &mut provider);
    note("name", old.provname != new.provname, &mut provider);
    note(
        "exportdir",
        old_cfg.exportdir != new_cfg.exportdir,
        &mut provider,
    );
    note("remote", old.remote != new.remote, &mut peer);
    note("source", old.source != new.source, &mut peer);
    note("secret", old.secret != new.secret, &mut peer);
    note("tls", old.tls != new.tls, &mut peer);
    note(
        "replication",
        old.replication != new.replication,
        &mut other,
    );
    note("checksum", old.checksum != new.checksum, &mut other);
    note(
        "compression",
        old.compression != new.compression,
        &mut other,
    );
    note("syncmode", old.syncmode != new.syncmode, &mut other);
    note("timeout", old.timeout != new.timeout, &mut other);
    note("exec", old.exec != new.exec, &mut other);
    note("metaflush", old.metaflush != new.metaflush, &mut other);
    note("splitbrain", old.splitbrain != new.splitbrain, &mut other);
    note("on", old.node_name != new.node_name, &mut other);
    (change.provider, change.peer, change.other) = (provider, peer, other);
    ResourceDiff {
        name: new.name.clone(),
        fields,
        change,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{parse_str, NodeIdentity};

    fn conf(text: &str) -> Config {
        parse_str(text, Path::new("hast.conf"), &NodeIdentity::named("a")).unwrap()
    }

    const BASE: &str = "control uds:///run/c\nlisten 127.0.0.1\n\
        resource r1 { on a { local /d/1 remote 10.0.0.2 } }\n\
        resource r2 { timeout 5 on a { local /d/2 remote none } }\n";

    #[test]
    fn identical_files_change_nothing() {
        let p = plan(&conf(BASE), &conf(BASE));
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.unchanged, ["r1", "r2"]);
    }

    #[test]
    fn added_and_removed_resources() {
        let new = BASE.replace("resource r2", "resource r3");
        let p = plan(&conf(BASE), &conf(&new));
        assert_eq!(p.removed, ["r2"]);
        assert_eq!(p.added, ["r3"]);
        assert_eq!(p.unchanged, ["r1"]);
    }

    #[test]
    fn provider_changes_restart_and_others_do_not() {
        let new = BASE
            .replace("/d/1", "/d/1b")
            .replace("timeout 5", "timeout 6 replication async");
        let p = plan(&conf(BASE), &conf(&new));
        assert_eq!(p.changed.len(), 2);
        let r1 = &p.changed[0];
        assert_eq!((r1.name.as_str(), r1.fields.clone()), ("r1", vec!["local"]));
        assert!(r1.change.provider && !r1.change.peer && !r1.change.other);
        let r2 = &p.changed[1];
        assert_eq!(r2.fields, ["replication", "timeout"]);
        assert!(!r2.change.provider && !r2.change.peer && r2.change.other);
    }

    #[test]
    fn peer_address_changes() {
        let new = BASE.replace("remote 10.0.0.2", "remote 10.0.0.3 source 10.0.0.1");
        let p = plan(&conf(BASE), &conf(&new));
        assert_eq!(p.changed[0].fields, ["remote", "source"]);
        assert!(p.changed[0].change.peer && !p.changed[0].change.provider);
    }

    #[test]
    fn node_wide_settings() {
        let new = BASE.replace("uds:///run/c", "uds:///run/d").replace(
            "listen 127.0.0.1",
            "listen 127.0.0.2\nmetrics listen 127.0.0.1\nexportdir /x",
        );
        let p = plan(&conf(BASE), &conf(&new));
        let names: Vec<&str> = p.settings.iter().map(|s| s.setting.as_str()).collect();
        assert_eq!(names, ["control", "listen", "metrics", "exportdir"]);
        assert_eq!(
            p.setting("metrics").map(|s| s.new.as_str()),
            Some("tcp4://127.0.0.1:9942")
        );
        // A new export directory moves every export: each resource restarts.
        assert!(p
            .changed
            .iter()
            .all(|d| d.change.provider && d.fields == ["exportdir"]));
    }
}
