//! NBD client pieces: the wire format ([`proto`]) and connections with
//! handshake and reconnection ([`conn`]). The target that serves a ublk
//! device from an NBD export is [`crate::targets::nbd`].

pub mod client;
pub mod conn;
pub mod proto;
