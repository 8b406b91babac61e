//! NBD export of a resource: an NBD server on a unix socket, serving one
//! [`BlockBackend`](crate::export::BlockBackend) per export.
//!
//! - [`proto`]: the wire format (pure, property-tested);
//! - `handshake`: fixed newstyle option negotiation;
//! - `transmission`: request reading, concurrent execution, the reply writer;
//! - `server`: listener, connection limits, shutdown.
//!
//! See `docs/nbd.md` for what is implemented and how to connect.

pub mod proto;

mod handshake;
mod server;
mod transmission;

pub use server::{NbdConfig, NbdExport, NbdHandle, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
pub use transmission::DRAIN_TIMEOUT;
