//! Benchmarks of hast-rs.
//!
//! - `benches/hotpath.rs`: criterion micro-benchmarks of the pure code on
//!   the request path (activemap keepdirty fast path, NBD request parsing,
//!   metadata encode/decode).
//!
//! The end-to-end harness (raw disk vs qemu-nbd vs hastd, in one run) lands
//! with the performance issue.
