//! Scripted byte exchanges for every kind and outcome, grouped by kind.

use std::net::SocketAddr;

use super::*;

fn addr() -> SocketAddr {
    "127.0.0.1:6379".parse().unwrap()
}

fn spec(kind: Kind) -> CheckSpec {
    CheckSpec::new(kind)
}

fn with_role(kind: Kind, role: WantRole) -> CheckSpec {
    CheckSpec { role, ..spec(kind) }
}

fn sent(step: Step) -> Vec<u8> {
    match step {
        Step::Send(b) => b,
        other => panic!("expected Send, got {other:?}"),
    }
}

fn done(step: Step) -> Verdict {
    match step {
        Step::Done(v) => v,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn reason(v: Verdict) -> String {
    match v {
        Verdict::Down { reason } => reason,
        up => panic!("expected Down, got {up:?}"),
    }
}

/// The reason of a check error (the check itself is wrong).
fn check_error(v: Verdict) -> String {
    match v {
        Verdict::CheckError { reason } => reason,
        other => panic!("expected CheckError, got {other:?}"),
    }
}

/// Feeds `reply` one byte at a time: every split must work.
fn trickle(p: &mut Probe, reply: &[u8]) -> Step {
    let mut last = Step::NeedMore;
    for (i, b) in reply.iter().enumerate() {
        last = p.on_bytes(std::slice::from_ref(b));
        if i + 1 < reply.len() {
            assert_eq!(last, Step::NeedMore, "after byte {i} of {reply:?}");
        }
    }
    last
}

const UP: Verdict = Verdict::Up { role: None };
const PRIMARY: Verdict = Verdict::Up {
    role: Some(Role::Primary),
};
const REPLICA: Verdict = Verdict::Up {
    role: Some(Role::Replica),
};

// Tests for the check spec

#[test]
fn spec_parses_kinds_and_roles() {
    assert_eq!("postgres".parse::<Kind>(), Ok(Kind::Postgres));
    assert_eq!(
        "pg".parse::<Kind>().unwrap_err().to_string(),
        r#"unknown check kind "pg" (want tcp, redis, postgres, mysql or http)"#
    );
    assert_eq!("replica".parse::<WantRole>(), Ok(WantRole::Replica));
    assert_eq!(
        "master".parse::<WantRole>().unwrap_err().to_string(),
        r#"unknown role "master" (want any, primary or replica)"#
    );
}

#[test]
fn spec_refuses_a_role_where_it_cannot_be_seen() {
    let e = with_role(Kind::Http, WantRole::Primary)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("health.role") && e.contains("/primary"), "{e}");
    assert!(with_role(Kind::Mysql, WantRole::Replica)
        .validate()
        .is_err());
    assert!(with_role(Kind::Redis, WantRole::Replica).validate().is_ok());
}

#[test]
fn spec_refuses_bad_paths_ports_and_names() {
    let mut s = spec(Kind::Http);
    s.http_path = "primary".into();
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("health.path"));
    s.http_path = "/a b".into();
    assert!(s.validate().is_err());
    s.http_path = "/primary".into();
    assert!(s.validate().is_ok());
    let mut s = spec(Kind::Tcp);
    s.http_port = Some(8008);
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("health.port"));
    let mut s = spec(Kind::Postgres);
    s.user = Some(String::new());
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("health.user"));
}

#[test]
fn spec_target_uses_the_side_port_for_http_only() {
    let server: SocketAddr = "10.0.0.1:5432".parse().unwrap();
    let mut s = spec(Kind::Http);
    s.http_port = Some(8008);
    assert_eq!(s.target(server), "10.0.0.1:8008".parse().unwrap());
    assert_eq!(spec(Kind::Postgres).target(server), server);
}

// Tests for tcp

#[test]
fn tcp_is_up_once_connected() {
    let mut p = Probe::new(&spec(Kind::Tcp), addr());
    assert_eq!(done(p.start()), UP);
    assert_eq!(p.verdict(), Some(&UP));
}

// Tests for redis

#[test]
fn redis_pong_is_up() {
    let mut p = Probe::new(&spec(Kind::Redis), addr());
    assert_eq!(sent(p.start()), b"*1\r\n$4\r\nPING\r\n");
    assert_eq!(trickle(&mut p, b"+PONG\r\n"), Step::Done(UP));
}

