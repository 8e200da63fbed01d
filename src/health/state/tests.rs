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

/// The up/down transition a verdict caused, if any.
fn obs(h: &mut HealthState, v: &Verdict, now: Instant) -> Option<Transition> {
    h.observe(v, now)
        .into_iter()
        .find(|t| matches!(t, Transition::Up { .. } | Transition::Down { .. }))
}

/// A state whose first probe answered (the first verdict of all is
/// special: see `first_failure_counts_fall_times`).
fn probed(params: HealthParams, now: Instant) -> HealthState {
    let mut h = HealthState::new(params, now);
    h.observe(&UP, now);
    h
}

#[test]
fn first_failure_counts_fall_times() {
    let t0 = Instant::now();
    let mut h = HealthState::new(params(2, 3), t0);
    assert!(matches!(
        obs(&mut h, &down("refused"), t0),
        Some(Transition::Down { .. })
    ));
}

#[test]
fn a_role_answer_applies_at_once_and_a_check_error_keeps_it() {
    let t0 = Instant::now();
    let mut h = probed(params(2, 3), t0);
    let replica = Verdict::Up {
        role: Some(Role::Replica),
    };
    assert_eq!(
        h.observe(&replica, t0),
        vec![Transition::Role {
            from: None,
            to: Reported::Is(Role::Replica)
        }]
    );
    assert!(h.answered());
    let broken = Verdict::check_error("28P01");
    assert_eq!(
        h.observe(&broken, t0),
        vec![Transition::CheckError {
            reason: "28P01".into()
        }]
    );
    assert_eq!(h.observe(&broken, t0), vec![], "reported once");
    assert!(h.is_up());
    assert_eq!(h.reported(), Some(Reported::Is(Role::Replica)));
    assert_eq!(h.check_error(), Some("28P01"));
    assert_eq!(h.observe(&replica, t0), vec![Transition::CheckOk]);
    assert_eq!(
        h.observe(
            &Verdict::NotRole {
                role: Role::Primary
            },
            t0
        ),
        vec![Transition::Role {
            from: Some(Reported::Is(Role::Replica)),
            to: Reported::Not(Role::Primary)
        }]
    );
    // Failures to answer still wait for `fall`.
    assert_eq!(obs(&mut h, &down("timeout"), t0), None);
}

/// A state that went down at `t0` after `fall` failures.
fn downed(rise: u32, fall: u32, t0: Instant) -> HealthState {
    let mut h = probed(params(rise, fall), t0);
    for _ in 0..fall {
        obs(&mut h, &down("refused"), t0);
    }
    assert!(!h.is_up());
    h
}

// Tests for the Up state

#[test]
fn up_starts_up_without_a_reason() {
    let t0 = Instant::now();
    let h = probed(params(2, 3), t0);
    assert!(h.is_up());
    assert_eq!(h.last_reason(), None);
    assert_eq!(h.retry_at(), None);
    assert_eq!(h.since(), t0);
}

#[test]
fn up_goes_down_after_fall_consecutive_failures() {
    let t0 = Instant::now();
    let mut h = probed(params(2, 3), t0);
    assert_eq!(obs(&mut h, &down("a"), t0), None);
    assert_eq!(obs(&mut h, &down("b"), t0), None);
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(
        obs(&mut h, &down("c"), t1),
        Some(Transition::Down { reason: "c".into() })
    );
    assert!(!h.is_up());
    assert_eq!(h.since(), t1);
    assert_eq!(h.last_reason(), Some("c"));
}

#[test]
fn up_a_good_verdict_resets_the_fall_count() {
    let t0 = Instant::now();
    let mut h = probed(params(2, 2), t0);
    obs(&mut h, &down("a"), t0);
    assert_eq!(obs(&mut h, &UP, t0), None);
    assert_eq!(obs(&mut h, &down("b"), t0), None, "the count started again");
    assert!(h.is_up());
}

#[test]
fn up_passive_failures_count_like_active_ones() {
    let t0 = Instant::now();
    let mut h = probed(params(2, 2), t0);
    assert_eq!(h.connect_failed("connection refused", t0), None);
    assert!(obs(&mut h, &down("timeout"), t0).is_some());
}

#[test]
fn up_a_connect_success_resets_the_fall_count() {
    let t0 = Instant::now();
    let mut h = probed(params(2, 2), t0);
    h.connect_failed("refused", t0);
    assert_eq!(h.connect_ok(t0), None);
    assert_eq!(h.connect_failed("refused", t0), None);
}

#[test]
fn up_a_zero_fall_is_taken_as_one() {
    let t0 = Instant::now();
    let mut h = probed(params(0, 0), t0);
    assert!(h.connect_failed("refused", t0).is_some());
}

