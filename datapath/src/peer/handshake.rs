//! The handshake's decisions, on both sides (pure: no I/O).
//!
//! The primary sends a [`Hello`] built by [`primary_hello`]; the
//! secondary checks it with [`secondary_decide`] and answers with a
//! [`HelloReply`] built by [`secondary_reply`]; the primary reads the
//! answer with [`primary_decide`]. Both sides reach the same
//! [`Decision`] from the same counters (see `docs/protocol.md`, "The
//! synchronisation decision"); the side effects (adopting the resource
//! ID, events, logs) stay with the callers.

use super::proto::{
    hello_flags, negotiate, Hello, HelloReply, Refusal, PROTO_VERSION, PROTO_VERSION_MIN,
};
use crate::generation::{decide, explain_inconsistent, resolve_split_brain, Decision, Gen};
use crate::metadata::{Metadata, FLAG_DISCARD, FLAG_INCONSISTENT};

/// The generation counters of a provider's metadata.
pub fn gen_of(md: &Metadata) -> Gen {
    Gen {
        resuid: md.resuid,
        localcnt: md.localcnt,
        remotecnt: md.remotecnt,
    }
}

/// Was the primary never written (the `p_virgin` of
/// [`decide`](crate::generation::decide))? Generation 0, nothing dirty,
/// and not the destination of an unfinished synchronisation.
pub fn is_virgin(md: &Metadata, dirty: bool) -> bool {
    md.localcnt == 0 && md.remotecnt == 0 && !dirty && md.flags & FLAG_INCONSISTENT == 0
}

/// The wire flags describing a node's state (the metadata flags are not
/// sent as they are: each wire bit is set from its own condition).
fn state_flags(md: &Metadata, dirty: bool) -> u64 {
    let mut f = 0;
    if md.flags & FLAG_INCONSISTENT != 0 {
        f |= hello_flags::INCONSISTENT;
    }
    if !dirty {
        f |= hello_flags::CLEAN;
    }
    f
}

/// The primary's Hello. `dirty`: some extent needs synchronisation.
pub fn primary_hello(resource: &str, node: &str, md: &Metadata, dirty: bool) -> Hello {
    let mut flags = state_flags(md, dirty);
    if is_virgin(md, dirty) {
        flags |= hello_flags::VIRGIN;
    }
    Hello {
        version_min: PROTO_VERSION_MIN,
        version_max: PROTO_VERSION,
        resource: resource.to_owned(),
        node: node.to_owned(),
        datasize: md.datasize,
        extentsize: md.extentsize,
        gen: gen_of(md),
        flags,
    }
}

/// What a side concluded from an accepted handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The decision both sides reach.
    pub decision: Decision,
    /// A split-brain was resolved by policy (`splitbrain auto`, or the
    /// secondary's discard flag): only the extents either side changed
    /// are resynchronised, and no generation moves backwards.
    pub resolved_split: bool,
    /// The negotiated protocol version.
    pub version: u16,
}

/// Why a handshake was refused, for the wire and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Machine-readable reason.
    pub reason: Refusal,
    /// The explanation.
    pub message: String,
}

fn refuse(reason: Refusal, message: String) -> Refused {
    Refused { reason, message }
}

/// The refusal of the decisions that cannot synchronise, or `Ok`.
fn accept(decision: Decision, p: &Gen, s: &Gen) -> Result<Decision, Refused> {
    match decision {
        Decision::SplitBrain => Err(refuse(
            Refusal::SplitBrain,
            format!(
                "split-brain: both nodes wrote since they last agreed (primary {p}, secondary {s})"
            ),
        )),
        Decision::ResuidMismatch => Err(refuse(
            Refusal::ResuidMismatch,
            format!(
                "resource unique ID mismatch (primary {:#x}, secondary {:#x})",
                p.resuid, s.resuid
            ),
        )),
        Decision::Inconsistent => Err(refuse(
            Refusal::InconsistentCounters,
            explain_inconsistent(p, s),
        )),
        d => Ok(d),
    }
}

/// The secondary's check of a Hello against its own metadata. `dirty`:
/// some extent of the secondary needs synchronisation; `splitbrain_auto`:
/// the `splitbrain auto` policy.
pub fn secondary_decide(
    hello: &Hello,
    md: &Metadata,
    dirty: bool,
    splitbrain_auto: bool,
) -> Result<Agreement, Refused> {
    let Some(version) = negotiate(
        PROTO_VERSION_MIN,
        PROTO_VERSION,
        hello.version_min,
        hello.version_max,
    ) else {
        return Err(refuse(
            Refusal::VersionUnsupported,
            format!(
                "no common protocol version (ours {PROTO_VERSION_MIN}..={PROTO_VERSION}, theirs {}..={})",
                hello.version_min, hello.version_max
            ),
        ));
    };
    if hello.datasize != md.datasize || hello.extentsize != md.extentsize {
        return Err(refuse(
            Refusal::GeometryMismatch,
            format!(
                "data size/extent size differ: primary {}/{}, secondary {}/{} (run 'hastctl create' with the same -e/-m on both nodes)",
                hello.datasize, hello.extentsize, md.datasize, md.extentsize
            ),
        ));
    }
    let mine = gen_of(md);
    let raw = decide(
        &hello.gen,
        &mine,
        hello.flags & hello_flags::VIRGIN != 0,
        md.flags & FLAG_INCONSISTENT != 0,
    );
    let decision = resolve_split_brain(
        raw,
        md.flags & FLAG_DISCARD != 0,
        splitbrain_auto,
        hello.flags & hello_flags::CLEAN == 0,
        dirty,
    );
    Ok(Agreement {
        decision: accept(decision, &hello.gen, &mine)?,
        resolved_split: raw == Decision::SplitBrain && decision != Decision::SplitBrain,
        version,
    })
}

