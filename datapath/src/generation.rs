//! Generation counters and the synchronisation decision (pure: no I/O).
//!
//! Each node stores, per resource, three numbers in its metadata block:
//!
//! - `resuid`: a random identifier of the resource instance, 0 while the
//!   provider has never been used;
//! - `localcnt`: the generation of this node's data;
//! - `remotecnt`: the generation of the peer's data when the two nodes last
//!   agreed (completed a synchronisation).
//!
//! While both nodes are connected and in sync all four counters are equal.
//! A primary that writes while disconnected bumps its `localcnt` once per
//! disconnected epoch ([`bump_on_disconnected_write`]), so `localcnt >
//! remotecnt` means "this node has writes its peer lacks". At connection the
//! primary compares both nodes' counters with [`decide`], which picks the
//! synchronisation direction or refuses (split brain, foreign or damaged
//! counters). Once a synchronisation completes both nodes set `localcnt`
//! and `remotecnt` to [`target_generation`].
//!
//! See `docs/protocol.md` for the decision table.

use std::fmt;

/// The generation counters of one node for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Gen {
    /// Random resource identifier; 0 while the provider was never used.
    pub resuid: u64,
    /// Generation of this node's data.
    pub localcnt: u64,
    /// Generation of the peer's data when the two nodes last agreed.
    pub remotecnt: u64,
}

impl Gen {
    /// Counters of a provider that was never used (all zero).
    pub const VIRGIN: Gen = Gen {
        resuid: 0,
        localcnt: 0,
        remotecnt: 0,
    };

    /// Has this node written data its peer lacks (`localcnt > remotecnt`)?
    pub const fn wrote_while_disconnected(&self) -> bool {
        self.localcnt > self.remotecnt
    }
}

impl fmt::Display for Gen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resuid={:#018x}, localcnt={}, remotecnt={}",
            self.resuid, self.localcnt, self.remotecnt
        )
    }
}

/// Direction of a synchronisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncDirection {
    /// The primary's data is copied to the secondary.
    ToSecondary,
    /// The secondary's data is copied to the primary (the secondary was
    /// primary and wrote while the nodes were disconnected).
    FromSecondary,
}

impl SyncDirection {
    /// The name used in `hastctl list` and the event stream
    /// (`to-secondary`, `from-secondary`).
    pub fn name(self) -> &'static str {
        match self {
            SyncDirection::ToSecondary => "to-secondary",
            SyncDirection::FromSecondary => "from-secondary",
        }
    }
}

impl fmt::Display for SyncDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncDirection::ToSecondary => "primary → secondary",
            SyncDirection::FromSecondary => "secondary → primary",
        })
    }
}

/// What to do when a primary and a secondary connect, decided by
/// [`decide`] from both nodes' counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Same generation on both nodes: synchronise only the extents marked
    /// dirty (in flight when the connection was lost), primary → secondary.
    InSync,
    /// A new secondary and a primary that was never written: the secondary
    /// adopts the resource identifier; nothing needs copying.
    AdoptVirgin,
    /// The secondary is out of date: copy primary → secondary; every extent
    /// when `full` (a new secondary), else the dirty extents.
    ToSecondary {
        /// Copy every extent, not only the dirty ones.
        full: bool,
    },
    /// The primary is out of date (the secondary was primary and wrote while
    /// disconnected): copy the dirty extents secondary → primary.
    FromSecondary,
    /// The nodes belong to different resource instances: refuse.
    ResuidMismatch,
    /// Both nodes wrote while disconnected: refuse, an operator must choose
    /// which node's data to keep.
    SplitBrain,
    /// The counters contradict each other (damaged metadata, a restored
    /// provider, a crash while finishing a synchronisation): refuse.
    Inconsistent,
}

impl Decision {
    /// Does the decision refuse the connection?
    pub const fn is_refusal(&self) -> bool {
        matches!(
            self,
            Decision::ResuidMismatch | Decision::SplitBrain | Decision::Inconsistent
        )
    }

