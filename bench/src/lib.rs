//! Benchmarks of hast-rs.
//!
//! - `benches/hotpath.rs`: criterion micro-benchmarks of the pure code on
//!   the request path (activemap keepdirty fast path, NBD request parsing,
//!   metadata encode/decode).
//! - `src/bin/hast-bench.rs`: the end-to-end harness (raw disk vs qemu-nbd
//!   vs hastd in one run, two resources, an 8 GiB working set, full
//!   synchronisation; CPU, system calls and memory of the servers; SVG
//!   charts), built from the modules below; see docs/benchmarks.md.

pub mod charts;
pub mod fio;
pub mod machine;
pub mod memory;
pub mod procmon;
pub mod report;
pub mod suite;
pub mod syscalls;
pub mod util;
pub mod wire;
