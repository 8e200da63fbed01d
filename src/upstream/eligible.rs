//! Which servers of a pool may take new relays: a pure function of what
//! their last answers said, for the pool's wanted role.
//!
//! The rules, in order:
//! - a server that stopped answering (`fall` failures) is `Down`;
//! - in a pool without a role, every other server is eligible;
//! - in a role pool, a server takes relays only once an answer confirmed
//!   the role (fail closed): one never confirmed is `Unknown`, or
//!   `CheckError` when its check cannot log in; one whose last answer is
//!   another role is `WrongRole`;
//! - at most one primary: when several confirmed primaries answer, the one
//!   on the highest timeline (PostgreSQL) is kept and the others are
//!   excluded as `stale timeline`; without a single highest timeline none
//!   of them is used (`split brain`) until one remains;
//! - `prefer-replica`: the confirmed replicas while any is eligible, else
//!   the primary (under the same one-primary rule);
//! - a check error on a server with a confirmed state keeps that state
//!   (and its eligibility), shown as `CheckError`;
//! - with `max-lag` (replica and prefer-replica pools), a confirmed replica
//!   whose measured lag passes the limit is `Lagging` and takes no new
//!   relays; it stays so until its lag is back at 3/4 of the limit (the
//!   pool passes what it decided last time), so a lag hovering around the
//!   limit does not flap. A primary is never lagging, and a replica whose
//!   lag was never measured is judged by its role alone. Under
//!   prefer-replica, lagging replicas count as absent: with all of them
//!   lagging, the primary serves.

use crate::health::{Reported, Role};

use super::fleet::Facts;

/// The role a pool wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    Any,
    Primary,
    Replica,
    PreferReplica,
}

/// A server's state as one pool sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Up,
    Down,
    WrongRole,
    CheckError,
    Unknown,
    /// A primary kept back while `prefer-replica` has replicas.
    Standby,
    /// A replica further behind its primary than `max-lag`.
    Lagging,
}

// Every state and its name are for `/metrics` (feature `admin`).
impl State {
    #[cfg(any(feature = "admin", test))]
    pub(crate) const ALL: [State; 7] = [
        State::Up,
        State::Down,
        State::WrongRole,
        State::CheckError,
        State::Unknown,
        State::Standby,
        State::Lagging,
    ];

    #[cfg(any(feature = "admin", test))]
    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::WrongRole => "wrong-role",
            State::CheckError => "check-error",
            State::Unknown => "unknown",
            State::Standby => "standby",
            State::Lagging => "lagging",
        }
    }

    /// Its code in the stats file (0 is up, so a reader that only knows
    /// "non-zero means down" reads it right).
    pub(crate) fn code(self) -> u64 {
        match self {
            State::Up => 0,
            State::Down => 1,
            State::WrongRole => 2,
            State::CheckError => 3,
            State::Unknown => 4,
            State::Standby => 5,
            State::Lagging => 6,
        }
    }
}

/// Why a server is excluded, beyond its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    None,
    NoAnswer,
    Role,
    StaleTimeline,
    SplitBrain,
    Unconfirmed,
    CheckFailed,
    ReplicasServe,
    ReplicationLag,
}

impl Why {
    pub(crate) const ALL: [Why; 9] = [
        Why::None,
        Why::NoAnswer,
        Why::Role,
        Why::StaleTimeline,
        Why::SplitBrain,
        Why::Unconfirmed,
        Why::CheckFailed,
        Why::ReplicasServe,
        Why::ReplicationLag,
    ];

    pub(crate) fn text(self) -> &'static str {
        match self {
            Why::None => "",
            Why::NoAnswer => "no answer",
            Why::Role => "role",
            Why::StaleTimeline => "stale timeline",
            Why::SplitBrain => "several primaries",
            Why::Unconfirmed => "role not confirmed yet",
            Why::CheckFailed => "check fails",
            Why::ReplicasServe => "replicas serve",
            Why::ReplicationLag => "replication lag",
        }
    }

    pub(crate) fn code(self) -> u64 {
        Why::ALL.iter().position(|w| *w == self).unwrap_or(0) as u64
    }
}

/// One server's standing in one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) eligible: bool,
    pub(crate) state: State,
    pub(crate) why: Why,
}

impl Standing {
    fn excluded(state: State, why: Why) -> Standing {
        Standing {
            eligible: false,
            state,
            why,
        }
    }

    fn eligible(check_error: bool) -> Standing {
        Standing {
            eligible: true,
            state: if check_error {
                State::CheckError
            } else {
                State::Up
            },
            why: if check_error {
                Why::CheckFailed
            } else {
                Why::None
            },
        }
    }
}