    /// Direction of the synchronisation, `None` for refusals. `InSync` and
    /// `AdoptVirgin` synchronise to the secondary (only dirty extents).
    pub const fn direction(&self) -> Option<SyncDirection> {
        match self {
            Decision::InSync | Decision::AdoptVirgin | Decision::ToSecondary { .. } => {
                Some(SyncDirection::ToSecondary)
            }
            Decision::FromSecondary => Some(SyncDirection::FromSecondary),
            Decision::ResuidMismatch | Decision::SplitBrain | Decision::Inconsistent => None,
        }
    }

    /// Must every extent be copied (rather than only the dirty ones)?
    pub const fn is_full(&self) -> bool {
        matches!(self, Decision::ToSecondary { full: true })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::InSync => {
                "both nodes hold the same generation; synchronising dirty extents primary → secondary"
            }
            Decision::AdoptVirgin => {
                "new secondary and a primary that was never written; the secondary adopts the resource, nothing to copy"
            }
            Decision::ToSecondary { full: true } => {
                "secondary is new (never used with this resource); full synchronisation primary → secondary"
            }
            Decision::ToSecondary { full: false } => {
                "secondary is out of date (primary wrote while disconnected); synchronising primary → secondary"
            }
            Decision::FromSecondary => {
                "primary is out of date (secondary was primary and wrote while disconnected); synchronising secondary → primary"
            }
            Decision::ResuidMismatch => {
                "the nodes hold different resources (resuid differs); refusing to synchronise"
            }
            Decision::SplitBrain => {
                "split brain: both nodes wrote while disconnected; refusing to synchronise, an operator must choose which node's data to keep"
            }
            Decision::Inconsistent => {
                "generation counters are inconsistent; refusing to synchronise"
            }
        })
    }
}

/// Called by a primary before it writes while DISCONNECTED: bumps
/// `localcnt` once per disconnected epoch (iff `localcnt == remotecnt`).
/// Returns whether the counters changed; the caller must then persist them
/// before the data write is issued.
pub fn bump_on_disconnected_write(gen: &mut Gen) -> bool {
    if gen.localcnt == gen.remotecnt {
        gen.localcnt += 1;
        true
    } else {
        false
    }
}

/// Decides how primary `p` and secondary `s` synchronise at connection.
///
/// `p_virgin` says that the primary has never been written: the caller
/// passes `p.localcnt == 0 && p.remotecnt == 0 && nothing dirty`. That is
/// sound because [`target_generation`] never returns 0: the first completed
/// synchronisation moves both nodes off generation 0.
///
/// The rules, in order (`pl`, `pr`, `sl`, `sr` are the primary's and the
/// secondary's `localcnt` and `remotecnt`):
///
/// 1. `p.resuid == 0`: [`Decision::Inconsistent`] (a primary always has a
///    resuid);
/// 2. `s.resuid == 0` (new secondary): [`Decision::AdoptVirgin`] when
///    `p_virgin`, else a full [`Decision::ToSecondary`];
/// 3. resuids differ: [`Decision::ResuidMismatch`];
/// 4. `pl < pr` or `sl < sr`: [`Decision::Inconsistent`];
/// 5. neither wrote: `pl == sl` → [`Decision::InSync`]; only the primary
///    wrote: `sl == pr` → [`Decision::ToSecondary`]; only the secondary
///    wrote: `pl == sr` → [`Decision::FromSecondary`]; both wrote →
///    [`Decision::SplitBrain`]; any other combination →
///    [`Decision::Inconsistent`].
pub fn decide(p: &Gen, s: &Gen, p_virgin: bool) -> Decision {
    if p.resuid == 0 {
        return Decision::Inconsistent;
    }
    if s.resuid == 0 {
        return if p_virgin {
            Decision::AdoptVirgin
        } else {
            Decision::ToSecondary { full: true }
        };
    }
    if p.resuid != s.resuid {
        return Decision::ResuidMismatch;
    }
    let (pl, pr, sl, sr) = (p.localcnt, p.remotecnt, s.localcnt, s.remotecnt);
    if pl < pr || sl < sr {
        return Decision::Inconsistent;
    }
    match (pl > pr, sl > sr) {
        (false, false) if pl == sl => Decision::InSync,
        (true, false) if sl == pr => Decision::ToSecondary { full: false },
        (false, true) if pl == sr => Decision::FromSecondary,
        (true, true) => Decision::SplitBrain,
        // A synchronisation completed, and its destination recorded the new
        // generation (it always records first, after flushing the copied
        // data), but the source crashed before recording it: the legs are
        // identical except for extents the dirty maps still mark.
        (true, false) if sl == sr && sl == pl => Decision::InSync,
        (false, false) if pl == 0 && sl == sr && sl == 1 => Decision::InSync,
        (false, true) if pl == pr && pl == sl => Decision::InSync,
        _ => Decision::Inconsistent,
    }
}

