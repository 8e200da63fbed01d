//! Replication positions from role answers, and a replica's lag behind its
//! primary: pure, every sample carries the `Instant` its probe ended.
//!
//! A role answer of a PostgreSQL or Redis server also says where it is in
//! its replication stream ([`Position`]): a PostgreSQL primary its
//! `pg_current_wal_lsn()`, a standby its `pg_last_wal_replay_lsn()` (and
//! `pg_last_wal_receive_lsn()`); a Redis master its `master_repl_offset`, a
//! replica its `slave_repl_offset` (and Redis 7's
//! `slave_read_repl_offset`). Positions of different streams (another
//! PostgreSQL cluster: another `system_identifier`; another Redis
//! replication ID) are never compared.
//!
//! A replica's lag ([`replica_lag`]) is the primary's position minus the
//! replica's applied position, taken from the primary's sample closest in
//! time to the replica's: a primary sampled long after the replica would
//! count the writes made in between as lag, one sampled long before would
//! hide them. Only samples within `window` of the replica's count, and
//! only of servers whose last answer confirmed them primary (the caller
//! filters). Without one, the lag is what the replica itself reports:
//! received but not yet applied ([`Measured::Received`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Where a server is in its replication stream, from one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The stream: PostgreSQL's `system_identifier`, or a hash of Redis's
    /// replication ID.
    pub stream: u64,
    /// A primary: how far it has written. A replica: how far it applied.
    pub applied: u64,
    /// A replica: how far it received, when it says.
    pub received: Option<u64>,
}

/// How a lag was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measured {
    /// Against a primary's position.
    Primary,
    /// Without a primary: what the replica received and has not applied.
    Received,
}

/// A replica's replication lag, in bytes of WAL (PostgreSQL) or of the
/// replication stream (Redis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lag {
    pub bytes: u64,
    pub measured: Measured,
}

/// How many recent samples a server keeps: enough to find one close to a
/// replica's probe among a primary's.
pub const SAMPLES: usize = 4;

/// A server's recent positions, newest last.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    ring: VecDeque<(Instant, Position)>,
}

impl Samples {
    pub fn push(&mut self, at: Instant, position: Position) {
        if self.ring.len() == SAMPLES {
            self.ring.pop_front();
        }
        self.ring.push_back((at, position));
    }

    pub fn clear(&mut self) {
        self.ring.clear();
    }

    pub fn latest(&self) -> Option<(Instant, Position)> {
        self.ring.back().copied()
    }

    /// The sample of `stream` closest in time to `at`, within `window`.
    pub fn closest(
        &self,
        stream: u64,
        at: Instant,
        window: Duration,
    ) -> Option<(Duration, Position)> {
        self.ring
            .iter()
            .filter(|(_, p)| p.stream == stream)
            .map(|(t, p)| (distance(*t, at), *p))
            .filter(|(d, _)| *d <= window)
            .min_by_key(|(d, _)| *d)
    }
}

fn distance(a: Instant, b: Instant) -> Duration {
    if a > b {
        a - b
    } else {
        b - a
    }
}

/// The lag of a replica whose latest sample is `replica`, against the
/// samples of the servers confirmed primary (`primaries`, each with the
/// window its samples count within): the position of the primary sample
/// closest in time (the highest position among equally close ones), minus
/// what the replica applied (never below zero). Without such a sample,
/// received minus applied; `None` when the replica says neither.
pub fn replica_lag<'a>(
    replica: (Instant, Position),
    primaries: impl IntoIterator<Item = (&'a Samples, Duration)>,
) -> Option<Lag> {
    let (at, pos) = replica;
    let best = primaries
        .into_iter()
        .filter_map(|(s, window)| s.closest(pos.stream, at, window))
        .min_by(|(da, pa), (db, pb)| da.cmp(db).then(pb.applied.cmp(&pa.applied)));
    match best {
        Some((_, primary)) => Some(Lag {
            bytes: primary.applied.saturating_sub(pos.applied),
            measured: Measured::Primary,
        }),
        None => pos.received.map(|r| Lag {
            bytes: r.saturating_sub(pos.applied),
            measured: Measured::Received,
        }),
    }
}

