//! The config file: every example validates, `spliced check` lists every
//! problem with its key and line, flags lay over `[defaults]`, and
//! `spliced run --config` (or SPLICED_CONFIG) serves what the file says,
//! active checks and PROXY headers included, or refuses on one line.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use spliced::config::{self, Balance, FlagDefaults, Mode};

fn errors(text: &str) -> Vec<String> {
    match config::parse_str(text, &FlagDefaults::default()) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(d) => d.iter().map(ToString::to_string).collect(),
    }
}

fn assert_has(errors: &[String], needles: &[&str]) {
    assert!(
        errors.iter().any(|e| needles.iter().all(|n| e.contains(n))),
        "no error containing {needles:?} in:\n{}",
        errors.join("\n")
    );
}

#[test]
fn every_example_validates_and_prints_a_config_that_parses_back() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let p = path.to_str().unwrap();
        // `check` reads every password file: the examples' stand on this
        // host as a private temp file.
        let secret = secret_file("example", 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let local = text
            .lines()
            .map(|l| match l.split_once("password-file = ") {
                Some((indent, _)) => format!("{indent}password-file = \"{}\"", secret.display()),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let name = path.file_stem().unwrap().to_str().unwrap();
        let local_path = temp_config(&format!("example-{name}"), &local);
        let (status, stdout, stderr) = run_bin(
            &["check", "--config", local_path.to_str().unwrap()],
            Duration::from_secs(20),
        );
        let _ = std::fs::remove_file(local_path);
        let _ = std::fs::remove_dir_all(secret.parent().unwrap());
        assert!(
            status.is_some_and(|s| s.success()),
            "{p}: {status:?}\n{stderr}"
        );
        assert!(stdout.contains("[[listener]]"), "{p}: {stdout}");
        // The effective config is itself a valid file, and a fixed point.
        let again = config::parse_str(&stdout, &FlagDefaults::default())
            .unwrap_or_else(|e| panic!("{p}: the printed config does not parse: {e:?}"));
        assert_eq!(config::effective_toml(&again.config), stdout, "{p}");
        checked += 1;
    }
    assert!(
        checked >= 3,
        "expected the PostgreSQL, Redis and MySQL examples, found {checked}"
    );
}

#[test]
fn defaults_are_inherited_and_flags_replace_them() {
    let text = format!("[defaults]\nmode = \"copy\"\nidle-timeout = \"5m\"\n{MINIMAL_CONFIG}");
    let own = text.replace("name = \"one\"", "name = \"one\"\nidle-timeout = \"7m\"");
    let c = config::parse_str(&text, &FlagDefaults::default())
        .unwrap()
        .config;
    let l = &c.listeners[0];
    assert_eq!(l.mode, Mode::Copy);
    assert_eq!(l.timeouts.idle, Some(Duration::from_secs(300)));
    assert_eq!(
        l.timeouts.fin,
        Some(Duration::from_secs(60)),
        "built-in default"
    );
    assert_eq!(l.pool.balance, Balance::RoundRobin);
    let flags = FlagDefaults {
        mode: Some(Mode::Splice),
        idle_timeout: Some(Some(Duration::from_secs(60))),
        ..FlagDefaults::default()
    };
    let c = config::parse_str(&text, &flags).unwrap().config;
    assert_eq!(
        c.listeners[0].mode,
        Mode::Splice,
        "a flag replaces [defaults]"
    );
    assert_eq!(c.listeners[0].timeouts.idle, Some(Duration::from_secs(60)));
    let c = config::parse_str(&own, &flags).unwrap().config;
    assert_eq!(
        c.listeners[0].timeouts.idle,
        Some(Duration::from_secs(420)),
        "the listener's own key wins over a flag"
    );
}

#[test]
fn max_lag_is_a_size_for_replica_pools_of_postgres_and_redis_checks() {
    for (check, role) in [("postgres", "replica"), ("redis", "prefer-replica")] {
        let text = format!(
            "{MINIMAL_CONFIG}[listener.pool.health]\ncheck = \"{check}\"\nrole = \"{role}\"\nuser = \"m\"\nmax-lag = \"16m\"\n"
        );
        let c = config::parse_str(&text, &FlagDefaults::default())
            .unwrap()
            .config;
        assert_eq!(c.listeners[0].pool.health.max_lag, Some(16 << 20));
    }
    for (check, role, line) in [
        ("postgres", "primary", 13),
        ("redis", "any", 13),
        ("tcp", "any", 13),
        ("http", "any", 13),
    ] {
        let text = format!(
            "{MINIMAL_CONFIG}[listener.pool.health]\ncheck = \"{check}\"\nrole = \"{role}\"\nuser = \"m\"\n\n\nmax-lag = \"16m\"\n"
        );
        let e = errors(&text);
        assert_has(
            &e,
            &[
                &format!("line {line}"),
                "health.max-lag",
                "role = \"replica\" or \"prefer-replica\"",
            ],
        );
    }
    let e = errors(&format!(
        "{MINIMAL_CONFIG}[listener.pool.health]\ncheck = \"postgres\"\nrole = \"replica\"\nuser = \"m\"\nmax-lag = \"lots\"\n"
    ));
    assert_has(&e, &["line 11", "health.max-lag", "not a size"]);
    let e = errors(&format!(
        "{MINIMAL_CONFIG}[listener.pool.health]\ncheck = \"redis\"\nrole = \"replica\"\nmax-lag = 0\n"
    ));
    assert_has(&e, &["line 10", "health.max-lag", "positive"]);
    // Built in code, the same rule holds.
    let mut c = config::parse_str(MINIMAL_CONFIG, &FlagDefaults::default())
        .unwrap()
        .config;
    c.listeners[0].pool.health.max_lag = Some(1);
    assert!(c.validate().unwrap_err().to_string().contains("max-lag"));
}

#[test]
fn each_error_names_its_key_and_line() {
    let e = errors("[defaults]\nidle-timeout = 30\n");
    assert_has(
        &e,
        &["line 2", "defaults.idle-timeout", "bare number", "30s"],
    );
    assert_has(&e, &["listener", "at least one"]);
    let e = errors(&MINIMAL_CONFIG.replace("listen =", "colour = 1\nlisten ="));
    assert_has(&e, &["line 4", "listener[one].colour", "unknown key"]);
    let e = errors(
        &MINIMAL_CONFIG.replace("servers = [{ address = \"127.0.0.1:9\" }]", "servers = []"),
    );
    assert_has(&e, &["line 6", "pool.servers", "empty"]);
    let e = errors(&MINIMAL_CONFIG.replace("listen = [", "allow = [\"10.0.0.0/33\"]\nlisten = ["));
    assert_has(&e, &["line 4", "allow[0]", "10.0.0.0/33", "CIDR"]);
    let twice = format!(
        "{MINIMAL_CONFIG}{}",
        MINIMAL_CONFIG.replace("127.0.0.1:0", "127.0.0.1:7")
    );
    assert_has(
        &errors(&twice),
        &["line 9", "name", "already used", "line 3"],
    );
    let overlap = format!(
        "{}{}",
        MINIMAL_CONFIG.replace("127.0.0.1:0", "127.0.0.1:7"),
        MINIMAL_CONFIG
            .replace("one", "two")
            .replace("127.0.0.1:0", ":7")
    );
    assert_has(
        &errors(&overlap),
        &["line 10", "listener[two].listen", "overlaps 127.0.0.1:7"],
    );
    let e = errors(&MINIMAL_CONFIG.replace(
        "[listener.pool]",
        "[listener.pool]\nbalance = \"rr\"\nretries = -1",
    ));
    assert_has(&e, &["line 6", "balance", "'rr'", "least-conn"]);
    assert_has(&e, &["line 7", "retries", "out of range"]);
    let e = errors(&MINIMAL_CONFIG.replace("9\" }", "9\", weight = 0 }"));
    assert_has(&e, &["line 6", "servers[0].weight", "out of range"]);
    let e = errors(&format!(
        "{MINIMAL_CONFIG}[listener.pool.health]\nrole = \"primary\"\n"
    ));
    assert_has(&e, &["line 8", "health.role", "set health.check"]);
    assert_has(&errors("[[listener]\n"), &["line 1", "(syntax)"]);
    let e = errors(&MINIMAL_CONFIG.replace(
        "listen =",
        "accept-proxy = { trusted = [\"10.0.0.0/8\"], timeout = 5 }\nfirst-packet-timeout = \"2s\"\nlisten =",
    ));
    assert_has(&e, &["line 4", "accept-proxy.timeout", "bare number"]);
    assert_has(
        &e,
        &["line 5", "first-packet-timeout", "protocol = \"postgres\""],
    );
}

#[test]
fn pre_connect_deadlines_are_read_and_printed_back() {
    let text = MINIMAL_CONFIG.replace(
        "listen =",
        "accept-proxy = { trusted = [\"10.0.0.0/8\"], timeout = \"750ms\" }\nprotocol = \"postgres\"\nfirst-packet-timeout = \"2s\"\nlisten =",
    );
    let loaded = config::parse_str(&text, &FlagDefaults::default()).unwrap();
    let l = &loaded.config.listeners[0];
    assert_eq!(
        l.accept_proxy.as_ref().unwrap().timeout,
        Duration::from_millis(750)
    );
    assert_eq!(l.first_packet_timeout, Duration::from_secs(2));
    let printed = config::effective_toml(&loaded.config);
    assert!(
        printed.contains("first-packet-timeout = \"2s\""),
        "{printed}"
    );
    let again = config::parse_str(&printed, &FlagDefaults::default()).unwrap();
    assert_eq!(config::effective_toml(&again.config), printed);
    let plain = config::parse_str(MINIMAL_CONFIG, &FlagDefaults::default()).unwrap();
    let printed = config::effective_toml(&plain.config);
    assert!(!printed.contains("first-packet-timeout"), "{printed}");
}

#[test]
fn check_lists_every_error_and_exits_one() {
    let path = temp_config(
        "bad",
        "[defaults]\nfin-timeout = 10\nmode = \"fast\"\n\n[[listener]]\nname = \"x\"\nlisten = [\"127.0.0.1:0\"]\n[listener.pool]\nservers = []\n",
    );
    let (status, stdout, stderr) = run_bin(
        &["check", "--config", path.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].contains("line 2: defaults.fin-timeout"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("line 3: defaults.mode: unknown value 'fast'"),
        "{stderr}"
    );
    assert!(
        lines[2].contains("line 9: listener[x].pool.servers"),
        "{stderr}"
    );
    assert!(lines.iter().all(|l| l.starts_with("spliced: error: ")));
    let _ = std::fs::remove_file(path);
}

#[test]
fn run_carries_out_checks_proxy_headers_and_on_down_kill() {
    let echo = echo_server();
    let text = MINIMAL_CONFIG
        .replace("127.0.0.1:9", &echo.addr.to_string())
        .replacen(
            "listen =",
            "accept-proxy = { trusted = [\"127.0.0.0/8\"] }\nprotocol = \"postgres\"\nlisten =",
            1,
        )
        .replace(
            "[listener.pool]",
            "[listener.pool]\nsend-proxy = \"v1\"\non-down = \"kill\"",
        )
        + "[listener.pool.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n";
    let path = temp_config("fleet", &text);
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--workers", "1", "--config"]).arg(&path);
    let proxy = Spliced::spawn(cmd);
    let mut c = connect(proxy.addr);
    use std::io::Write;
    c.write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 5432\r\n\0\0\0\x08\x04\xd2\x16\x2f")
        .unwrap();
    // The echo server sends back the v1 header spliced wrote, then the packet.
    let want = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 5432\r\n\0\0\0\x08\x04\xd2\x16\x2f";
    let got = read_exact_within(&mut c, want.len(), Duration::from_secs(5)).unwrap();
    assert_eq!(got, want);
    let _ = std::fs::remove_file(path);
}

#[test]
fn run_refuses_an_unreadable_password_file_on_one_line() {
    let text = MINIMAL_CONFIG.to_string()
        + "[listener.pool.health]\ncheck = \"postgres\"\nrole = \"primary\"\nuser = \"u\"\npassword-file = \"/nonexistent/pw\"\n";
    let path = temp_config("pwfile", &text);
    let p = path.to_str().unwrap();
    let (status, _, stderr) = run_bin(&["run", "--config", p], Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("password-file /nonexistent/pw"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn run_serves_the_files_listeners_also_through_the_environment() {
    let echo = echo_server();
    let text = MINIMAL_CONFIG.replace("127.0.0.1:9", &echo.addr.to_string());
    let path = temp_config("serve", &text);
    for via_env in [false, true] {
        let mut cmd = Command::new(bin());
        cmd.arg("run");
        if via_env {
            cmd.env("SPLICED_CONFIG", &path);
        } else {
            cmd.arg("--config").arg(&path);
        }
        cmd.args(["--workers", "1", "--idle-timeout", "10s"]);
        let proxy = Spliced::spawn(cmd);
        let mut c = connect(proxy.addr);
        round_trip(&mut c, b"through the config file", Duration::from_secs(5));
        drop(c);
        wait_until(
            Duration::from_secs(5),
            "the relay's close line names the listener",
            || {
                proxy
                    .logs()
                    .iter()
                    .any(|l| l.contains("relay closed") && l.contains("listener=one"))
            },
        );
    }
    // --listen beside --config is a conflict, said on one line.
    let (status, _, stderr) = run_bin(
        &[
            "run",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot be combined with --config"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn values_the_kernel_refuses_are_errors_naming_key_line_and_limit() {
    let with = |lines: &str| MINIMAL_CONFIG.replace("listen =", &format!("{lines}\nlisten ="));
    let e = errors(&with("keepalive = { idle = \"40000s\" }"));
    assert_has(
        &e,
        &["line 4", "listener[one].keepalive.idle", "40000s", "32767s"],
    );
    let e = errors(&with("keepalive = { interval = \"10h\" }"));
    assert_has(&e, &["line 4", "keepalive.interval", "32767s"]);
    let e = errors(&with("keepalive = { idle = \"500ms\" }"));
    assert_has(&e, &["line 4", "keepalive.idle", "1s to 32767s"]);
    let e = errors(&with("keepalive = { count = 128 }"));
    assert_has(&e, &["line 4", "keepalive.count", "128", "127"]);
    // 2^31 ms, one more than TCP_USER_TIMEOUT's int holds.
    let e = errors(&with("user-timeout = \"2147483648ms\""));
    assert_has(
        &e,
        &["line 4", "listener[one].user-timeout", "2147483647ms"],
    );
    let e = errors(&format!(
        "[defaults]\nuser-timeout = \"30d\"\n{MINIMAL_CONFIG}"
    ));
    assert_has(&e, &["line 2", "defaults.user-timeout", "2147483647ms"]);
    // The limits themselves are accepted.
    let ok = with("keepalive = { idle = \"32767s\", interval = \"32767s\", count = 127 }\nuser-timeout = \"2147483647ms\"");
    let c = config::parse_str(&ok, &FlagDefaults::default())
        .unwrap()
        .config;
    assert_eq!(c.listeners[0].keepalive.unwrap().count, 127);
    assert_eq!(
        c.listeners[0].user_timeout,
        Some(Duration::from_millis(2_147_483_647))
    );
    // The library refuses them too, for configs built in code.
    let mut c = c;
    c.listeners[0].user_timeout = Some(Duration::from_millis(1 << 31));
    assert!(c.validate().unwrap_err().0.contains("user-timeout"));
}

#[test]
fn ipv4_mapped_and_dual_stack_listen_addresses_overlap_their_ipv4_twins() {
    let two = |a: &str, b: &str| {
        format!(
            "{}{}",
            MINIMAL_CONFIG.replace("\"127.0.0.1:0\"", a),
            MINIMAL_CONFIG
                .replace("one", "two")
                .replace("\"127.0.0.1:0\"", b)
        )
    };
    // Across two listeners: the mapped address is the IPv4 one.
    let e = errors(&two("\"127.0.0.1:7\"", "\"[::ffff:127.0.0.1]:7\""));
    assert_has(
        &e,
        &[
            "line 10",
            "listener[two].listen",
            "[::ffff:127.0.0.1]:7 overlaps 127.0.0.1:7 of listener 'one' (line 4)",
        ],
    );
    let e = errors(&two("\"0.0.0.0:7\"", "\"[::ffff:127.0.0.1]:7\""));
    assert_has(&e, &["listener[two].listen", "overlaps 0.0.0.0:7"]);
    // Within one listener.
    let e = errors(&MINIMAL_CONFIG.replace(
        "\"127.0.0.1:0\"",
        "\"127.0.0.1:7\", \"[::ffff:127.0.0.1]:7\"",
    ));
    assert_has(
        &e,
        &[
            "line 4",
            "listener[one].listen",
            "[::ffff:127.0.0.1]:7 overlaps 127.0.0.1:7 of listener 'one'",
        ],
    );
    // Beside IPv4 addresses a listener binds IPv6-only, which cannot take a
    // mapped address at all.
    let e = errors(&MINIMAL_CONFIG.replace(
        "\"127.0.0.1:0\"",
        "\"127.0.0.1:7\", \"[::ffff:127.0.0.2]:7\"",
    ));
    assert_has(&e, &["listener[one].listen", "IPv6-only", "127.0.0.2:7"]);
    // Other ports and other addresses are fine.
    for (a, b) in [
        ("\"127.0.0.1:7\"", "\"[::ffff:127.0.0.1]:8\""),
        ("\"127.0.0.1:7\"", "\"[::ffff:127.0.0.2]:7\""),
        ("\"127.0.0.1:7\"", "\"[::1]:7\""),
        ("\":7\"", "\"[::1]:8\""),
    ] {
        let text = two(a, b);
        assert!(
            config::parse_str(&text, &FlagDefaults::default()).is_ok(),
            "{text}"
        );
    }
    // A `[::]` alone in its listener is dual-stack unless bindv6only is 1.
    let text = two("\"127.0.0.1:7\"", "\"[::]:7\"");
    let v6only =
        std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1");
    match config::parse_str(&text, &FlagDefaults::default()) {
        Err(d) if !v6only => assert_has(
            &d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            &[
                "listener[two].listen",
                "[::]:7 overlaps 127.0.0.1:7",
                "IPv4 too",
            ],
        ),
        Ok(_) if v6only => {}
        other => panic!("bindv6only={v6only}: {other:?}"),
    }
}

#[test]
fn queue_timeout_and_max_queued_are_read_checked_and_printed_back() {
    let text = MINIMAL_CONFIG
        .replace(
            "[listener.pool]",
            "[listener.pool]\nqueue-timeout = \"15s\"",
        )
        .replace("listen =", "max-queued = 500\nlisten =");
    let loaded = config::parse_str(&text, &FlagDefaults::default()).unwrap();
    let l = &loaded.config.listeners[0];
    assert_eq!(l.pool.queue_timeout, Some(Duration::from_secs(15)));
    assert_eq!(l.max_queued, Some(500));
    let printed = config::effective_toml(&loaded.config);
    assert!(printed.contains("queue-timeout = \"15s\""), "{printed}");
    assert!(printed.contains("max-queued = 500"), "{printed}");
    let again = config::parse_str(&printed, &FlagDefaults::default()).unwrap();
    assert_eq!(config::effective_toml(&again.config), printed);

    // The default: refuse at once, no bound of its own.
    let plain = config::parse_str(MINIMAL_CONFIG, &FlagDefaults::default()).unwrap();
    assert_eq!(plain.config.listeners[0].pool.queue_timeout, None);
    assert_eq!(plain.config.listeners[0].max_queued, None);
    let zero = MINIMAL_CONFIG.replace("[listener.pool]", "[listener.pool]\nqueue-timeout = \"0\"");
    let zero = config::parse_str(&zero, &FlagDefaults::default()).unwrap();
    assert_eq!(zero.config.listeners[0].pool.queue_timeout, None);

    // max-queued is inherited from [defaults] like max-conns.
    let inherited = format!("[defaults]\nmax-queued = 7\n{MINIMAL_CONFIG}");
    let inherited = config::parse_str(&inherited, &FlagDefaults::default()).unwrap();
    assert_eq!(inherited.config.listeners[0].max_queued, Some(7));

    let e =
        errors(&MINIMAL_CONFIG.replace("[listener.pool]", "[listener.pool]\nqueue-timeout = 15"));
    assert_has(&e, &["line 6", "pool.queue-timeout", "bare number"]);
    let e = errors(&MINIMAL_CONFIG.replace("listen =", "max-queued = 0\nlisten ="));
    assert_has(&e, &["line 4", "listener[one].max-queued", "out of range"]);
}
