//! The pick, roles and the fleet, and pools that a reload replaces.

use super::*;
use crate::health::Verdict;

fn member(port: u16, weight: u32, backup: bool) -> Member {
    Member {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        weight,
        backup,
        check_port: None,
    }
}

fn pool_in(
    fleet: &Arc<Fleet>,
    registry: &Arc<ServerRegistry>,
    config: &PoolConfig,
    members: &[Member],
) -> Arc<Pool> {
    let p = Pool::new("test", None, config, Arc::clone(registry), fleet);
    p.set_members(members.to_vec());
    p
}

/// A pool of its own: a fleet and counters no other pool shares.
fn lone(config: &PoolConfig, members: &[Member]) -> Arc<Pool> {
    pool_in(
        &Fleet::new(),
        &Arc::new(ServerRegistry::new(None, 1)),
        config,
        members,
    )
}

// The pick

fn pool(balance: Balance, members: &[(u16, u32, bool)]) -> Arc<Pool> {
    let mut config = PoolConfig::new(Vec::new());
    config.balance = balance;
    config.health.fall = 1;
    let members: Vec<Member> = members.iter().map(|&(p, w, b)| member(p, w, b)).collect();
    lone(&config, &members)
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

fn port(l: Option<Lease>) -> u16 {
    l.expect("a server").server.addr.port()
}

#[test]
fn backups_serve_only_when_no_primary_can() {
    let p = pool(Balance::RoundRobin, &[(1, 1, false), (2, 1, true)]);
    let now = Instant::now();
    assert_eq!(port(p.pick(0, CLIENT, &[], now)), 1);
    // The primary failed this relay: its retry goes to the backup.
    let one = [SocketAddr::from(([127, 0, 0, 1], 1))];
    assert_eq!(port(p.pick(0, CLIENT, &one, now)), 2);
    // The primary is down: the backup takes every relay...
    let primary = Arc::clone(&p.members().servers[0]);
    p.failed(&primary, "refused", now);
    assert_eq!(port(p.pick(0, CLIENT, &[], now)), 2);
    // ...until the primary's trial is due, which it gets, and passes.
    let trial = p.pick(0, CLIENT, &[], now + Duration::from_secs(3));
    assert_eq!(port(trial), 1);
    p.succeeded(&primary, now);
    assert_eq!(port(p.pick(0, CLIENT, &[], now)), 1);
}

// Active checks, roles and the fleet

fn checked(check: config::Check, role: config::Role, fall: u32, rise: u32) -> PoolConfig {
    let mut config = PoolConfig::new(Vec::new());
    config.health.fall = fall;
    config.health.rise = rise;
    config.health.check = Some(check);
    config.health.role = role;
    config
}

fn observe(p: &Pool, i: usize, v: Verdict, now: Instant) {
    let s = Arc::clone(&p.members().servers[i]);
    p.fleet.observe(&s.upstream, &v, None, None, now);
}

const PRIMARY: Verdict = Verdict::Up {
    role: Some(Role::Primary),
};
const REPLICA: Verdict = Verdict::Up {
    role: Some(Role::Replica),
};

#[test]
fn a_role_pool_takes_no_server_before_an_answer_confirms_it() {
    let config = checked(config::Check::Redis, config::Role::Primary, 3, 2);
    let p = lone(&config, &[member(1, 1, false), member(2, 1, false)]);
    let now = Instant::now();
    assert!(p.pick(0, CLIENT, &[], now).is_none(), "fail closed");
    observe(&p, 0, REPLICA, now);
    observe(&p, 1, PRIMARY, now);
    for c in 0..4 {
        assert_eq!(port(p.pick(c, CLIENT, &[], now)), 2);
    }
}

#[test]
fn a_role_answer_takes_a_server_out_at_that_probe() {
    let config = checked(config::Check::Redis, config::Role::Primary, 3, 2);
    let fleet = Fleet::new();
    let p = pool_in(
        &fleet,
        &Arc::new(ServerRegistry::new(None, 1)),
        &config,
        &[member(1, 1, false)],
    );
    let now = Instant::now();
    observe(&p, 0, PRIMARY, now);
    let lease = p.pick(0, CLIENT, &[], now).expect("the primary");
    assert!(!lease.doomed(&p));
    let before = fleet.changes();
    observe(&p, 0, REPLICA, now);
    assert!(p.pick(0, CLIENT, &[], now).is_none(), "no fall count");
    assert!(fleet.changes() > before, "workers look for relays to reset");
    assert!(lease.doomed(&p), "its role answer changed");
}

#[test]
fn a_check_error_keeps_the_last_confirmed_state() {
    let config = checked(config::Check::Postgres, config::Role::Primary, 1, 1);
    let p = lone(&config, &[member(1, 1, false)]);
    let now = Instant::now();
    observe(&p, 0, PRIMARY, now);
    let lease = p.pick(0, CLIENT, &[], now).expect("the primary");
    for _ in 0..5 {
        observe(&p, 0, Verdict::check_error("postgres error 28P01"), now);
    }
    assert!(!lease.doomed(&p), "on-down never fires for a check error");
    assert!(p.pick(0, CLIENT, &[], now).is_some(), "still eligible");
    assert_eq!(p.samples()[0].state, State::CheckError);
}

#[test]
fn two_primaries_take_nothing_until_one_remains() {
    let config = checked(config::Check::Redis, config::Role::Primary, 1, 1);
    let p = lone(&config, &[member(1, 1, false), member(2, 1, false)]);
    let now = Instant::now();
    observe(&p, 0, PRIMARY, now);
    observe(&p, 1, PRIMARY, now);
    assert!(p.pick(0, CLIENT, &[], now).is_none());
    observe(&p, 0, REPLICA, now);
    assert_eq!(port(p.pick(0, CLIENT, &[], now)), 2);
}

#[test]
fn a_first_failure_takes_a_server_down_at_once() {
    let config = checked(config::Check::Tcp, config::Role::Any, 3, 1);
    let p = lone(&config, &[member(1, 1, false)]);
    let now = Instant::now();
    observe(&p, 0, Verdict::down("refused"), now);
    assert!(
        p.members().servers[0].is_down(),
        "no fall count for the first verdict"
    );
    observe(&p, 0, Verdict::Up { role: None }, now);
    observe(&p, 0, Verdict::down("again"), now);
    assert!(
        !p.members().servers[0].is_down(),
        "later failures count towards fall"
    );
}

#[test]
fn with_an_active_check_only_rise_good_probes_bring_a_server_back() {
    let config = checked(config::Check::Redis, config::Role::Any, 1, 2);
    let p = lone(&config, &[member(1, 1, false), member(2, 1, false)]);
    let now = Instant::now();
    let first = Arc::clone(&p.members().servers[0]);
    observe(&p, 0, Verdict::Up { role: None }, now);
    p.failed(&first, "refused", now);
    assert!(first.is_down(), "a passive failure counts towards fall");
    p.succeeded(&first, now);
    assert!(first.is_down(), "a connect proves no role");
    observe(&p, 0, Verdict::Up { role: None }, now);
    assert!(first.is_down(), "one of rise = 2");
    observe(&p, 0, Verdict::Up { role: None }, now);
    assert!(!first.is_down());
}

// Reloads: a new pool over the same servers

#[test]
fn a_new_pool_keeps_the_health_and_the_live_relays() {
    let fleet = Fleet::new();
    let registry = Arc::new(ServerRegistry::new(None, 1));
    let mut config = checked(config::Check::Postgres, config::Role::Primary, 2, 2);
    config.balance = Balance::LeastConn;
    let old = pool_in(
        &fleet,
        &registry,
        &config,
        &[member(1, 1, false), member(2, 1, false)],
    );
    let now = Instant::now();
    observe(&old, 0, PRIMARY, now);
    observe(&old, 1, REPLICA, now);
    let leases: Vec<Lease> = (0..3)
        .map(|c| old.pick(c, CLIENT, &[], now).unwrap())
        .collect();
    // A reload: new settings, the same servers.
    config.health.timeout = Duration::from_millis(500);
    config.health.password = Some(config::Secret("rotated".into()));
    let new = pool_in(
        &fleet,
        &registry,
        &config,
        &[member(1, 1, false), member(2, 1, false)],
    );
    assert_eq!(
        port(new.pick(0, CLIENT, &[], now)),
        1,
        "health was kept: no reset to up"
    );
    assert_eq!(
        new.members().servers[0].live(),
        3,
        "relays from before count"
    );
    // The old pool's relays follow the server's live state.
    observe(&new, 0, REPLICA, now);
    assert!(leases.iter().all(|l| l.doomed(&old)));
    assert!(new.pick(0, CLIENT, &[], now).is_none());
}

#[test]
fn pools_of_other_roles_share_one_probe_per_server() {
    let fleet = Fleet::new();
    let registry = Arc::new(ServerRegistry::new(None, 1));
    let rw = pool_in(
        &fleet,
        &registry,
        &checked(config::Check::Redis, config::Role::Primary, 1, 1),
        &[member(1, 1, false)],
    );
    let ro = pool_in(
        &fleet,
        &registry,
        &checked(config::Check::Redis, config::Role::Replica, 1, 1),
        &[member(1, 1, false)],
    );
    assert_eq!(fleet.checked().len(), 1);
    let now = Instant::now();
    observe(&rw, 0, REPLICA, now);
    assert!(rw.pick(0, CLIENT, &[], now).is_none());
    assert_eq!(port(ro.pick(0, CLIENT, &[], now)), 1);
}

#[test]
fn prefer_replica_falls_back_to_the_primary() {
    let config = checked(config::Check::Postgres, config::Role::PreferReplica, 1, 1);
    let p = lone(&config, &[member(1, 1, false), member(2, 1, false)]);
    let now = Instant::now();
    observe(&p, 0, PRIMARY, now);
    observe(&p, 1, REPLICA, now);
    assert_eq!(port(p.pick(0, CLIENT, &[], now)), 2);
    observe(&p, 1, Verdict::down("gone"), now);
    assert_eq!(port(p.pick(0, CLIENT, &[], now)), 1);
}

#[test]
fn membership_changes_keep_state_of_servers_that_stay() {
    let p = pool(Balance::LeastConn, &[(1, 1, false), (2, 1, false)]);
    let lease = p.pick(0, CLIENT, &[], Instant::now()).unwrap();
    let held = lease.server.addr;
    let (added, removed) = p.set_members(vec![member(held.port(), 1, false), member(3, 1, false)]);
    assert_eq!(added.len(), 1);
    assert_eq!(removed.len(), 1);
    let m = p.members();
    let kept = m.servers.iter().find(|s| s.addr == held).unwrap();
    assert_eq!(kept.live(), 1, "the lease still counts");
    drop(lease);
    assert_eq!(kept.live(), 0);
    assert_eq!(p.attempts(), 2);
}

// Replication lag (`max-lag`)

fn position(applied: u64, received: Option<u64>) -> crate::health::lag::Position {
    crate::health::lag::Position {
        stream: 42,
        applied,
        received,
    }
}

fn observe_at(p: &Pool, i: usize, v: Verdict, applied: u64, now: Instant) {
    let s = Arc::clone(&p.members().servers[i]);
    let pos = position(applied, Some(applied));
    p.fleet.observe(&s.upstream, &v, None, Some(pos), now);
}

#[test]
fn a_replica_behind_a_primary_of_another_pool_leaves_and_rejoins_with_hysteresis() {
    let fleet = Fleet::new();
    let registry = Arc::new(ServerRegistry::new(None, 1));
    let writes = pool_in(
        &fleet,
        &registry,
        &checked(config::Check::Postgres, config::Role::Primary, 3, 2),
        &[member(1, 1, false)],
    );
    let mut config = checked(config::Check::Postgres, config::Role::Replica, 3, 2);
    config.health.max_lag = Some(1000);
    let reads = pool_in(
        &fleet,
        &Arc::new(ServerRegistry::new(None, 1)),
        &config,
        &[member(2, 1, false), member(3, 1, false)],
    );
    let t0 = Instant::now();
    observe_at(&reads, 0, REPLICA, 10_000, t0);
    observe_at(&reads, 1, REPLICA, 10_000, t0);
    let lease = reads.pick(0, CLIENT, &[], t0).expect("a replica");
    let on_two = if lease.server.addr.port() == 2 {
        lease
    } else {
        drop(lease);
        reads.pick(1, CLIENT, &[], t0).expect("the other replica")
    };
    assert_eq!(on_two.server.addr.port(), 2);
    // The primary (another pool's) is 5000 bytes ahead of both.
    let before = fleet.changes();
    observe_at(&writes, 0, PRIMARY, 15_000, t0);
    assert!(reads.pick(0, CLIENT, &[], t0).is_none(), "both lag");
    assert!(fleet.changes() > before, "leaving moves the generation");
    assert_eq!(reads.samples()[0].state, State::Lagging);
    assert!(!on_two.doomed(&reads), "its live relays keep running");
    // Replica 3 catches up: it serves, replica 2 does not.
    let t1 = t0 + Duration::from_millis(500);
    observe_at(&reads, 1, REPLICA, 15_000, t1);
    for c in 0..4 {
        assert_eq!(port(reads.pick(c, CLIENT, &[], t1)), 3);
    }
    // Replica 2 under the limit but above 3/4 of it: still out.
    observe_at(&reads, 0, REPLICA, 14_100, t1);
    assert_eq!(reads.samples()[0].state, State::Lagging);
    let before = fleet.changes();
    observe_at(&reads, 0, REPLICA, 14_250, t1);
    assert_eq!(reads.samples()[0].state, State::Up);
    assert!(fleet.changes() > before, "rejoining moves the generation");
    // Now it takes relays until past the limit itself.
    observe_at(&reads, 0, REPLICA, 14_100, t1);
    assert_eq!(reads.samples()[0].state, State::Up);
    let before = fleet.changes();
    observe_at(&reads, 0, REPLICA, 13_999, t1);
    assert_eq!(reads.samples()[0].state, State::Lagging);
    assert!(fleet.changes() > before);
    // The primary pool never sees its primary lagging.
    assert_eq!(writes.samples()[0].state, State::Up);
}

#[test]
fn a_primary_sample_out_of_its_window_gives_way_to_what_the_replica_received() {
    let fleet = Fleet::new();
    let registry = Arc::new(ServerRegistry::new(None, 1));
    let mut config = checked(config::Check::Postgres, config::Role::PreferReplica, 3, 2);
    config.health.max_lag = Some(1000);
    let p = pool_in(
        &fleet,
        &registry,
        &config,
        &[member(1, 1, false), member(2, 1, false)],
    );
    let t0 = Instant::now();
    observe_at(&p, 0, PRIMARY, 1_000_000, t0);
    observe_at(&p, 1, REPLICA, 10_000, t0);
    assert_eq!(p.samples()[1].state, State::Lagging);
    assert_eq!(
        port(p.pick(0, CLIENT, &[], t0)),
        1,
        "prefer-replica falls back"
    );
    // Twice the interval (2 s) later, the primary's old position no
    // longer counts: the replica applied all it received.
    let later = t0 + Duration::from_secs(5);
    observe_at(&p, 1, REPLICA, 10_000, later);
    let lag = p.members().servers[1].upstream.lag().unwrap();
    assert_eq!(lag.bytes, 0);
    assert_eq!(lag.measured, crate::health::lag::Measured::Received);
    assert_eq!(port(p.pick(0, CLIENT, &[], later)), 2);
    // A primary whose last answer is no longer primary counts for nothing.
    observe_at(&p, 0, REPLICA, 1_000_000, later);
    observe_at(&p, 1, REPLICA, 10_000, later);
    assert_eq!(p.members().servers[1].upstream.lag().unwrap().bytes, 0);
}
