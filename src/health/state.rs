//! One server's health: rise/fall over active verdicts and passive connect
//! outcomes, and when a down server may be tried again.
//!
//! Pure: every input carries `now`. A server starts up (a fresh proxy
//! should not refuse everything until the first checks rose). `fall`
//! consecutive failures, active or passive, take it down; `rise`
//! consecutive good verdicts bring it back. Without active checks a down
//! server comes back through trial connects: [`HealthState::take_trial`]
//! allows one per backoff step (`backoff_base`, doubling, capped at
//! `backoff_max`), and a trial that connects brings the server up at once,
//! since a real client was just served.

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

/// A change of state, to log and count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Up { role: Option<Role> },
    Down { reason: String },
}

#[derive(Clone, Debug)]
pub struct HealthState {
    params: HealthParams,
    up: bool,
    /// Consecutive good verdicts while down.
    rises: u32,
    /// Consecutive failures while up.
    falls: u32,
    role: Option<Role>,
    last_reason: Option<String>,
    since: Instant,
    /// While down: failed trials so far, and when the next may start.
    backoff_steps: u32,
    retry_at: Option<Instant>,
}

impl HealthState {
    pub fn new(params: HealthParams, now: Instant) -> Self {
        HealthState {
            params: HealthParams {
                rise: params.rise.max(1),
                fall: params.fall.max(1),
                ..params
            },
            up: true,
            rises: 0,
            falls: 0,
            role: None,
            last_reason: None,
            since: now,
            backoff_steps: 0,
            retry_at: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The role of the last good verdict that reported one.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// Why the last failure failed (kept after recovery, for status pages).
    pub fn last_reason(&self) -> Option<&str> {
        self.last_reason.as_deref()
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// An active probe's verdict.
    pub fn observe(&mut self, verdict: &Verdict, now: Instant) -> Option<Transition> {
        match verdict {
            Verdict::Up { role } => {
                if role.is_some() {
                    self.role = *role;
                }
                self.good(now, false)
            }
            Verdict::Down { reason } => self.bad(reason, now),
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
            return Some(Transition::Up { role: self.role });
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
mod tests {
    use super::*;

    fn params(rise: u32, fall: u32) -> HealthParams {
        HealthParams {
            rise,
            fall,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
        }
    }

    fn down(reason: &str) -> Verdict {
        Verdict::down(reason)
    }

    const UP: Verdict = Verdict::Up { role: None };

    /// A state that went down at `t0` after `fall` failures.
    fn downed(rise: u32, fall: u32, t0: Instant) -> HealthState {
        let mut h = HealthState::new(params(rise, fall), t0);
        for _ in 0..fall {
            h.observe(&down("refused"), t0);
        }
        assert!(!h.is_up());
        h
    }

    // Tests for the Up state

    #[test]
    fn up_starts_up_without_a_reason() {
        let t0 = Instant::now();
        let h = HealthState::new(params(2, 3), t0);
        assert!(h.is_up());
        assert_eq!(h.last_reason(), None);
        assert_eq!(h.retry_at(), None);
        assert_eq!(h.since(), t0);
    }

    #[test]
    fn up_goes_down_after_fall_consecutive_failures() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(2, 3), t0);
        assert_eq!(h.observe(&down("a"), t0), None);
        assert_eq!(h.observe(&down("b"), t0), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            h.observe(&down("c"), t1),
            Some(Transition::Down { reason: "c".into() })
        );
        assert!(!h.is_up());
        assert_eq!(h.since(), t1);
        assert_eq!(h.last_reason(), Some("c"));
    }

    #[test]
    fn up_a_good_verdict_resets_the_fall_count() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(2, 2), t0);
        h.observe(&down("a"), t0);
        assert_eq!(h.observe(&UP, t0), None);
        assert_eq!(h.observe(&down("b"), t0), None, "the count started again");
        assert!(h.is_up());
    }

    #[test]
    fn up_passive_failures_count_like_active_ones() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(2, 2), t0);
        assert_eq!(h.connect_failed("connection refused", t0), None);
        assert!(h.observe(&down("timeout"), t0).is_some());
    }

