//! Routing a client by what its first bytes say: the TLS ClientHello.
pub mod hello;
