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
//!   (and its eligibility), shown as `CheckError`.

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
}

impl State {
    pub(crate) const ALL: [State; 6] = [
        State::Up,
        State::Down,
        State::WrongRole,
        State::CheckError,
        State::Unknown,
        State::Standby,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::WrongRole => "wrong-role",
            State::CheckError => "check-error",
            State::Unknown => "unknown",
            State::Standby => "standby",
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
}

impl Why {
    pub(crate) const ALL: [Why; 8] = [
        Why::None,
        Why::NoAnswer,
        Why::Role,
        Why::StaleTimeline,
        Why::SplitBrain,
        Why::Unconfirmed,
        Why::CheckFailed,
        Why::ReplicasServe,
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

/// The standing of each server (`facts` in member order) for `want`.
pub(crate) fn standings(want: Want, facts: &[Facts]) -> Vec<Standing> {
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
        }
    }

    const FRESH: Facts = Facts {
        up: true,
        reported: None,
        answered: false,
        check_error: false,
        timeline: None,
        last_check: None,
    };

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