#[test]
fn redis_noauth_is_a_check_error_with_a_hint() {
    let mut p = Probe::new(&spec(Kind::Redis), addr());
    p.start();
    let r = check_error(done(p.on_bytes(b"-NOAUTH Authentication required.\r\n")));
    assert!(r.contains("NOAUTH") && r.contains("health.password"), "{r}");
}

#[test]
fn redis_loading_is_down_with_the_servers_words() {
    let mut p = Probe::new(&spec(Kind::Redis), addr());
    p.start();
    let r = reason(done(
        p.on_bytes(b"-LOADING Redis is loading the dataset in memory\r\n"),
    ));
    assert!(r.contains("LOADING Redis is loading"), "{r}");
}

#[test]
fn redis_auth_then_ping() {
    let mut s = spec(Kind::Redis);
    s.user = Some("probe".into());
    s.password = Some("sec ret".into());
    let mut p = Probe::new(&s, addr());
    assert_eq!(
        sent(p.start()),
        b"*3\r\n$4\r\nAUTH\r\n$5\r\nprobe\r\n$7\r\nsec ret\r\n"
    );
    assert_eq!(sent(p.on_bytes(b"+OK\r\n")), b"*1\r\n$4\r\nPING\r\n");
    assert_eq!(done(p.on_bytes(b"+PONG\r\n")), UP);
}

#[test]
fn redis_wrong_password_is_a_check_error() {
    let mut s = spec(Kind::Redis);
    s.password = Some("x".into());
    let mut p = Probe::new(&s, addr());
    assert_eq!(sent(p.start()), b"*2\r\n$4\r\nAUTH\r\n$1\r\nx\r\n");
    let r = check_error(done(
        p.on_bytes(b"-WRONGPASS invalid username-password pair\r\n"),
    ));
    assert!(r.contains("refused AUTH") && r.contains("WRONGPASS"), "{r}");
}

fn redis_info(role: WantRole, info: &str) -> Verdict {
    let mut p = Probe::new(&with_role(Kind::Redis, role), addr());
    p.start();
    assert_eq!(
        sent(p.on_bytes(b"+PONG\r\n")),
        b"*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n"
    );
    let reply = format!("${}\r\n{info}\r\n", info.len());
    done(trickle(&mut p, reply.as_bytes()))
}

#[test]
fn redis_role_master_is_primary() {
    let info = "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n";
    assert_eq!(redis_info(WantRole::Primary, info), PRIMARY);
    assert_eq!(
        reason(redis_info(WantRole::Replica, info)),
        "role is primary, want replica"
    );
}

#[test]
fn redis_role_slave_is_replica() {
    let info = "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n";
    assert_eq!(redis_info(WantRole::Replica, info), REPLICA);
    assert_eq!(
        reason(redis_info(WantRole::Primary, info)),
        "role is replica, want primary"
    );
}

fn redis_position(info: &str) -> Option<lag::Position> {
    let mut s = with_role(Kind::Redis, WantRole::Replica);
    s.ask_role = true;
    let mut p2 = Probe::new(&s, addr());
    p2.start();
    sent(p2.on_bytes(b"+PONG\r\n"));
    let reply = format!("${}\r\n{info}\r\n", info.len());
    done(trickle(&mut p2, reply.as_bytes()));
    p2.position()
}

#[test]
fn redis_info_carries_the_replication_offsets() {
    let master = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
                  master_replid:abc\r\nmaster_replid2:0000\r\nmaster_repl_offset:9000\r\n";
    assert_eq!(
        redis_position(master),
        Some(lag::Position {
            stream: lag::stream_of(b"abc"),
            applied: 9000,
            received: None
        })
    );
    let replica = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n\
                   slave_read_repl_offset:8800\r\nslave_repl_offset:8700\r\n\
                   master_replid:abc\r\nmaster_repl_offset:8700\r\n";
    assert_eq!(
        redis_position(replica),
        Some(lag::Position {
            stream: lag::stream_of(b"abc"),
            applied: 8700,
            received: Some(8800)
        })
    );
    // Before Redis 7: no read offset; the replica's own offset stands in.
    let old = "role:slave\r\nmaster_replid:abc\r\nmaster_repl_offset:10\r\n";
    assert_eq!(
        redis_position(old).map(|p| (p.applied, p.received)),
        Some((10, None))
    );
    assert_eq!(
        redis_position("role:master\r\nmaster_repl_offset:1\r\n"),
        None
    );
}

