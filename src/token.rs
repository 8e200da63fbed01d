//! Event-loop tokens: what a readiness event is about, encoded and decoded
//! here and nowhere else.
//!
//! A relay's tokens carry its slab key, the socket's side and the low bits
//! of the relay's id. The slab reuses keys at once, so an event queued for a
//! relay that closed earlier in the same batch can name a key that a new
//! relay already holds; the id bits tell the two apart. The same
//! [`RelayRef`] (key + id) is what every deferred reference (ready list,
//! timers) stores.
//!
//! Layout of the 64 bits: bit 63 clear for relays, with the side in bit 0,
//! the key in bits 1..32 and the id's low 31 bits in bits 32..63. With bit
//! 63 set, bits 60..63 name the kind (waker, listener, health probes,
//! pre-relay connections, refused clients being told why, and room for
//! three more) and the low bits an index.

use mio::Token;

use crate::relay::Peer;

const OTHER: usize = 1 << 63;
const KIND_SHIFT: u32 = 60;
const KIND_MASK: usize = 0b111;
const KIND_WAKER: usize = 0;
const KIND_LISTENER: usize = 1;
const KIND_PROBE: usize = 2;
const KIND_PREFACE: usize = 3;
const KIND_FAREWELL: usize = 4;
const KEY_BITS: u32 = 31;
const KEY_MASK: usize = (1 << KEY_BITS) - 1;
const ID_SHIFT: u32 = 32;
const ID_MASK: u64 = (1 << 31) - 1;

/// A relay as deferred work refers to it: where it lives and which relay
/// it was, so a reused slot is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RelayRef {
    pub(crate) key: usize,
    pub(crate) id: u64,
}

impl RelayRef {
    /// Whether this reference names the relay with `id` (only the id bits a
    /// token can carry are compared).
    pub(crate) fn is(&self, id: u64) -> bool {
        (self.id ^ id) & ID_MASK == 0
    }
}

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owner {
    Waker,
    /// The worker's listener socket with this index.
    Listener(usize),
    /// An active health probe's socket (its key in the worker's probes).
    Probe(usize),
    /// A connection before its relay starts: a client whose first bytes
    /// are read, or a cancel request on its way to a server.
    Preface(usize),
    /// A refused client being told why (its key in the worker's farewells).
    Farewell(usize),
    Relay(RelayRef, Peer),
}

pub(crate) fn waker() -> Token {
    Token(OTHER | (KIND_WAKER << KIND_SHIFT))
}

pub(crate) fn listener(index: usize) -> Token {
    Token(OTHER | (KIND_LISTENER << KIND_SHIFT) | (index & KEY_MASK))
}

pub(crate) fn probe(key: usize) -> Token {
    Token(OTHER | (KIND_PROBE << KIND_SHIFT) | (key & KEY_MASK))
}

pub(crate) fn preface(key: usize) -> Token {
    Token(OTHER | (KIND_PREFACE << KIND_SHIFT) | (key & KEY_MASK))
}

pub(crate) fn farewell(key: usize) -> Token {
    Token(OTHER | (KIND_FAREWELL << KIND_SHIFT) | (key & KEY_MASK))
}

/// The token of one of a relay's sockets. Keys past 2^31 cannot occur: the
/// relay cap is bounded by the fd limit.
pub(crate) fn relay(relay: RelayRef, peer: Peer) -> Token {
    debug_assert!(relay.key <= KEY_MASK, "relay slab key out of range");
    let side_bit = usize::from(peer == Peer::Upstream);
    let id_bits = ((relay.id & ID_MASK) as usize) << ID_SHIFT;
    Token(id_bits | ((relay.key & KEY_MASK) << 1) | side_bit)
}

pub(crate) fn decode(token: Token) -> Owner {
    let t = token.0;
    if t & OTHER == 0 {
        let peer = if t & 1 == 0 {
            Peer::Client
        } else {
            Peer::Upstream
        };
        let key = (t >> 1) & KEY_MASK;
        let id = ((t >> ID_SHIFT) as u64) & ID_MASK;
        return Owner::Relay(RelayRef { key, id }, peer);
    }
    match (t >> KIND_SHIFT) & KIND_MASK {
        KIND_LISTENER => Owner::Listener(t & KEY_MASK),
        KIND_PROBE => Owner::Probe(t & KEY_MASK),
        KIND_PREFACE => Owner::Preface(t & KEY_MASK),
        KIND_FAREWELL => Owner::Farewell(t & KEY_MASK),
        _ => Owner::Waker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_tokens_round_trip_with_their_side_and_id() {
        for (key, id) in [(0, 1), (7, 12_345), (KEY_MASK, u64::MAX), (3, 1 << 31)] {
            let r = RelayRef { key, id };
            for side in [Peer::Client, Peer::Upstream] {
                match decode(relay(r, side)) {
                    Owner::Relay(got, got_side) => {
                        assert_eq!(got.key, key);
                        assert_eq!(got_side, side);
                        assert!(got.is(id), "id bits lost for {id}");
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_reused_key_is_told_apart_by_its_id() {
        let old = RelayRef { key: 5, id: 41 };
        let Owner::Relay(r, _) = decode(relay(old, Peer::Upstream)) else {
            panic!("not a relay token")
        };
        assert!(r.is(41));
        assert!(
            !r.is(42),
            "a new relay in the same slot took the old one's event"
        );
    }

    #[test]
    fn listeners_and_the_waker_never_look_like_relays() {
        assert_eq!(decode(waker()), Owner::Waker);
        for i in [0, 1, 17] {
            assert_eq!(decode(listener(i)), Owner::Listener(i));
        }
        assert_ne!(waker(), listener(0));
        for i in [0, 9] {
            assert_eq!(decode(probe(i)), Owner::Probe(i));
            assert_eq!(decode(preface(i)), Owner::Preface(i));
            assert_eq!(decode(farewell(i)), Owner::Farewell(i));
        }
    }
}