/// What a pool asks of its servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rules {
    pub(crate) want: Want,
    /// The most replication lag a replica may have, in bytes (replica and
    /// prefer-replica pools only).
    pub(crate) max_lag: Option<u64>,
}

impl Rules {
    /// Whether a replica lagging `lag` bytes is over the limit, given
    /// whether it was last time: it leaves past the limit and comes back
    /// at 3/4 of it.
    pub(crate) fn lagging(&self, lag: Option<u64>, was_lagging: bool) -> bool {
        let (Some(max), Some(lag)) = (self.max_lag, lag) else {
            return false;
        };
        if !matches!(self.want, Want::Replica | Want::PreferReplica) {
            return false;
        }
        if was_lagging {
            lag > back_at(max)
        } else {
            lag > max
        }
    }
}

/// The lag at which a lagging replica takes relays again: 3/4 of the
/// limit.
pub(crate) fn back_at(max_lag: u64) -> u64 {
    max_lag - max_lag / 4
}

/// The standing of each server (`facts` in member order) for `rules`;
/// `was_lagging` (same order; missing entries are `false`) says which ones
/// the pool judged `Lagging` last time.
pub(crate) fn standings(rules: Rules, facts: &[Facts], was_lagging: &[bool]) -> Vec<Standing> {
    let want = rules.want;
    let confirms = |f: &Facts, role: Role| f.up && f.reported.is_some_and(|r| r.confirms(role));
    let mut out: Vec<Standing> = facts
        .iter()
        .map(|f| {
            if !f.up {
                return Standing::excluded(State::Down, Why::NoAnswer);
            }
            if want == Want::Any {
                return Standing::eligible(f.check_error);
            }
            match f.reported {
                None if f.check_error => Standing::excluded(State::CheckError, Why::CheckFailed),
                None => Standing::excluded(State::Unknown, Why::Unconfirmed),
                Some(r) => {
                    let fits = match want {
                        Want::Primary => r.confirms(Role::Primary),
                        Want::Replica => r.confirms(Role::Replica),
                        _ => r == Reported::Is(Role::Primary) || r == Reported::Is(Role::Replica),
                    };
                    if fits {
                        Standing::eligible(f.check_error)
                    } else {
                        Standing::excluded(State::WrongRole, Why::Role)
                    }
                }
            }
        })
        .collect();
    if want == Want::Any {
        return out;
    }
    // At most one primary.
    let primaries: Vec<usize> = (0..facts.len())
        .filter(|&i| out[i].eligible && confirms(&facts[i], Role::Primary))
        .collect();
    if primaries.len() > 1 {
        let top = primaries.iter().filter_map(|&i| facts[i].timeline).max();
        let at_top: Vec<usize> = primaries
            .iter()
            .copied()
            .filter(|&i| top.is_some() && facts[i].timeline == top)
            .collect();
        let keep = (at_top.len() == 1).then(|| at_top[0]);
        for &i in &primaries {
            if Some(i) != keep {
                let why = if keep.is_some() {
                    Why::StaleTimeline
                } else {
                    Why::SplitBrain
                };
                out[i] = Standing::excluded(State::WrongRole, why);
            }
        }
    }
    for (i, f) in facts.iter().enumerate() {
        let was = was_lagging.get(i).copied().unwrap_or(false);
        if out[i].eligible && confirms(f, Role::Replica) && rules.lagging(f.lag, was) {
            out[i] = Standing::excluded(State::Lagging, Why::ReplicationLag);
        }
    }
    if want == Want::PreferReplica {
        let replicas =
            (0..facts.len()).any(|i| out[i].eligible && confirms(&facts[i], Role::Replica));
        if replicas {
            for i in 0..facts.len() {
                if out[i].eligible && confirms(&facts[i], Role::Primary) {
                    out[i] = Standing::excluded(State::Standby, Why::ReplicasServe);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(role: Role, timeline: Option<u32>) -> Facts {
        Facts {
            up: true,
            reported: Some(Reported::Is(role)),
            answered: true,
            check_error: false,
            timeline,
            last_check: None,
            lag: None,
        }
    }

    const FRESH: Facts = Facts {
        up: true,
        reported: None,
        answered: false,
        check_error: false,
        timeline: None,
        last_check: None,
        lag: None,
    };

    /// `standings` for a pool without `max-lag`.
    fn standings(want: Want, facts: &[Facts]) -> Vec<Standing> {
        super::standings(
            Rules {
                want,
                max_lag: None,
            },
            facts,
            &[],
        )
    }

    fn eligible(want: Want, facts: &[Facts]) -> Vec<bool> {
        standings(want, facts).iter().map(|s| s.eligible).collect()
    }

    #[test]
    fn a_role_pool_fails_closed_until_an_answer_confirms() {
        assert_eq!(eligible(Want::Primary, &[FRESH]), [false]);
        assert_eq!(standings(Want::Primary, &[FRESH])[0].state, State::Unknown);
        assert_eq!(eligible(Want::Any, &[FRESH]), [true]);
        let broken = Facts {
            check_error: true,
            ..FRESH
        };
        assert_eq!(
            standings(Want::Primary, &[broken])[0],
            Standing::excluded(State::CheckError, Why::CheckFailed)
        );
    }

    #[test]
    fn a_check_error_keeps_the_confirmed_state() {
        let p = Facts {
            check_error: true,
            ..answered(Role::Primary, None)
        };
        let s = standings(Want::Primary, &[p])[0];
        assert!(s.eligible);
        assert_eq!(s.state, State::CheckError);
    }

    #[test]
    fn a_role_answer_excludes_at_once() {
        let r = answered(Role::Replica, None);
        assert_eq!(eligible(Want::Primary, &[r]), [false]);
        assert_eq!(standings(Want::Primary, &[r])[0].state, State::WrongRole);
        assert_eq!(eligible(Want::Replica, &[r]), [true]);
        let not_primary = Facts {
            reported: Some(Reported::Not(Role::Primary)),
            ..FRESH
        };
        assert_eq!(eligible(Want::Primary, &[not_primary]), [false]);
    }

    #[test]
    fn two_primaries_without_timelines_take_nothing() {
        let a = answered(Role::Primary, None);
        let s = standings(Want::Primary, &[a, a, answered(Role::Replica, None)]);
        assert!(s.iter().all(|s| !s.eligible));
        assert_eq!(s[0].why, Why::SplitBrain);
        assert_eq!(s[2].why, Why::Role);
    }

    #[test]
    fn the_highest_timeline_is_the_primary() {
        let old = answered(Role::Primary, Some(1));
        let new = answered(Role::Primary, Some(2));
        let s = standings(Want::Primary, &[old, new]);
        assert_eq!(eligible(Want::Primary, &[old, new]), [false, true]);
        assert_eq!(s[0].why, Why::StaleTimeline);
        // A tie is no answer.
        assert_eq!(eligible(Want::Primary, &[new, new]), [false, false]);
        // One timeline unknown: the known highest is still unique.
        assert_eq!(
            eligible(Want::Primary, &[answered(Role::Primary, None), new]),
            [false, true]
        );
    }

    #[test]
    fn a_down_primary_is_not_counted_against_the_other() {
        let gone = Facts {
            up: false,
            ..answered(Role::Primary, Some(3))
        };
        let new = answered(Role::Primary, Some(2));
        assert_eq!(eligible(Want::Primary, &[gone, new]), [false, true]);
    }

    #[test]
    fn prefer_replica_falls_back_to_the_primary() {
        let p = answered(Role::Primary, None);
        let r = answered(Role::Replica, None);
        assert_eq!(eligible(Want::PreferReplica, &[p, r]), [false, true]);
        assert_eq!(
            standings(Want::PreferReplica, &[p, r])[0].state,
            State::Standby
        );
        let r_down = Facts { up: false, ..r };
        assert_eq!(eligible(Want::PreferReplica, &[p, r_down]), [true, false]);
        assert_eq!(eligible(Want::PreferReplica, &[p, p]), [false, false]);
    }

    // Tests for replication lag (`max-lag`)

    const MB: u64 = 1 << 20;

    fn lagging_by(lag: u64) -> Facts {
        Facts {
            lag: Some(lag),
            ..answered(Role::Replica, None)
        }
    }

    fn with_limit(want: Want, max: u64) -> Rules {
        Rules {
            want,
            max_lag: Some(max),
        }
    }

    #[test]
    fn a_replica_past_max_lag_is_lagging_and_the_others_serve() {
        let rules = with_limit(Want::Replica, 16 * MB);
        let s = super::standings(rules, &[lagging_by(17 * MB), lagging_by(MB)], &[]);
        assert_eq!(
            s[0],
            Standing::excluded(State::Lagging, Why::ReplicationLag)
        );
        assert!(s[1].eligible);
        // At the limit exactly: still serving.
        assert!(super::standings(rules, &[lagging_by(16 * MB)], &[])[0].eligible);
        // Unmeasured: judged by its role alone.
        assert!(super::standings(rules, &[answered(Role::Replica, None)], &[])[0].eligible);
    }

    #[test]
    fn a_lagging_replica_comes_back_at_three_quarters_of_the_limit() {
        let rules = with_limit(Want::Replica, 16 * MB);
        let judge = |lag: u64, was: bool| super::standings(rules, &[lagging_by(lag)], &[was])[0];
        assert_eq!(judge(15 * MB, true).state, State::Lagging);
        assert_eq!(judge(12 * MB + 1, true).state, State::Lagging);
        assert!(judge(12 * MB, true).eligible);
        assert!(judge(15 * MB, false).eligible);
        assert_eq!(back_at(4), 3);
        assert_eq!(back_at(1), 1);
    }

    #[test]
    fn prefer_replica_with_every_replica_lagging_takes_the_primary() {
        let rules = with_limit(Want::PreferReplica, MB);
        let p = answered(Role::Primary, None);
        let s = super::standings(rules, &[p, lagging_by(2 * MB)], &[]);
        assert!(s[0].eligible, "{s:?}");
        assert_eq!(s[1].state, State::Lagging);
        let s = super::standings(rules, &[p, lagging_by(2 * MB), lagging_by(0)], &[]);
        assert_eq!(s[0].state, State::Standby);
        assert!(s[2].eligible);
    }

    #[test]
    fn max_lag_means_nothing_to_primary_and_any_pools() {
        for want in [Want::Primary, Want::Any] {
            let f = Facts {
                lag: Some(u64::MAX),
                ..answered(Role::Primary, None)
            };
            let s = super::standings(with_limit(want, 1), &[f], &[true]);
            assert!(s[0].eligible);
        }
    }

    fn any_facts() -> impl proptest::strategy::Strategy<Value = Facts> {
        use proptest::prelude::*;
        (
            any::<bool>(),
            prop_oneof![
                Just(None),
                Just(Some(Reported::Is(Role::Primary))),
                Just(Some(Reported::Is(Role::Replica))),
                Just(Some(Reported::Not(Role::Primary))),
            ],
            any::<bool>(),
            proptest::option::of(0u32..3),
            proptest::option::of(0u64..64),
        )
            .prop_map(|(up, reported, check_error, timeline, lag)| Facts {
                up,
                reported,
                answered: reported.is_some(),
                check_error,
                timeline,
                last_check: None,
                lag,
            })
    }

    fn any_want() -> impl proptest::strategy::Strategy<Value = Want> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Want::Any),
            Just(Want::Primary),
            Just(Want::Replica),
            Just(Want::PreferReplica),
        ]
    }

    proptest::proptest! {
        #[test]
        fn lag_rules_hold_for_any_fleet(
            want in any_want(),
            max in proptest::option::of(1u64..48),
            facts in proptest::collection::vec(any_facts(), 0..6),
            was in proptest::collection::vec(proptest::prelude::any::<bool>(), 0..6),
        ) {
            let rules = Rules { want, max_lag: max };
            let out = super::standings(rules, &facts, &was);
            let plain = super::standings(Rules { want, max_lag: None }, &facts, &[]);
            for (i, (s, f)) in out.iter().zip(&facts).enumerate() {
                let was_i = was.get(i).copied().unwrap_or(false);
                // Never eligible while lagging.
                if s.state == State::Lagging {
                    proptest::prop_assert!(!s.eligible);
                    proptest::prop_assert_eq!(s.why, Why::ReplicationLag);
                    // Only a confirmed replica, over the limit (or, having
                    // been over it, still above 3/4 of it).
                    proptest::prop_assert_eq!(f.reported, Some(Reported::Is(Role::Replica)));
                    let (lag, max) = (f.lag.unwrap(), max.unwrap());
                    let bar = if was_i { back_at(max) } else { max };
                    proptest::prop_assert!(lag > bar, "lag {} bar {}", lag, bar);
                }
                // A primary is never lagging.
                if f.reported == Some(Reported::Is(Role::Primary)) {
                    proptest::prop_assert_ne!(s.state, State::Lagging);
                }
                // Hysteresis: under the limit but above 3/4, the last
                // decision stands.
                if s.eligible && plain[i].eligible && f.reported == Some(Reported::Is(Role::Replica)) {
                    if let (Some(lag), Some(max)) = (f.lag, max) {
                        if matches!(want, Want::Replica | Want::PreferReplica) {
                            let bar = if was_i { back_at(max) } else { max };
                            proptest::prop_assert!(lag <= bar, "lag {} bar {}", lag, bar);
                        }
                    }
                }
                // Lag only ever takes servers out, never brings one in
                // (the primary a prefer-replica pool falls back to aside).
                if s.eligible && !plain[i].eligible {
                    proptest::prop_assert_eq!(want, Want::PreferReplica);
                    proptest::prop_assert_eq!(plain[i].state, State::Standby);
                }
            }
        }
    }

    #[test]
    fn the_stats_file_names_match_the_codes() {
        for s in State::ALL {
            assert_eq!(crate::shm::STATES[s.code() as usize], s.name());
        }
        for w in Why::ALL {
            assert_eq!(crate::shm::REASONS[w.code() as usize], w.text());
        }
    }
}