#[test]
fn redis_info_without_a_role_is_down() {
    let r = reason(redis_info(WantRole::Primary, "# Replication\r\n"));
    assert!(r.contains("no role line"), "{r}");
}

#[test]
fn redis_garbage_and_surprises_are_down() {
    for (reply, words) in [
        (&b"HTTP/1.1 400 Bad\r\n"[..], "not RESP"),
        (b":1\r\n", "unexpected reply"),
        (b"$99999999999999999999\r\n", "bad bulk length"),
        (b"$18446744073709551615\r\n", "bulk string of"),
    ] {
        let mut p = Probe::new(&spec(Kind::Redis), addr());
        p.start();
        let r = reason(done(p.on_bytes(reply)));
        assert!(r.contains(words), "{reply:?}: {r}");
    }
}

#[test]
fn redis_extra_replies_are_down() {
    let mut p = Probe::new(&with_role(Kind::Redis, WantRole::Primary), addr());
    p.start();
    let r = reason(done(p.on_bytes(b"+PONG\r\n+PONG\r\n")));
    assert!(r.contains("more replies"), "{r}");
}

#[test]
fn redis_eof_before_pong_is_down() {
    let mut p = Probe::new(&spec(Kind::Redis), addr());
    p.start();
    assert_eq!(p.on_bytes(b"+PO"), Step::NeedMore);
    let r = reason(p.on_eof());
    assert!(r.contains("closed") && r.contains("+PONG"), "{r}");
}

#[test]
fn redis_an_endless_reply_is_cut() {
    let mut p = Probe::new(&spec(Kind::Redis), addr());
    p.start();
    let chunk = vec![b'+'; 4096];
    let mut last = Step::NeedMore;
    for _ in 0..=MAX_REPLY / 4096 {
        last = p.on_bytes(&chunk);
        if last != Step::NeedMore {
            break;
        }
    }
    assert!(reason(done(last)).contains("longer than"));
}

// Tests for mysql

fn mysql_packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

#[test]
fn mysql_handshake_is_up() {
    let mut p = Probe::new(&spec(Kind::Mysql), addr());
    assert_eq!(p.start(), Step::NeedMore, "the server speaks first");
    let mut hs = vec![0x0a];
    hs.extend_from_slice(b"10.11.6-MariaDB\0\x01\0\0\0abcdefgh\0");
    assert_eq!(trickle(&mut p, &mysql_packet(0, &hs)), Step::Done(UP));
}

#[test]
fn mysql_error_packet_is_down_with_its_message() {
    let mut p = Probe::new(&spec(Kind::Mysql), addr());
    p.start();
    let mut err = vec![0xff, 0x69, 0x04];
    err.extend_from_slice(b"Host '10.0.0.9' is blocked because of many connection errors");
    let r = reason(done(p.on_bytes(&mysql_packet(0, &err))));
    assert!(r.contains("error 1129") && r.contains("is blocked"), "{r}");
}

#[test]
fn mysql_error_with_sqlstate_drops_the_marker() {
    let mut p = Probe::new(&spec(Kind::Mysql), addr());
    p.start();
    let mut err = vec![0xff, 0x10, 0x04];
    err.extend_from_slice(b"#08004Too many connections");
    let r = reason(done(p.on_bytes(&mysql_packet(0, &err))));
    assert!(r.ends_with("error 1040: Too many connections"), "{r}");
}

#[test]
fn mysql_other_greetings_are_down() {
    for (bytes, words) in [
        (mysql_packet(0, &[0x09, b'x']), "protocol version 9"),
        (mysql_packet(1, &[0x0a]), "sequence number 1"),
        (b"\0\0\0\0".to_vec(), "claims 0 bytes"),
        (b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), "not a MySQL handshake"),
    ] {
        let mut p = Probe::new(&spec(Kind::Mysql), addr());
        p.start();
        let r = reason(done(p.on_bytes(&bytes)));
        assert!(r.contains(words), "{bytes:?}: {r}");
    }
}

#[test]
fn mysql_eof_before_the_handshake_is_down() {
    let mut p = Probe::new(&spec(Kind::Mysql), addr());
    p.start();
    p.on_bytes(&[5, 0]);
    assert!(reason(p.on_eof()).contains("handshake"));
}

// Tests for http

fn http(path: &str) -> Probe {
    let mut s = spec(Kind::Http);
    s.http_path = path.into();
    s.http_port = Some(8008);
    let target = s.target(addr());
    Probe::new(&s, target)
}