#[test]
fn up_always_allows_a_trial() {
    let t0 = Instant::now();
    let mut h = probed(params(2, 2), t0);
    assert!(h.take_trial(t0));
    assert!(h.take_trial(t0));
}

#[test]
fn up_remembers_the_reported_role() {
    let t0 = Instant::now();
    let mut h = probed(params(1, 1), t0);
    obs(
        &mut h,
        &Verdict::Up {
            role: Some(Role::Replica),
        },
        t0,
    );
    assert_eq!(h.role(), Some(Role::Replica));
    obs(&mut h, &UP, t0);
    assert_eq!(h.role(), Some(Role::Replica), "no role reported: kept");
}

// Tests for the Down state

#[test]
fn down_rises_after_rise_consecutive_good_verdicts() {
    let t0 = Instant::now();
    let mut h = downed(2, 1, t0);
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(obs(&mut h, &UP, t1), None);
    let up = Verdict::Up {
        role: Some(Role::Primary),
    };
    assert_eq!(
        obs(&mut h, &up, t1),
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
    obs(&mut h, &UP, t0);
    obs(&mut h, &down("again"), t0);
    assert_eq!(obs(&mut h, &UP, t0), None);
    assert!(!h.is_up());
    assert_eq!(h.last_reason(), Some("again"));
}

#[test]
fn down_failures_report_no_new_transition() {
    let t0 = Instant::now();
    let mut h = downed(2, 1, t0);
    assert_eq!(obs(&mut h, &down("x"), t0), None);
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
    obs(&mut h, &UP, t0);
    obs(&mut h, &down("again"), t0);
    assert_eq!(h.retry_at(), Some(t0 + Duration::from_millis(100)));
}

#[test]
fn a_seeded_state_is_what_the_old_process_last_knew() {
    let t0 = Instant::now();
    let p = params(2, 2);
    // A confirmed primary, carried over: the role stands at once.
    let mut old = probed(p, t0);
    old.observe(
        &Verdict::Up {
            role: Some(Role::Primary),
        },
        t0,
    );
    old.set_timeline(Some(7));
    let h = HealthState::seeded(p, &old.carried(), t0);
    assert!(h.is_up());
    assert_eq!(h.reported(), Some(Reported::Is(Role::Primary)));
    assert_eq!(h.timeline(), Some(7));
    assert!(h.answered());
    assert_eq!(h.carried(), old.carried());
    // Its first failure is one of `fall`, not a failure at start.
    let mut h = h;
    assert_eq!(obs(&mut h, &down("refused"), t0), None);
    assert!(h.is_up());

    // A fresh server, never answered: no role is made up.
    let fresh = HealthState::new(p, t0);
    let h = HealthState::seeded(p, &fresh.carried(), t0);
    assert!(h.is_up());
    assert_eq!(h.role(), None);
    assert!(!h.answered());
}

#[test]
fn a_seeded_down_or_erring_server_stays_so() {
    let t0 = Instant::now();
    let p = params(2, 1);
    let mut old = probed(p, t0);
    old.observe(
        &Verdict::Up {
            role: Some(Role::Primary),
        },
        t0,
    );
    obs(&mut old, &down("refused"), t0);
    assert!(!old.is_up());
    let mut h = HealthState::seeded(p, &old.carried(), t0);
    assert!(!h.is_up(), "down stays down");
    assert_eq!(h.reported(), Some(Reported::Is(Role::Primary)));
    // Tried again only after a backoff step.
    assert!(!h.take_trial(t0));
    assert!(h.take_trial(t0 + Duration::from_millis(100)));
    // Back only through `rise` good answers, as in the old process.
    assert_eq!(obs(&mut h, &UP, t0), None);
    assert!(matches!(obs(&mut h, &UP, t0), Some(Transition::Up { .. })));

    let mut erring = probed(p, t0);
    erring.observe(
        &Verdict::NotRole {
            role: Role::Primary,
        },
        t0,
    );
    erring.observe(
        &Verdict::CheckError {
            reason: "login refused".into(),
        },
        t0,
    );
    let mut h = HealthState::seeded(p, &erring.carried(), t0);
    assert_eq!(h.check_error(), Some("login refused"));
    assert_eq!(h.reported(), Some(Reported::Not(Role::Primary)));
    assert_eq!(h.role(), None);
    // The same error again is no new transition; an answer clears it.
    assert!(h
        .observe(
            &Verdict::CheckError {
                reason: "login refused".into()
            },
            t0
        )
        .is_empty());
    assert!(h.observe(&UP, t0).contains(&Transition::CheckOk));
}