    #[test]
    fn up_a_connect_success_resets_the_fall_count() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(2, 2), t0);
        h.connect_failed("refused", t0);
        assert_eq!(h.connect_ok(t0), None);
        assert_eq!(h.connect_failed("refused", t0), None);
    }

    #[test]
    fn up_a_zero_fall_is_taken_as_one() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(0, 0), t0);
        assert!(h.connect_failed("refused", t0).is_some());
    }

    #[test]
    fn up_always_allows_a_trial() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(2, 2), t0);
        assert!(h.take_trial(t0));
        assert!(h.take_trial(t0));
    }

    #[test]
    fn up_remembers_the_reported_role() {
        let t0 = Instant::now();
        let mut h = HealthState::new(params(1, 1), t0);
        h.observe(
            &Verdict::Up {
                role: Some(Role::Replica),
            },
            t0,
        );
        assert_eq!(h.role(), Some(Role::Replica));
        h.observe(&UP, t0);
        assert_eq!(h.role(), Some(Role::Replica), "no role reported: kept");
    }

    // Tests for the Down state

    #[test]
    fn down_rises_after_rise_consecutive_good_verdicts() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(h.observe(&UP, t1), None);
        let up = Verdict::Up {
            role: Some(Role::Primary),
        };
        assert_eq!(
            h.observe(&up, t1),
            Some(Transition::Up {
                role: Some(Role::Primary)
            })
        );
        assert!(h.is_up());
        assert_eq!(h.since(), t1);
        assert_eq!(h.retry_at(), None);
        assert_eq!(h.last_reason(), Some("refused"), "kept for status");
    }

    #[test]
    fn down_a_failure_resets_the_rise_count() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        h.observe(&UP, t0);
        h.observe(&down("again"), t0);
        assert_eq!(h.observe(&UP, t0), None);
        assert!(!h.is_up());
        assert_eq!(h.last_reason(), Some("again"));
    }

    #[test]
    fn down_failures_report_no_new_transition() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        assert_eq!(h.observe(&down("x"), t0), None);
        assert_eq!(h.connect_failed("y", t0), None);
    }

    #[test]
    fn down_a_successful_connect_brings_it_up_at_once() {
        let t0 = Instant::now();
        let mut h = downed(5, 1, t0);
        assert_eq!(h.connect_ok(t0), Some(Transition::Up { role: None }));
        assert!(h.is_up());
    }

    // Tests for the backoff of a down server

    #[test]
    fn backoff_first_trial_waits_one_base_step() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        assert_eq!(h.retry_at(), Some(t0 + Duration::from_millis(100)));
        assert!(!h.take_trial(t0 + Duration::from_millis(99)));
        assert!(h.take_trial(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn backoff_one_trial_per_step() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        let t1 = t0 + Duration::from_millis(100);
        assert!(h.take_trial(t1));
        assert!(!h.take_trial(t1), "a second trial waits for the first");
    }

    #[test]
    fn backoff_doubles_per_failed_trial_up_to_the_cap() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        let mut now = t0;
        let mut steps = Vec::new();
        for _ in 0..8 {
            now = h.retry_at().unwrap();
            assert!(h.take_trial(now));
            h.connect_failed("refused", now);
            steps.push((h.retry_at().unwrap() - now).as_millis());
        }
        assert_eq!(steps, [200, 400, 800, 1000, 1000, 1000, 1000, 1000]);
        assert!(!h.take_trial(now));
    }

    #[test]
    fn backoff_never_overflows() {
        let t0 = Instant::now();
        let mut h = downed(2, 1, t0);
        for _ in 0..200 {
            h.connect_failed("refused", t0);
        }
        assert_eq!(h.retry_at(), Some(t0 + Duration::from_millis(1000)));
    }

    #[test]
    fn backoff_starts_over_after_recovery() {
        let t0 = Instant::now();
        let mut h = downed(1, 1, t0);
        for _ in 0..5 {
            h.connect_failed("refused", t0);
        }
        h.observe(&UP, t0);
        h.observe(&down("again"), t0);
        assert_eq!(h.retry_at(), Some(t0 + Duration::from_millis(100)));
    }
}