#[test]
fn http_sends_a_get_with_host() {
    let mut p = http("/primary");
    let req = String::from_utf8(sent(p.start())).unwrap();
    assert!(req.starts_with("GET /primary HTTP/1.1\r\n"), "{req}");
    assert!(req.contains("\r\nHost: 127.0.0.1:8008\r\n"), "{req}");
    assert!(req.ends_with("\r\n\r\n"));
}

#[test]
fn http_2xx_is_up() {
    for line in ["HTTP/1.1 200 OK\r\n", "HTTP/1.0 204 No Content\r\n"] {
        let mut p = http("/health");
        p.start();
        assert_eq!(trickle(&mut p, line.as_bytes()), Step::Done(UP), "{line}");
        let mut p = http("/replica");
        p.start();
        assert_eq!(
            trickle(&mut p, line.as_bytes()),
            Step::Done(REPLICA),
            "{line}"
        );
        let mut p = http("/leader");
        p.start();
        assert_eq!(
            trickle(&mut p, line.as_bytes()),
            Step::Done(PRIMARY),
            "{line}"
        );
    }
}

#[test]
fn http_other_status_is_down_with_it() {
    let mut p = http("/health");
    p.start();
    let r = reason(done(p.on_bytes(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{}",
    )));
    assert_eq!(r, "http GET /health answered 503 Service Unavailable");
}

#[test]
fn http_503_on_a_role_path_is_a_role_answer() {
    for (path, role) in [("/primary", Role::Primary), ("/read-only", Role::Replica)] {
        let mut p = http(path);
        p.start();
        let v = done(p.on_bytes(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"));
        assert_eq!(v, Verdict::NotRole { role }, "{path}");
    }
    // Anything else from a role path is no answer.
    let mut p = http("/primary");
    p.start();
    reason(done(
        p.on_bytes(b"HTTP/1.1 500 Internal Server Error\r\n\r\n"),
    ));
}

#[test]
fn http_401_and_403_are_check_errors() {
    for line in [
        "HTTP/1.1 401 Unauthorized\r\n",
        "HTTP/1.1 403 Forbidden\r\n",
    ] {
        let mut p = http("/primary");
        p.start();
        let r = check_error(done(p.on_bytes(line.as_bytes())));
        assert!(r.contains("credentials"), "{r}");
    }
}

#[test]
fn http_bad_status_lines_are_down() {
    for line in [
        &b"SSH-2.0-x\r\n"[..],
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/2 200\r\n",
    ] {
        let mut p = http("/");
        p.start();
        assert!(reason(done(p.on_bytes(line))).contains("bad status line"));
    }
    let mut p = http("/");
    p.start();
    let r = reason(done(p.on_bytes(&vec![b'x'; 5000])));
    assert!(r.contains("longer than"), "{r}");
}

#[test]
fn http_eof_before_the_status_line_is_down() {
    let mut p = http("/");
    p.start();
    p.on_bytes(b"HTTP/1.1 20");
    assert!(reason(p.on_eof()).contains("status line"));
}

#[test]
fn done_is_sticky() {
    let mut p = http("/");
    p.start();
    let v = done(p.on_bytes(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(done(p.on_bytes(b"more")), v);
    assert_eq!(p.on_eof(), v);
}

#[cfg(feature = "postgres-checks")]
mod postgres;

// Properties: arbitrary server bytes, any split.

mod props {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_replies(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            crate::fuzzing::health_reply(&data);
        }

        /// Valid openings with arbitrary continuations reach deeper states.
        #[test]
        fn replies_after_a_valid_opening(
            sel in any::<u8>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let opening: &[u8] = match sel % 5 {
                1 => b"\x07+PONG\r\n",
                2 => b"\x09R\0\0\0\x08\0\0\0\0",
                3 => b"\x05\x01\0\0\0\x0a",
                4 => b"\x11HTTP/1.1 200 OK\r\n",
                _ => b"",
            };
            let mut data = vec![sel];
            data.extend_from_slice(opening);
            data.extend_from_slice(&tail);
            crate::fuzzing::health_reply(&data);
        }
    }
}

#[test]
fn reasons_are_one_bounded_line() {
    let v = Verdict::down(format!("a\nb\r{}", "x".repeat(1000)));
    let r = reason(v);
    assert!(r.starts_with("a b x"), "{r}");
    assert!(!r.chars().any(char::is_control));
    assert_eq!(r.chars().count(), MAX_REASON + 1, "cut, with an ellipsis");
}
