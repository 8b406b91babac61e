//! HAST control plane: hast.conf, the hastd daemon and the hastctl client.

pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
pub mod hooks;
pub mod metrics;
pub mod offline;
pub mod progress;
pub mod proto;
pub mod reload;
pub mod report;
pub mod security;
pub mod size;
pub mod syslog;

/// Exit codes (sysexits(3), as the original uses).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Command line usage error.
    pub const USAGE: i32 = 64;
    /// Data format error (bad parameters, unknown resource).
    pub const DATAERR: i32 = 65;
    /// Cannot open input (provider missing).
    pub const NOINPUT: i32 = 66;
    /// Service unavailable (hastd not reachable).
    pub const UNAVAILABLE: i32 = 69;
    /// Internal software error.
    pub const SOFTWARE: i32 = 70;
    /// Operating system error.
    pub const OSERR: i32 = 71;
    /// I/O error.
    pub const IOERR: i32 = 74;
    /// Temporary failure (already running).
    pub const TEMPFAIL: i32 = 75;
    /// Configuration error.
    pub const CONFIG: i32 = 78;
}
