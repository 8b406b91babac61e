//! Replication between the two nodes of a resource: the wire protocol
//! (`proto`, pure) and the connection handling on both sides.
//!
//! See `docs/protocol.md`.

pub mod auth;
pub mod checksum;
pub mod compress;
pub mod detach;
pub mod durability;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod listener;
pub mod presession;
pub mod proto;
pub mod remote;
pub mod seal;
pub mod secondary;
pub mod sync;
pub mod tls;
pub mod verify;
