//! HAST data path: on-disk metadata and activemap, local I/O behind the
//! [`storage`] seam, the block export (NBD), replication and
//! synchronisation ([`peer`]), and the per-core node runtime ([`node`]).
//! See `docs/architecture.md` for the life of one replicated write.
//!
//! Pure logic (metadata codec, activemap, range lock, NBD protocol codec)
//! lives in modules with no I/O so that it is unit- and property-tested
//! without glommio; the I/O modules drive it.

pub mod activemap;
pub mod batch;
pub mod digest;
pub mod events;
pub mod export;
pub mod generation;
pub mod local;
pub mod metadata;
pub mod nbd;
pub mod node;
pub mod peer;
pub mod pipe;
pub mod primary;
pub mod provider;
pub mod rangelock;
pub mod semaphore;
pub mod signal;
pub mod stats;
pub mod storage;
pub mod writtenmap;