/// A PostgreSQL LSN as text (`16/B374D848`: the high and low 32 bits in
/// hex) as a byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let word = |s: &str| {
        (!s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some((u64::from(word(hi)?) << 32) | u64::from(word(lo)?))
}

/// A stable 64-bit digest of a Redis replication ID (FNV-1a): the stream
/// key of its offsets.
pub fn stream_of(replid: &[u8]) -> u64 {
    replid.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(applied: u64, received: Option<u64>) -> Position {
        Position {
            stream: 7,
            applied,
            received,
        }
    }

    fn samples(list: &[(Instant, Position)]) -> Samples {
        let mut s = Samples::default();
        for &(t, p) in list {
            s.push(t, p);
        }
        s
    }

    #[test]
    fn lsn_text_is_high_and_low_words() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        assert_eq!(parse_lsn("0/1501260"), Some(0x150_1260));
        for bad in [
            "",
            "16",
            "/1",
            "1/",
            "1/2/3",
            "G/0",
            "1 /0",
            "100000000/0",
            "+1/0",
        ] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lag_is_the_primary_position_closest_in_time_minus_the_replay() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let primary = samples(&[
            (t0, pos(1000, None)),
            (t0 + 2 * s, pos(5000, None)),
            (t0 + 4 * s, pos(9000, None)),
        ]);
        let replica = (t0 + 2 * s + s / 4, pos(4000, Some(4500)));
        let lag = replica_lag(replica, [(&primary, 10 * s)]).unwrap();
        assert_eq!(
            lag,
            Lag {
                bytes: 1000,
                measured: Measured::Primary
            }
        );
        // Ahead of the primary's sample: no lag, never negative.
        let ahead = (t0 + 2 * s, pos(6000, None));
        assert_eq!(replica_lag(ahead, [(&primary, 10 * s)]).unwrap().bytes, 0);
    }

    #[test]
    fn without_a_fresh_primary_the_lag_is_what_the_replica_received() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let old = samples(&[(t0, pos(1_000_000, None))]);
        let replica = (t0 + 30 * s, pos(4000, Some(4500)));
        assert_eq!(
            replica_lag(replica, [(&old, 4 * s)]),
            Some(Lag {
                bytes: 500,
                measured: Measured::Received
            })
        );
        assert_eq!(replica_lag((t0, pos(4000, None)), []), None);
    }

    #[test]
    fn another_stream_is_never_compared() {
        let t0 = Instant::now();
        let other = samples(&[(
            t0,
            Position {
                stream: 8,
                applied: 1 << 40,
                received: None,
            },
        )]);
        let replica = (t0, pos(4000, Some(4000)));
        assert_eq!(
            replica_lag(replica, [(&other, Duration::from_secs(4))])
                .unwrap()
                .measured,
            Measured::Received
        );
    }

    #[test]
    fn two_primaries_at_the_same_distance_count_the_higher() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let a = samples(&[(t0, pos(100, None))]);
        let b = samples(&[(t0, pos(900, None))]);
        let lag = replica_lag((t0, pos(50, None)), [(&a, s), (&b, s)]);
        assert_eq!(lag.unwrap().bytes, 850);
    }

    #[test]
    fn samples_keep_the_newest_few() {
        let t0 = Instant::now();
        let mut s = Samples::default();
        for i in 0..10u64 {
            s.push(t0 + Duration::from_secs(i), pos(i, None));
        }
        assert_eq!(s.ring.len(), SAMPLES);
        assert_eq!(s.latest().unwrap().1.applied, 9);
        assert_eq!(
            s.closest(7, t0, Duration::from_secs(100))
                .unwrap()
                .1
                .applied,
            10 - SAMPLES as u64
        );
    }

    #[test]
    fn redis_replication_ids_hash_apart() {
        assert_ne!(stream_of(b"abc"), stream_of(b"abd"));
        assert_eq!(stream_of(b"abc"), stream_of(b"abc"));
    }
}