/// The secondary's answer: its geometry, counters (as before any resource
/// ID adoption, so that both sides decide alike), state flags, and — when
/// accepted — its dirty bitmap.
pub fn secondary_reply(
    md: &Metadata,
    dirty: bool,
    outcome: &Result<Agreement, Refused>,
    bitmap: Vec<u8>,
) -> HelloReply {
    let mut flags = state_flags(md, dirty);
    if md.flags & FLAG_DISCARD != 0 {
        flags |= hello_flags::DISCARD;
    }
    let (version, refusal, message, bitmap) = match outcome {
        Ok(a) => (a.version, None, String::new(), bitmap),
        Err(r) => (PROTO_VERSION, Some(r.reason), r.message.clone(), Vec::new()),
    };
    HelloReply {
        version,
        refusal,
        message,
        datasize: md.datasize,
        extentsize: md.extentsize,
        gen: gen_of(md),
        flags,
        bitmap,
    }
}

/// The primary's reading of the secondary's accepted reply (a refusal in
/// the reply is the caller's to report). `dirty`: some extent of the
/// primary needs synchronisation.
pub fn primary_decide(
    hello: &Hello,
    reply: &HelloReply,
    dirty: bool,
    splitbrain_auto: bool,
) -> Result<Agreement, Refused> {
    let raw = decide(
        &hello.gen,
        &reply.gen,
        hello.flags & hello_flags::VIRGIN != 0,
        reply.flags & hello_flags::INCONSISTENT != 0,
    );
    let decision = resolve_split_brain(
        raw,
        reply.flags & hello_flags::DISCARD != 0,
        splitbrain_auto,
        dirty,
        reply.flags & hello_flags::CLEAN == 0,
    );
    Ok(Agreement {
        decision: accept(decision, &hello.gen, &reply.gen)?,
        resolved_split: raw == Decision::SplitBrain && decision != Decision::SplitBrain,
        version: reply.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::Role;

    fn md(resuid: u64, localcnt: u64, remotecnt: u64) -> Metadata {
        let mut m = Metadata::new("r0", 64 << 20, 2 << 20, 64, 512).expect("metadata");
        m.resuid = resuid;
        m.localcnt = localcnt;
        m.remotecnt = remotecnt;
        m.prevrole = Role::Secondary;
        m
    }

    /// Runs both sides and checks they agree.
    fn both(
        p: &Metadata,
        p_dirty: bool,
        s: &Metadata,
        s_dirty: bool,
    ) -> Result<Agreement, Refused> {
        let hello = primary_hello("r0", "a", p, p_dirty);
        let sec = secondary_decide(&hello, s, s_dirty, false);
        let reply = secondary_reply(s, s_dirty, &sec, vec![0; 1]);
        if sec.is_err() {
            assert!(reply.refusal.is_some());
            return sec;
        }
        let pri = primary_decide(&hello, &reply, p_dirty, false);
        assert_eq!(pri, sec, "both sides decide alike");
        pri
    }

    #[test]
    fn both_sides_agree() {
        let d = both(&md(7, 3, 3), false, &md(7, 3, 3), false).unwrap();
        assert_eq!(d.decision, Decision::InSync);
        let d = both(&md(7, 4, 3), true, &md(7, 3, 3), false).unwrap();
        assert_eq!(d.decision, Decision::ToSecondary { full: false });
        let d = both(&md(7, 3, 3), false, &md(0, 0, 0), false).unwrap();
        assert_eq!(d.decision, Decision::ToSecondary { full: true });
        let e = both(&md(7, 4, 3), true, &md(7, 4, 3), true).unwrap_err();
        assert_eq!(e.reason, Refusal::SplitBrain);
        let e = both(&md(7, 3, 3), false, &md(8, 3, 3), false).unwrap_err();
        assert_eq!(e.reason, Refusal::ResuidMismatch);
    }

    #[test]
    fn wire_flags_come_from_their_own_conditions() {
        let mut m = md(7, 3, 3);
        m.flags = FLAG_INCONSISTENT | FLAG_DISCARD;
        let h = primary_hello("r0", "a", &m, true);
        assert_eq!(h.flags, hello_flags::INCONSISTENT);
        let h = primary_hello("r0", "a", &md(0, 0, 0), false);
        assert_eq!(h.flags, hello_flags::VIRGIN | hello_flags::CLEAN);
        let ok = Ok(Agreement {
            decision: Decision::InSync,
            resolved_split: false,
            version: PROTO_VERSION,
        });
        let r = secondary_reply(&m, false, &ok, vec![1]);
        assert_eq!(
            r.flags,
            hello_flags::INCONSISTENT | hello_flags::DISCARD | hello_flags::CLEAN
        );
        assert_eq!(r.bitmap, vec![1]);
    }

    #[test]
    fn geometry_and_version_are_checked_first() {
        let p = md(7, 3, 3);
        let mut hello = primary_hello("r0", "a", &p, false);
        hello.datasize += 512;
        let e = secondary_decide(&hello, &md(7, 3, 3), false, false).unwrap_err();
        assert_eq!(e.reason, Refusal::GeometryMismatch);
        let mut hello = primary_hello("r0", "a", &p, false);
        hello.version_min = PROTO_VERSION + 1;
        hello.version_max = PROTO_VERSION + 1;
        let e = secondary_decide(&hello, &md(7, 3, 3), false, false).unwrap_err();
        assert_eq!(e.reason, Refusal::VersionUnsupported);
    }
}