/// Turns a [`Decision::SplitBrain`] into a synchronisation when the
/// operator or the policy said which side to keep; any other decision is
/// returned unchanged.
///
/// - `s_discard`: the secondary's operator chose to discard its changes:
///   copy the primary's data over the extents either side changed.
/// - `auto` (`splitbrain auto`): a side whose dirty map is empty
///   (`touched == false`) changed nothing the other lacks, so the other
///   side's data is kept.
pub fn resolve_split_brain(
    d: Decision,
    s_discard: bool,
    auto: bool,
    p_touched: bool,
    s_touched: bool,
) -> Decision {
    if d != Decision::SplitBrain {
        return d;
    }
    if s_discard || (auto && !s_touched) {
        Decision::ToSecondary { full: false }
    } else if auto && !p_touched {
        Decision::FromSecondary
    } else {
        Decision::SplitBrain
    }
}

/// The generation both nodes store as `localcnt` AND `remotecnt` once the
/// synchronisation decided by `d` completes; `None` for refusals.
///
/// InSync and ToSecondary → the primary's `localcnt`, FromSecondary → the
/// secondary's `localcnt`, AdoptVirgin → 0; but never less than 1, so that
/// a primary whose counters are both 0 has never completed a
/// synchronisation (and `p_virgin` of [`decide`] can be derived from the
/// counters: a primary that replicated writes to a secondary and then meets
/// a replaced, empty secondary must do a full synchronisation).
pub fn target_generation(d: &Decision, p: &Gen, s: &Gen) -> Option<u64> {
    let g = match d {
        Decision::InSync | Decision::ToSecondary { .. } => p.localcnt,
        Decision::FromSecondary => s.localcnt,
        Decision::AdoptVirgin => 0,
        Decision::ResuidMismatch | Decision::SplitBrain | Decision::Inconsistent => return None,
    };
    Some(g.max(1))
}

