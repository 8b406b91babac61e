//! Replication between the two nodes of a resource: the wire protocol
//! (`proto`, pure) and the connection handling on both sides.
//!
//! See `docs/protocol.md`.

pub mod proto;
// further modules are declared by the lead
pub mod frame;
pub mod link;
pub mod listener;
pub mod remote;
pub mod secondary;
