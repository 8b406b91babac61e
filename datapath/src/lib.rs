//! HAST data path: on-disk metadata and activemap, direct local I/O, the
//! block export (NBD), and (later) replication and synchronisation.
//!
//! Pure logic (metadata codec, activemap, range lock, NBD protocol codec)
//! lives in modules with no I/O so that it is unit- and property-tested
//! without glommio; the I/O modules drive it.

pub mod activemap;
pub mod events;
pub mod export;
pub mod generation;
pub mod inflight;
pub mod local;
pub mod metadata;
pub mod nbd;
pub mod node;
pub mod peer;
pub mod primary;
pub mod provider;
pub mod rangelock;
pub mod stats;