/// A message for the log and for the operator explaining an
/// [`Decision::Inconsistent`] decision: every counter and what to do.
pub fn explain_inconsistent(p: &Gen, s: &Gen) -> String {
    let (pl, pr, sl, sr) = (p.localcnt, p.remotecnt, s.localcnt, s.remotecnt);
    let why = if p.resuid == 0 {
        "the primary has no resource ID (resuid 0)".to_owned()
    } else if pl < pr {
        format!("the primary's localcnt {pl} is below its remotecnt {pr} (damaged metadata)")
    } else if sl < sr {
        format!("the secondary's localcnt {sl} is below its remotecnt {sr} (damaged metadata)")
    } else if pl == pr && sl == sr {
        format!(
            "neither node wrote while disconnected but their generations differ \
             (primary {pl}, secondary {sl}): one provider was restored from an older copy, \
             or a node crashed while a synchronisation was completing"
        )
    } else if pl > pr {
        format!(
            "the primary wrote while disconnected but the secondary's generation {sl} is not \
             the one the primary last agreed on ({pr})"
        )
    } else {
        format!(
            "the secondary wrote while disconnected but the primary's generation {pl} is not \
             the one the secondary last agreed on ({sr})"
        )
    };
    format!(
        "generation counters are inconsistent: {why} (primary: {p}; secondary: {s}). \
         Neither node's data can be trusted to be newer; refusing to synchronise. \
         Decide which node holds the data to keep and reinitialise the stale node with \
         `hastctl role init; hastctl create; hastctl role secondary`; it is then fully \
         synchronised from the primary"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const R: u64 = 0x1234_5678_9abc_def0;

    fn g(localcnt: u64, remotecnt: u64) -> Gen {
        Gen {
            resuid: R,
            localcnt,
            remotecnt,
        }
    }

    #[test]
    fn display_of_gen() {
        assert_eq!(
            g(3, 2).to_string(),
            "resuid=0x123456789abcdef0, localcnt=3, remotecnt=2"
        );
        assert_eq!(
            Gen::VIRGIN.to_string(),
            "resuid=0x0000000000000000, localcnt=0, remotecnt=0"
        );
    }

    #[test]
    fn bump_once_per_epoch() {
        let mut a = g(5, 5);
        assert!(bump_on_disconnected_write(&mut a));
        assert_eq!(a, g(6, 5));
        assert!(!bump_on_disconnected_write(&mut a));
        assert_eq!(a, g(6, 5));
        let mut v = Gen::VIRGIN;
        assert!(bump_on_disconnected_write(&mut v));
        assert_eq!(v.localcnt, 1);
        assert!(v.wrote_while_disconnected());
    }

    #[test]
    fn rule_primary_without_resuid() {
        let p = Gen::VIRGIN;
        assert_eq!(decide(&p, &Gen::VIRGIN, true), Decision::Inconsistent);
        assert_eq!(decide(&p, &g(1, 1), false), Decision::Inconsistent);
        assert_eq!(decide(&p, &g(0, 0), true), Decision::Inconsistent);
    }

    #[test]
    fn rule_new_secondary() {
        let s = Gen::VIRGIN;
        assert_eq!(decide(&g(0, 0), &s, true), Decision::AdoptVirgin);
        assert_eq!(
            decide(&g(0, 0), &s, false),
            Decision::ToSecondary { full: true }
        );
        assert_eq!(
            decide(&g(7, 3), &s, false),
            Decision::ToSecondary { full: true }
        );
        // A virgin secondary wins over every counter check.
        let s_odd = Gen {
            resuid: 0,
            localcnt: 9,
            remotecnt: 12,
        };
        assert_eq!(
            decide(&g(1, 1), &s_odd, false),
            Decision::ToSecondary { full: true }
        );
    }

    #[test]
    fn rule_resuid_mismatch() {
        let s = Gen {
            resuid: R + 1,
            localcnt: 1,
            remotecnt: 1,
        };
        assert_eq!(decide(&g(1, 1), &s, false), Decision::ResuidMismatch);
        // Checked before the counters.
        let s_bad = Gen {
            resuid: R + 1,
            localcnt: 0,
            remotecnt: 5,
        };
        assert_eq!(decide(&g(0, 9), &s_bad, false), Decision::ResuidMismatch);
    }

    #[test]
    fn rule_damaged_counters() {
        assert_eq!(decide(&g(1, 2), &g(1, 1), false), Decision::Inconsistent);
        assert_eq!(decide(&g(1, 1), &g(1, 2), false), Decision::Inconsistent);
        assert_eq!(decide(&g(0, 1), &g(0, 1), false), Decision::Inconsistent);
        // Boundary: equal is fine.
        assert_eq!(decide(&g(2, 2), &g(2, 2), false), Decision::InSync);
    }

    #[test]
    fn rule_neither_wrote() {
        assert_eq!(decide(&g(4, 4), &g(4, 4), false), Decision::InSync);
        assert_eq!(decide(&g(0, 0), &g(0, 0), true), Decision::InSync);
        assert_eq!(decide(&g(4, 4), &g(3, 3), false), Decision::Inconsistent);
        assert_eq!(decide(&g(4, 4), &g(5, 5), false), Decision::Inconsistent);
    }

    #[test]
    fn rule_only_primary_wrote() {
        assert_eq!(
            decide(&g(5, 4), &g(4, 4), false),
            Decision::ToSecondary { full: false }
        );
        assert_eq!(decide(&g(5, 4), &g(3, 3), false), Decision::Inconsistent);
        // The secondary recorded the synchronisation to 5, the primary
        // crashed before recording it.
        assert_eq!(decide(&g(5, 4), &g(5, 5), false), Decision::InSync);
        assert_eq!(decide(&g(5, 4), &g(6, 6), false), Decision::Inconsistent);
        // A first synchronisation (target 1) recorded only by the secondary.
        assert_eq!(decide(&g(0, 0), &g(1, 1), false), Decision::InSync);
        assert_eq!(decide(&g(0, 0), &g(2, 2), false), Decision::Inconsistent);
        // More than one ahead is still "wrote" (damage-free: sl == pr).
        assert_eq!(
            decide(&g(9, 4), &g(4, 4), false),
            Decision::ToSecondary { full: false }
        );
    }

    #[test]
    fn rule_only_secondary_wrote() {
        assert_eq!(decide(&g(4, 4), &g(5, 4), false), Decision::FromSecondary);
        assert_eq!(decide(&g(3, 3), &g(5, 4), false), Decision::Inconsistent);
        // The primary (the destination) recorded the synchronisation from
        // the secondary, which crashed before recording it.
        assert_eq!(decide(&g(5, 5), &g(5, 4), false), Decision::InSync);
        assert_eq!(decide(&g(6, 6), &g(5, 4), false), Decision::Inconsistent);
    }

    #[test]
    fn rule_both_wrote() {
        assert_eq!(decide(&g(5, 4), &g(5, 4), false), Decision::SplitBrain);
        assert_eq!(decide(&g(9, 1), &g(3, 2), false), Decision::SplitBrain);
    }

    #[test]
    fn virgin_flag_only_matters_for_a_new_secondary() {
        for (p, s) in [
            (g(1, 1), g(1, 1)),
            (g(2, 1), g(1, 1)),
            (g(1, 1), g(2, 1)),
            (g(2, 1), g(2, 1)),
            (g(3, 3), g(1, 1)),
        ] {
            assert_eq!(decide(&p, &s, true), decide(&p, &s, false));
        }
    }

    #[test]
    fn targets() {
        let (p, s) = (g(5, 4), g(4, 4));
        let d = decide(&p, &s, false);
        assert_eq!(target_generation(&d, &p, &s), Some(5));
        let (p, s) = (g(4, 4), g(6, 4));
        assert_eq!(target_generation(&Decision::FromSecondary, &p, &s), Some(6));
        assert_eq!(
            target_generation(&Decision::InSync, &g(7, 7), &g(7, 7)),
            Some(7)
        );
        // Never 0: AdoptVirgin and generation-0 syncs land on 1.
        assert_eq!(
            target_generation(&Decision::AdoptVirgin, &g(0, 0), &Gen::VIRGIN),
            Some(1)
        );
        assert_eq!(
            target_generation(&Decision::InSync, &g(0, 0), &g(0, 0)),
            Some(1)
        );
        assert_eq!(
            target_generation(
                &Decision::ToSecondary { full: true },
                &g(0, 0),
                &Gen::VIRGIN
            ),
            Some(1)
        );
        for d in [
            Decision::ResuidMismatch,
            Decision::SplitBrain,
            Decision::Inconsistent,
        ] {
            assert_eq!(target_generation(&d, &g(1, 1), &g(1, 1)), None);
        }
    }

    /// The scenario that forbids generation 0 after a sync: writes
    /// replicated at generation 0, then the secondary's disk is replaced.
    #[test]
    fn replaced_secondary_after_replicated_writes_gets_a_full_sync() {
        let mut p = g(0, 0);
        let mut s = Gen::VIRGIN;
        let d = decide(&p, &s, true);
        assert_eq!(d, Decision::AdoptVirgin);
        let t = target_generation(&d, &p, &s).unwrap();
        s.resuid = p.resuid;
        for n in [&mut p, &mut s] {
            n.localcnt = t;
            n.remotecnt = t;
        }
        // ... application writes replicated while connected, all clean ...
        // The secondary is replaced by an empty disk:
        let virgin = p.localcnt == 0 && p.remotecnt == 0;
        assert!(!virgin);
        assert_eq!(
            decide(&p, &Gen::VIRGIN, virgin),
            Decision::ToSecondary { full: true }
        );
    }

    #[test]
    fn decision_properties() {
        let all = [
            Decision::InSync,
            Decision::AdoptVirgin,
            Decision::ToSecondary { full: true },
            Decision::ToSecondary { full: false },
            Decision::FromSecondary,
            Decision::ResuidMismatch,
            Decision::SplitBrain,
            Decision::Inconsistent,
        ];
        for d in all {
            assert_eq!(d.is_refusal(), d.direction().is_none(), "{d:?}");
            assert!(!d.to_string().is_empty());
        }
        assert_eq!(
            Decision::ToSecondary { full: false }.to_string(),
            "secondary is out of date (primary wrote while disconnected); synchronising primary → secondary"
        );
        assert_eq!(
            Decision::FromSecondary.direction(),
            Some(SyncDirection::FromSecondary)
        );
        assert_eq!(
            Decision::AdoptVirgin.direction(),
            Some(SyncDirection::ToSecondary)
        );
        assert_eq!(
            Decision::InSync.direction(),
            Some(SyncDirection::ToSecondary)
        );
        assert!(Decision::ToSecondary { full: true }.is_full());
        assert!(!Decision::InSync.is_full());
        assert!(Decision::SplitBrain.is_refusal());
        assert!(!Decision::FromSecondary.is_refusal());
    }

    #[test]
    fn explanation_names_every_counter_and_the_remedy() {
        let p = g(5, 4);
        let s = g(3, 3);
        assert_eq!(decide(&p, &s, false), Decision::Inconsistent);
        let m = explain_inconsistent(&p, &s);
        for needle in [
            "localcnt=5",
            "remotecnt=4",
            "localcnt=3",
            "remotecnt=3",
            "resuid=0x123456789abcdef0",
            "hastctl role init; hastctl create; hastctl role secondary",
        ] {
            assert!(m.contains(needle), "{needle:?} missing from {m}");
        }
        for (p, s) in [
            (Gen::VIRGIN, g(1, 1)),
            (g(1, 2), g(1, 1)),
            (g(1, 1), g(0, 1)),
            (g(2, 2), g(3, 3)),
            (g(2, 2), g(5, 4)),
        ] {
            assert_eq!(decide(&p, &s, false), Decision::Inconsistent);
            assert!(explain_inconsistent(&p, &s).contains("hastctl create"));
        }
    }

    // ---- model-based property test -------------------------------------

    /// One node of the model: counters plus the truth about its data.
    #[derive(Debug, Clone, Default)]
    struct Node {
        gen: Gen,
        /// Write ids this node's data contains.
        data: BTreeSet<u32>,
        /// Write ids whose extents are marked dirty in this node's
        /// activemap (written while disconnected or in flight at a
        /// disconnection); cleared by a completed synchronisation.
        dirty: BTreeSet<u32>,
    }

    #[derive(Debug, Clone, Copy)]
    enum Event {
        /// Connect; decide; on acceptance, synchronise and complete.
        ConnectSync,
        /// Drop the connection (network, crash of either node, restart:
        /// counters, data and dirty bits persist).
        Disconnect,
        /// The primary writes (replicated when connected).
        Write,
        /// The connection breaks with a write applied on the primary only.
        WriteInFlightThenDisconnect,
        /// Roles swap while disconnected (disconnecting first).
        Swap,
        /// The secondary's provider is replaced and `hastctl create`d.
        ReinitSecondary,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => Just(Event::ConnectSync),
            3 => Just(Event::Disconnect),
            6 => Just(Event::Write),
            1 => Just(Event::WriteInFlightThenDisconnect),
            2 => Just(Event::Swap),
            1 => Just(Event::ReinitSecondary),
        ]
    }

    struct Model {
        nodes: [Node; 2],
        primary: usize,
        connected: bool,
        next_write: u32,
        next_resuid: u64,
        /// Writes acknowledged to the application (all but those in flight
        /// when a connection broke); only these must never be lost.
        acked: BTreeSet<u32>,
        decisions: Vec<Decision>,
    }

    impl Model {
        fn new() -> Model {
            let mut m = Model {
                nodes: [Node::default(), Node::default()],
                primary: 0,
                connected: false,
                next_write: 1,
                next_resuid: 0x100,
                acked: BTreeSet::new(),
                decisions: Vec::new(),
            };
            m.become_primary(0);
            m
        }

        /// A node taking the primary role gets a resuid if it has none.
        fn become_primary(&mut self, i: usize) {
            self.primary = i;
            if self.nodes[i].gen.resuid == 0 {
                self.nodes[i].gen.resuid = self.next_resuid;
                self.next_resuid += 1;
            }
        }

        fn write_id(&mut self) -> u32 {
            self.next_write += 1;
            self.next_write
        }

        fn step(&mut self, ev: Event) -> Result<(), TestCaseError> {
            let (pi, si) = (self.primary, 1 - self.primary);
            match ev {
                Event::Disconnect => self.connected = false,
                Event::Write => {
                    let w = self.write_id();
                    self.acked.insert(w);
                    if self.connected {
                        self.nodes[pi].data.insert(w);
                        self.nodes[si].data.insert(w);
                    } else {
                        bump_on_disconnected_write(&mut self.nodes[pi].gen);
                        self.nodes[pi].data.insert(w);
                        self.nodes[pi].dirty.insert(w);
                    }
                }
                Event::WriteInFlightThenDisconnect => {
                    let w = self.write_id();
                    if !self.connected {
                        // Not in flight to anyone: an ordinary local write.
                        bump_on_disconnected_write(&mut self.nodes[pi].gen);
                        self.acked.insert(w);
                    }
                    self.nodes[pi].data.insert(w);
                    self.nodes[pi].dirty.insert(w);
                    self.connected = false;
                }
                Event::Swap => {
                    self.connected = false;
                    self.become_primary(si);
                }
                Event::ReinitSecondary => {
                    if !self.connected {
                        self.nodes[si] = Node::default();
                    }
                }
                Event::ConnectSync => {
                    if !self.connected {
                        self.connect()?;
                    }
                }
            }
            Ok(())
        }

        fn connect(&mut self) -> Result<(), TestCaseError> {
            let (pi, si) = (self.primary, 1 - self.primary);
            let (p, s) = (&self.nodes[pi], &self.nodes[si]);
            let p_virgin = p.gen.localcnt == 0 && p.gen.remotecnt == 0 && p.dirty.is_empty();
            let d = decide(&p.gen, &s.gen, p_virgin);
            self.decisions.push(d);
            // Acknowledged writes each side holds and the other lacks.
            let p_unique: BTreeSet<u32> = p
                .data
                .difference(&s.data)
                .filter(|w| self.acked.contains(w))
                .copied()
                .collect();
            let s_unique: BTreeSet<u32> = s
                .data
                .difference(&p.data)
                .filter(|w| self.acked.contains(w))
                .copied()
                .collect();
            let both = !p_unique.is_empty() && !s_unique.is_empty();
            // SplitBrain exactly when both hold writes the other lacks
            // (and they are the same resource).
            prop_assert_eq!(
                d == Decision::SplitBrain,
                both && p.gen.resuid == s.gen.resuid && s.gen.resuid != 0,
                "{:?}: p={:?} s={:?}",
                d,
                p,
                s
            );
            if both {
                prop_assert!(d.is_refusal(), "{:?} with writes on both sides", d);
            }
            // Legal histories never produce damaged counters.
            prop_assert_ne!(d, Decision::Inconsistent, "p={:?} s={:?}", p, s);
            let Some(dir) = d.direction() else {
                return Ok(());
            };
            let (src, dst) = match dir {
                SyncDirection::ToSecondary => (pi, si),
                SyncDirection::FromSecondary => (si, pi),
            };
            // The destination must not hold writes the source lacks.
            let dst_unique = if dst == si { &s_unique } else { &p_unique };
            prop_assert!(
                dst_unique.is_empty(),
                "{:?} would lose writes {:?}: p={:?} s={:?}",
                d,
                dst_unique,
                p,
                s
            );
            // Synchronise: every extent, or the union of both dirty maps.
            let src_data = self.nodes[src].data.clone();
            let new_dst: BTreeSet<u32> = if d.is_full() {
                src_data.clone()
            } else {
                let dirty: BTreeSet<u32> = self.nodes[pi]
                    .dirty
                    .union(&self.nodes[si].dirty)
                    .copied()
                    .collect();
                let dst_data = &self.nodes[dst].data;
                dst_data
                    .difference(&dirty)
                    .chain(src_data.intersection(&dirty))
                    .copied()
                    .collect()
            };
            prop_assert_eq!(
                &new_dst,
                &src_data,
                "{:?} left the nodes different: p={:?} s={:?}",
                d,
                &self.nodes[pi],
                &self.nodes[si]
            );
            let t = target_generation(&d, &self.nodes[pi].gen, &self.nodes[si].gen)
                .expect("accepted decisions have a target");
            prop_assert!(t >= 1);
            let resuid = self.nodes[pi].gen.resuid;
            self.nodes[dst].data = new_dst;
            for n in &mut self.nodes {
                n.gen = Gen {
                    resuid,
                    localcnt: t,
                    remotecnt: t,
                };
                n.dirty.clear();
            }
            self.connected = true;
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decide_never_loses_writes(events in proptest::collection::vec(event(), 1..60)) {
            let mut m = Model::new();
            for ev in events {
                m.step(ev)?;
            }
        }

        #[test]
        fn decide_is_total_and_consistent(
            pres in 0u64..3, sres in 0u64..3,
            pl in 0u64..6, pr in 0u64..6, sl in 0u64..6, sr in 0u64..6,
            virgin in any::<bool>(),
        ) {
            let p = Gen { resuid: pres, localcnt: pl, remotecnt: pr };
            let s = Gen { resuid: sres, localcnt: sl, remotecnt: sr };
            let d = decide(&p, &s, virgin);
            prop_assert_eq!(d.is_refusal(), target_generation(&d, &p, &s).is_none());
            if d == Decision::SplitBrain {
                prop_assert!(pl > pr && sl > sr);
            }
            if let Some(t) = target_generation(&d, &p, &s) {
                // The target never moves a node's data generation backwards.
                prop_assert!(t >= 1);
                if d != Decision::AdoptVirgin {
                    prop_assert!(t >= pl);
                }
                if s.resuid != 0 {
                    prop_assert!(t >= sl);
                }
            }
        }
    }

    /// The model explores the interesting decisions (not only InSync).
    #[test]
    fn model_reaches_every_accepting_decision() {
        use Event::*;
        let mut seen = std::collections::HashSet::new();
        let scripts: &[&[Event]] = &[
            &[ConnectSync],
            &[Write, ConnectSync],
            &[ConnectSync, Write, Disconnect, Write, ConnectSync],
            &[
                ConnectSync,
                Write,
                Disconnect,
                Swap,
                Write,
                ConnectSync,
                Swap,
                ConnectSync,
            ],
            &[ConnectSync, Disconnect, Write, Swap, ConnectSync],
            &[ConnectSync, Disconnect, Write, Swap, Write, ConnectSync],
            &[ConnectSync, Write, WriteInFlightThenDisconnect, ConnectSync],
            &[ConnectSync, Write, Disconnect, ReinitSecondary, ConnectSync],
            &[Write, Swap, Write, ConnectSync],
        ];
        for script in scripts {
            let mut m = Model::new();
            for &ev in *script {
                m.step(ev).unwrap();
            }
            seen.extend(m.decisions);
        }
        for d in [
            Decision::AdoptVirgin,
            Decision::InSync,
            Decision::ToSecondary { full: true },
            Decision::ToSecondary { full: false },
            Decision::FromSecondary,
            Decision::SplitBrain,
            Decision::ResuidMismatch,
        ] {
            assert!(seen.contains(&d), "{d:?} not reached");
        }
    }
}

#[cfg(test)]
mod split_brain_tests {
    use super::*;

    fn g(l: u64, r: u64) -> Gen {
        Gen {
            resuid: 7,
            localcnt: l,
            remotecnt: r,
        }
    }

    #[test]
    fn resolution_of_split_brain() {
        let d = decide(&g(5, 4), &g(5, 4), false);
        assert_eq!(d, Decision::SplitBrain);
        assert_eq!(
            resolve_split_brain(d, false, false, true, true),
            Decision::SplitBrain
        );
        assert_eq!(
            resolve_split_brain(d, true, false, true, true),
            Decision::ToSecondary { full: false },
            "discard on the secondary keeps the primary's data"
        );
        assert_eq!(
            resolve_split_brain(d, false, true, true, true),
            Decision::SplitBrain
        );
        assert_eq!(
            resolve_split_brain(d, false, true, true, false),
            Decision::ToSecondary { full: false }
        );
        assert_eq!(
            resolve_split_brain(d, false, true, false, true),
            Decision::FromSecondary
        );
        // Other decisions pass through untouched, even with discard set.
        let other = decide(&g(5, 4), &g(4, 4), false);
        assert_eq!(resolve_split_brain(other, true, true, false, false), other);
        let inc = decide(&g(5, 4), &g(9, 9), false);
        assert_eq!(
            resolve_split_brain(inc, true, true, false, false),
            Decision::Inconsistent
        );
    }
}
