//! Live upgrades (`spliced upgrade --name NAME --binary PATH`) in front
//! of a real Redis, once per engine: upgrades that cannot happen leave the
//! process serving as it was, its live relay and its pid file included;
//! upgrades that succeed hand every listening socket to the new process,
//! which serves new clients and answers to the instance's name.
//!
//! Each upgrade runs a fresh copy of the binary and the fixture follows
//! the pid file to the new process ([`Proxy::upgrade_ok`]); every test
//! ends with SIGTERM to the process serving then, exit status 0, and no
//! process of the binaries left.

use std::time::Duration;

use crate::fixture::{free_port, loopback, redis_bin, Binary, Proxy, Redis, RespConn, TempDir};
use crate::relay::{all_closed_clean, listener};

crate::every_engine!(failed_upgrades_keep_serving);

/// No panic in the log; SIGTERM ends the process serving now with exit
/// status 0 and leaves no process of the binaries running.
fn stops_cleanly(mut proxy: Proxy) {
    let panics = proxy.panic_lines();
    assert!(panics.is_empty(), "spliced panicked: {panics:?}");
    let pid = proxy.pid();
    let status = proxy.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "spliced (pid {pid}) after SIGTERM: {status:?} (None: still running after 20 s)"
    );
    assert_eq!(
        proxy.processes(),
        Vec::<i32>::new(),
        "processes of the spliced binaries still running after the stop"
    );
}

/// A Redis client through spliced: which server answered (its port).
fn served(via: std::net::SocketAddr) -> Result<u16, String> {
    RespConn::connect(via, Duration::from_secs(5))
        .and_then(|mut c| c.server_port())
        .map_err(|e| e.to_string())
}

/// Upgrades that cannot happen (no such binary; a program that exits at
/// once without taking over; a config file the new process refuses) exit
/// non-zero with a one-line reason, and the process serving keeps
/// serving, its live relay included, and its pid file; then an
/// upgrade to a new path and one in place succeed with no client, each
/// new process serves new clients, takes the pid file (`spliced reload
/// --name` reaches it) and the stats file (`spliced stats --name`).
fn failed_upgrades_keep_serving(mode: &str) {
    let test = format!("failed_upgrades_keep_serving({mode})");
    let Some(server) = redis_bin(&test) else {
        return;
    };
    let dir = TempDir::new(&format!("e2e-upgrade-failed-{mode}"));
    let redis = Redis::master(&server, &dir, "redis", None);
    let port = free_port();
    let config = listener("redis", port, redis.port, mode, "");
    let mut proxy = Proxy::start_upgradable(&dir, &format!("upgrade-failed-{mode}"), &config);
    let via = loopback(port);
    let mut live = RespConn::connect(via, Duration::from_secs(5)).unwrap();
    assert_eq!(live.server_port().unwrap(), redis.port);
    let first = proxy.pid();

    let broken = "[[listener]]\nname = \"redis\"\n";
    let cases = [
        (Binary::Given(dir.join("no-such-spliced")), None),
        (Binary::Given("/bin/true".into()), None),
        // The new process reads the config file anew, and refuses it.
        (Binary::NewPath, Some(broken)),
    ];
    for (how, toml) in cases {
        if let Some(toml) = toml {
            proxy.write_config(toml);
        }
        let up = proxy.upgrade(how.clone());
        proxy.write_config(&config);
        let case = format!("[{mode}] an upgrade to {how:?} with config {toml:?}");
        assert!(
            up.status.is_some_and(|s| !s.success()),
            "{case} exits non-zero: {}",
            up.show()
        );
        let said: Vec<&str> = up
            .stderr
            .lines()
            .chain(up.stdout.lines())
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(said.len(), 1, "{case} says why in one line: {}", up.show());
        assert_eq!(proxy.processes(), vec![first], "{case}: processes");
        assert_eq!(
            live.server_port().map_err(|e| e.to_string()),
            Ok(redis.port),
            "{case}: the live relay"
        );
        assert_eq!(served(via), Ok(redis.port), "{case}: a new client");
        // The pid file still names the process serving.
        proxy.reload_by_name(&config);
        eprintln!("{case}: {}", said[0]);
    }
    drop(live);

    for how in [Binary::NewPath, Binary::InPlace] {
        let what = format!("[{mode}] upgrade ({how:?}) with no client");
        proxy.upgrade_ok(how, &what);
        assert_eq!(served(via), Ok(redis.port), "{what}: a new client");
        proxy.reload_by_name(&config);
        let (st, out, err) = proxy.cli(&["stats"]);
        assert!(
            st.success() && out.contains("redis"),
            "{what}: spliced stats --name: {st}\n{out}{err}"
        );
    }
    all_closed_clean(&proxy, "redis", 0);
    stops_cleanly(proxy);
}
