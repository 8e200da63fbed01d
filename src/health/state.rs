//! One server's health: what its answers said (its role, at once), and
//! whether it answers at all (rise/fall over probes that got no answer and
//! passive connect failures), and when a down server may be tried again.
//!
//! Pure: every input carries `now`. A server starts reachable (a fresh
//! proxy should not refuse everything until the first checks rose), but
//! with no confirmed role: a pool that wants a role takes it only once an
//! answer confirmed it. An answer applies at once: a server that says "I
//! am a replica" is one from that probe on. `fall` consecutive failures to
//! answer, active or passive, take it down; `rise` consecutive answers
//! bring it back. A check error (the check's own login refused) changes
//! neither: the last confirmed state and role stand, flagged. Without
//! active checks a down server comes back through trial connects:
//! [`HealthState::take_trial`] allows one per backoff step
//! (`backoff_base`, doubling, capped at `backoff_max`), and a trial that
//! connects brings the server up at once, since a real client was just
//! served.

use std::time::{Duration, Instant};

use super::{Role, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthParams {
    /// Consecutive good verdicts that bring a down server up (≥ 1).
    pub rise: u32,
    /// Consecutive failures that take an up server down (≥ 1).
    pub fall: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for HealthParams {
    fn default() -> Self {
        HealthParams {
            rise: 2,
            fall: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the last answer said of the server's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reported {
    /// It is in this role.
    Is(Role),
    /// It is not in this role (an HTTP agent's 503 on a role path).
    Not(Role),
}

impl Reported {
    /// Whether the answer confirms `role`.
    pub fn confirms(self, role: Role) -> bool {
        self == Reported::Is(role)
    }

    /// The role, when the answer named one.
    pub fn role(self) -> Option<Role> {
        match self {
            Reported::Is(r) => Some(r),
            Reported::Not(_) => None,
        }
    }
}

/// A change of state, to log and count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Up {
        role: Option<Role>,
    },
    Down {
        reason: String,
    },
    /// An answer reported another role than the last one.
    Role {
        from: Option<Reported>,
        to: Reported,
    },
    /// The check itself failed (or failed differently than before).
    CheckError {
        reason: String,
    },
    /// The check works again.
    CheckOk,
}

/// What a live upgrade carries of one server's health to the new process:
/// whether it is up, the last answer's role (and a primary's timeline),
/// and a check error in force. Only what an answer said: a role no answer
/// confirmed is never carried, since none is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carried {
    pub up: bool,
    pub reported: Option<Reported>,
    pub timeline: Option<u32>,
    /// The server answered a probe at least once.
    pub answered: bool,
    /// An active probe judged it at least once.
    pub probed: bool,
    pub check_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct HealthState {
    params: HealthParams,
    up: bool,
    /// Consecutive good verdicts while down.
    rises: u32,
    /// Consecutive failures while up.
    falls: u32,
    /// What the last answer that reported a role said.
    reported: Option<Reported>,
    /// A primary's timeline, from its last answer.
    timeline: Option<u32>,
    /// The server answered a probe at least once.
    answered: bool,
    /// An active probe judged it at least once.
    probed: bool,
    /// The check's own failure, while it lasts.
    check_error: Option<String>,
    last_reason: Option<String>,
    since: Instant,
    /// When the last probe ended, whatever it said.
    last_check: Option<Instant>,
    /// While down: failed trials so far, and when the next may start.
    backoff_steps: u32,
    retry_at: Option<Instant>,
}

impl HealthState {
    pub fn new(params: HealthParams, now: Instant) -> Self {
        HealthState {
            params: Self::sane(params),
            up: true,
            rises: 0,
            falls: 0,
            reported: None,
            timeline: None,
            answered: false,
            probed: false,
            check_error: None,
            last_reason: None,
            since: now,
            last_check: None,
            backoff_steps: 0,
            retry_at: None,
        }
    }

    /// The state a live upgrade's new process starts a server in: what
    /// the old process last knew of it. A server it had down stays down
    /// (tried again after one backoff step, or brought back by its probes),
    /// one with a check error keeps it flagged, and the role is the last
    /// answer's. The next probe's verdict carries on from there.
    pub fn seeded(params: HealthParams, carried: &Carried, now: Instant) -> Self {
        let mut h = HealthState::new(params, now);
        h.up = carried.up;
        h.reported = carried.reported;
        h.timeline = carried.timeline;
        h.answered = carried.answered;
        h.probed = carried.probed;
        h.check_error = carried.check_error.clone();
        h.last_reason = carried.check_error.clone();
        if !h.up {
            h.retry_at = Some(now + h.step());
        }
        h
    }

    /// What a live upgrade carries of this state (see [`Carried`]).
    pub fn carried(&self) -> Carried {
        Carried {
            up: self.up,
            reported: self.reported,
            timeline: self.timeline,
            answered: self.answered,
            probed: self.probed,
            check_error: self.check_error.clone(),
        }
    }

    fn sane(params: HealthParams) -> HealthParams {
        HealthParams {
            rise: params.rise.max(1),
            fall: params.fall.max(1),
            ..params
        }
    }

    /// New rise/fall and backoff settings (a reload); counts so far stay.
    pub fn set_params(&mut self, params: HealthParams) {
        self.params = Self::sane(params);
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The role of the last answer that named one.
    pub fn role(&self) -> Option<Role> {
        self.reported.and_then(Reported::role)
    }

    /// What the last answer said of the role.
    pub fn reported(&self) -> Option<Reported> {
        self.reported
    }

    /// A primary's timeline from its last answer.
    pub fn timeline(&self) -> Option<u32> {
        self.timeline
    }

    /// The server answered a probe at least once.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// The check's own failure, while it lasts.
    pub fn check_error(&self) -> Option<&str> {
        self.check_error.as_deref()
    }

    /// When the last probe ended.
    pub fn last_check(&self) -> Option<Instant> {
        self.last_check
    }

    /// Why the last failure failed (kept after recovery, for status pages).
    pub fn last_reason(&self) -> Option<&str> {
        self.last_reason.as_deref()
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// An active probe's verdict, with the timeline its answer gave. The
    /// first verdict of all counts `fall` times: a server found dead at
    /// start is down at once.
    pub fn observe(&mut self, verdict: &Verdict, now: Instant) -> Vec<Transition> {
        self.last_check = Some(now);
        let first = !std::mem::replace(&mut self.probed, true);
        let mut out = Vec::new();
        if (verdict.answered() || matches!(verdict, Verdict::Down { .. }))
            && self.check_error.take().is_some()
        {
            out.push(Transition::CheckOk);
        }
        match verdict {
            Verdict::Up { role } => {
                self.answered = true;
                if let Some(r) = role {
                    self.report(Reported::Is(*r), &mut out);
                }
                out.extend(self.good(now, false));
            }
            Verdict::NotRole { role } => {
                self.answered = true;
                self.report(Reported::Not(*role), &mut out);
                out.extend(self.good(now, false));
            }
            Verdict::Down { reason } => {
                let repeat = if first { self.params.fall } else { 1 };
                for _ in 0..repeat {
                    out.extend(self.bad(reason, now));
                }
            }
            Verdict::CheckError { reason } => {
                self.last_reason = Some(reason.clone());
                if self.check_error.as_deref() != Some(reason) {
                    self.check_error = Some(reason.clone());
                    out.push(Transition::CheckError {
                        reason: reason.clone(),
                    });
                }
            }
        }
        out
    }

    /// The timeline a primary's answer gave (none for other answers).
    pub fn set_timeline(&mut self, timeline: Option<u32>) {
        self.timeline = timeline;
    }

    fn report(&mut self, to: Reported, out: &mut Vec<Transition>) {
        let from = self.reported.replace(to);
        if from != Some(to) {
            out.push(Transition::Role { from, to });
        }
    }

    /// A client connect to this server failed (passive health).
    pub fn connect_failed(&mut self, reason: &str, now: Instant) -> Option<Transition> {
        self.bad(reason, now)
    }

    /// A client connect to this server succeeded (passive health).
    pub fn connect_ok(&mut self, now: Instant) -> Option<Transition> {
        self.good(now, true)
    }

    /// Up, or down with the backoff step over: may the pool send a
    /// connect to this server now? A down server's answer is consumed: the
    /// next trial waits another step.
    pub fn take_trial(&mut self, now: Instant) -> bool {
        if self.up {
            return true;
        }
        match self.retry_at {
            Some(at) if now >= at => {
                self.retry_at = Some(now + self.step());
                true
            }
            _ => false,
        }
    }

    /// When a down server may next be tried.
    pub fn retry_at(&self) -> Option<Instant> {
        if self.up {
            None
        } else {
            self.retry_at
        }
    }

    fn step(&self) -> Duration {
        let factor = 1u32.checked_shl(self.backoff_steps).unwrap_or(u32::MAX);
        self.params
            .backoff_base
            .saturating_mul(factor)
            .min(self.params.backoff_max)
    }

    fn good(&mut self, now: Instant, passive: bool) -> Option<Transition> {
        self.falls = 0;
        if self.up {
            return None;
        }
        self.rises += 1;
        if passive || self.rises >= self.params.rise {
            self.up = true;
            self.rises = 0;
            self.since = now;
            self.backoff_steps = 0;
            self.retry_at = None;
            return Some(Transition::Up { role: self.role() });
        }
        None
    }

    fn bad(&mut self, reason: &str, now: Instant) -> Option<Transition> {
        self.last_reason = Some(reason.to_string());
        self.rises = 0;
        if !self.up {
            self.backoff_steps = self.backoff_steps.saturating_add(1);
            self.retry_at = Some(now + self.step());
            return None;
        }
        self.falls += 1;
        if self.falls < self.params.fall {
            return None;
        }
        self.up = false;
        self.falls = 0;
        self.since = now;
        self.backoff_steps = 0;
        self.retry_at = Some(now + self.step());
        Some(Transition::Down {
            reason: reason.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
