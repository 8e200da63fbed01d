//! Postgres conversations, byte for byte.

use postgres_protocol::authentication::md5_hash;

use super::*;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(extra);
    message(b'R', &body)
}

fn ready() -> Vec<u8> {
    message(b'Z', b"I")
}

fn error(code: &str, msg: &str) -> Vec<u8> {
    let body = format!("SFATAL\0VFATAL\0C{code}\0M{msg}\0\0");
    message(b'E', body.as_bytes())
}

/// What a server sends after AuthenticationOk and before ReadyForQuery.
fn welcome() -> Vec<u8> {
    let mut out = auth(0, b"");
    out.extend(message(b'S', b"server_version\x0016.4\0"));
    out.extend(message(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]));
    out.extend(ready());
    out
}

fn recovery_answer(value: &[u8]) -> Vec<u8> {
    let mut row_desc = 1u16.to_be_bytes().to_vec();
    row_desc.extend_from_slice(b"pg_is_in_recovery\0");
    row_desc.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 1, 255, 255, 255, 255, 0, 0,
    ]);
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&(value.len() as u32).to_be_bytes());
    row.extend_from_slice(value);
    let mut out = message(b'T', &row_desc);
    out.extend(message(b'D', &row));
    out.extend(message(b'C', b"SELECT 1\0"));
    out.extend(ready());
    out
}

/// Startup parameters as (key, value) pairs.
fn startup_params(bytes: &[u8]) -> Vec<(String, String)> {
    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len());
    assert_eq!(&bytes[4..8], &196608u32.to_be_bytes(), "protocol 3.0");
    let words: Vec<String> = bytes[8..]
        .split(|&b| b == 0)
        .map(|w| String::from_utf8(w.to_vec()).unwrap())
        .collect();
    words
        .chunks(2)
        .filter(|c| c.len() == 2 && !c[0].is_empty())
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

fn pg(role: WantRole, user: Option<&str>, password: Option<&str>) -> Probe {
    let mut s = with_role(Kind::Postgres, role);
    s.user = user.map(Into::into);
    s.password = password.map(Into::into);
    s.database = Some("app".into());
    Probe::new(&s, addr())
}

fn query_sent() -> Vec<u8> {
    let mut q = super::super::postgres::QUERY.as_bytes().to_vec();
    q.push(0);
    message(b'Q', &q)
}

// Liveness (no role)

#[test]
fn startup_names_user_database_and_application() {
    let mut p = pg(WantRole::Any, None, None);
    let params = startup_params(&sent(p.start()));
    assert!(params.contains(&("user".into(), "postgres".into())));
    assert!(params.contains(&("database".into(), "app".into())));
    assert!(params.contains(&("application_name".into(), "spliced-health".into())));
}

#[test]
fn liveness_an_auth_request_is_up() {
    for request in [
        auth(3, b""),
        auth(5, b"salt"),
        auth(10, b"SCRAM-SHA-256\0\0"),
    ] {
        let mut p = pg(WantRole::Any, None, None);
        p.start();
        assert_eq!(trickle(&mut p, &request), Step::Done(UP));
        assert_eq!(p.goodbye(), b"", "no session to end");
    }
}

#[test]
fn liveness_trust_waits_for_ready_and_says_goodbye() {
    let mut p = pg(WantRole::Any, None, None);
    p.start();
    assert_eq!(done(p.on_bytes(&welcome())), UP);
    assert_eq!(p.goodbye(), b"X\0\0\0\x04");
}

#[test]
fn liveness_starting_up_is_down() {
    let mut p = pg(WantRole::Any, None, None);
    p.start();
    let r = reason(done(
        p.on_bytes(&error("57P03", "the database system is starting up")),
    ));
    assert_eq!(
        r,
        "postgres error 57P03 while waiting for the authentication request: \
         the database system is starting up"
    );
}

#[test]
fn liveness_missing_database_after_trust_is_a_check_error() {
    let mut p = pg(WantRole::Any, None, None);
    p.start();
    let mut reply = auth(0, b"");
    reply.extend(error("3D000", "database \"app\" does not exist"));
    let r = check_error(done(p.on_bytes(&reply)));
    assert!(r.contains("3D000") && r.contains("does not exist"), "{r}");
}

// Login and role

#[test]
fn trust_login_then_primary() {
    let mut p = pg(WantRole::Primary, Some("probe"), None);
    p.start();
    assert_eq!(sent(trickle(&mut p, &welcome())), query_sent());
    assert_eq!(p.on_bytes(&recovery_answer(b"f")[..7]), Step::NeedMore);
    assert_eq!(done(p.on_bytes(&recovery_answer(b"f")[7..])), PRIMARY);
    assert_eq!(p.goodbye(), b"X\0\0\0\x04");
}

#[test]
fn trust_login_then_replica_or_mismatch() {
    for (want, answer) in [
        (WantRole::Replica, REPLICA),
        (
            WantRole::Primary,
            Verdict::down("role is replica, want primary"),
        ),
    ] {
        let mut p = pg(want, Some("probe"), None);
        p.start();
        sent(p.on_bytes(&welcome()));
        assert_eq!(done(p.on_bytes(&recovery_answer(b"t"))), answer);
    }
}

/// A full answer row: NULL for a `None` column.
fn row_answer(columns: &[Option<&str>]) -> Vec<u8> {
    let mut row = (columns.len() as u16).to_be_bytes().to_vec();
    for c in columns {
        match c {
            Some(v) => {
                row.extend_from_slice(&(v.len() as u32).to_be_bytes());
                row.extend_from_slice(v.as_bytes());
            }
            None => row.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    let mut out = message(b'D', &row);
    out.extend(message(b'C', b"SELECT 1\0"));
    out.extend(ready());
    out
}

#[test]
fn the_answer_carries_timeline_cluster_and_wal_positions() {
    use crate::health::lag::Position;
    let primary = row_answer(&[Some("f"), Some("3"), Some("-4"), Some("16/B374D848"), None]);
    // A role is asked for (ask_role): the answer reports it.
    let mut asking = with_role(Kind::Postgres, WantRole::Any);
    asking.ask_role = true;
    asking.user = Some("probe".into());
    let mut q = Probe::new(&asking, addr());
    q.start();
    sent(q.on_bytes(&welcome()));
    assert_eq!(done(trickle(&mut q, &primary)), PRIMARY);
    assert_eq!(q.timeline(), Some(3));
    assert_eq!(
        q.position(),
        Some(Position {
            stream: u64::MAX - 3,
            applied: 0x16_B374_D848,
            received: None
        })
    );
    let mut r = pg(WantRole::Replica, Some("probe"), None);
    r.start();
    sent(r.on_bytes(&welcome()));
    let standby = row_answer(&[
        Some("t"),
        None,
        Some("7716326248818513265"),
        Some("0/3000000"),
        Some("0/3000100"),
    ]);
    assert_eq!(done(r.on_bytes(&standby)), REPLICA);
    assert_eq!(r.timeline(), None);
    assert_eq!(
        r.position(),
        Some(Position {
            stream: 7716326248818513265,
            applied: 0x300_0000,
            received: Some(0x300_0100)
        })
    );
    // Only the role: still judged, no position.
    let mut old = pg(WantRole::Replica, Some("probe"), None);
    old.start();
    sent(old.on_bytes(&welcome()));
    assert_eq!(done(old.on_bytes(&recovery_answer(b"t"))), REPLICA);
    assert_eq!(old.position(), None);
}

#[test]
fn md5_login_sends_the_salted_hash() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    let salt = [1, 2, 3, 4];
    let answer = sent(p.on_bytes(&auth(5, &salt)));
    let mut want = md5_hash(b"probe", b"pw", salt).into_bytes();
    want.push(0);
    assert_eq!(answer, message(b'p', &want));
    sent(p.on_bytes(&welcome()));
    assert_eq!(done(p.on_bytes(&recovery_answer(b"f"))), PRIMARY);
}

#[test]
fn cleartext_login_sends_the_password() {
    let mut p = pg(WantRole::Replica, Some("probe"), Some("pw"));
    p.start();
    assert_eq!(sent(p.on_bytes(&auth(3, b""))), message(b'p', b"pw\0"));
}

#[test]
fn a_password_request_without_a_password_is_a_check_error() {
    let mut p = pg(WantRole::Primary, Some("probe"), None);
    p.start();
    let r = check_error(done(p.on_bytes(&auth(5, b"salt"))));
    assert!(
        r.contains("password (md5)") && r.contains("health.password"),
        "{r}"
    );
}

#[test]
fn a_wrong_password_is_a_check_error_with_the_servers_words() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("bad"));
    p.start();
    p.on_bytes(&auth(5, b"salt"));
    let r = check_error(done(p.on_bytes(&error(
        "28P01",
        "password authentication failed for user \"probe\"",
    ))));
    assert!(
        r.contains("28P01 while authenticating: password authentication failed"),
        "{r}"
    );
}

/// The client's SCRAM messages, and a server signature that is wrong.
#[test]
fn scram_exchange_and_a_forged_server_signature() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    let first = sent(p.on_bytes(&auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")));
    assert_eq!(first[0], b'p');
    let body = &first[5..];
    let mech_end = body.iter().position(|&b| b == 0).unwrap();
    assert_eq!(&body[..mech_end], b"SCRAM-SHA-256");
    let client_first = std::str::from_utf8(&body[mech_end + 5..]).unwrap();
    let nonce = client_first.strip_prefix("n,,n=,r=").expect(client_first);
    assert_eq!(p.phase(), "authenticating");

    let server_first = format!("r={nonce}SERVER,s=c2FsdHNhbHQ=,i=16");
    let second = sent(p.on_bytes(&auth(11, server_first.as_bytes())));
    let client_final = std::str::from_utf8(&second[5..]).unwrap();
    assert!(
        client_final.starts_with(&format!("c=biws,r={nonce}SERVER,p=")),
        "{client_final}"
    );

    let r = reason(done(p.on_bytes(&auth(
        12,
        b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ))));
    assert!(r.contains("server signature did not verify"), "{r}");
}

#[test]
fn scram_with_a_foreign_nonce_is_down() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    p.on_bytes(&auth(10, b"SCRAM-SHA-256\0\0"));
    let r = reason(done(
        p.on_bytes(&auth(11, b"r=someoneelse,s=c2FsdA==,i=16")),
    ));
    assert!(r.contains("SCRAM exchange failed"), "{r}");
}

#[test]
fn scram_iteration_count_is_capped() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    let first = sent(p.on_bytes(&auth(10, b"SCRAM-SHA-256\0\0")));
    let nonce = std::str::from_utf8(&first[5 + 14 + 4..])
        .unwrap()
        .strip_prefix("n,,n=,r=")
        .unwrap()
        .to_string();
    let server_first = format!("r={nonce}S,s=c2FsdA==,i=100000");
    let r = reason(done(p.on_bytes(&auth(11, server_first.as_bytes()))));
    assert_eq!(
        r,
        "postgres SCRAM iteration count 100000 over the probe's limit of 16384"
    );
}

#[test]
fn scram_skipped_by_the_server_is_down() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    p.on_bytes(&auth(10, b"SCRAM-SHA-256\0\0"));
    let r = reason(done(p.on_bytes(&welcome())));
    assert!(r.contains("before the SCRAM exchange ended"), "{r}");
}

#[test]
fn sasl_without_scram_is_down() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    let r = reason(done(p.on_bytes(&auth(10, b"OAUTHBEARER\0\0"))));
    assert!(r.contains("want SCRAM-SHA-256"), "{r}");
}

#[test]
fn gss_is_down_when_logging_in() {
    let mut p = pg(WantRole::Primary, Some("probe"), Some("pw"));
    p.start();
    assert!(reason(done(p.on_bytes(&auth(7, b"")))).contains("do not speak"));
}

#[test]
fn a_query_error_is_down() {
    let mut p = pg(WantRole::Primary, Some("probe"), None);
    p.start();
    p.on_bytes(&welcome());
    let r = reason(done(p.on_bytes(&error("42883", "function does not exist"))));
    assert!(
        r.contains("42883 while waiting for pg_is_in_recovery()"),
        "{r}"
    );
    assert_eq!(
        p.goodbye(),
        b"X\0\0\0\x04",
        "the session still ends politely"
    );
}

#[test]
fn odd_answers_are_down() {
    for (answer, words) in [
        (recovery_answer(b"maybe"), "with Some(\"maybe\")"),
        (
            {
                let mut v = message(b'C', b"SELECT 0\0");
                v.extend(ready());
                v
            },
            "no row",
        ),
    ] {
        let mut p = pg(WantRole::Primary, Some("probe"), None);
        p.start();
        p.on_bytes(&welcome());
        let r = reason(done(p.on_bytes(&answer)));
        assert!(r.contains(words), "{r}");
    }
}

#[test]
fn malformed_and_huge_messages_are_down() {
    for (bytes, words) in [
        (vec![b'R', 0, 0, 0, 2], "malformed"),
        (vec![b'R', 0x7f, 0xff, 0xff, 0xff], "announced a message"),
        (message(b'!', b""), "malformed"),
        (message(b'D', b"\0\x01\0\0\0\x01t"), "unexpected message"),
    ] {
        let mut p = pg(WantRole::Primary, Some("probe"), None);
        p.start();
        let r = reason(done(p.on_bytes(&bytes)));
        assert!(r.contains(words), "{bytes:?}: {r}");
    }
}

#[test]
fn eof_names_the_phase() {
    let mut p = pg(WantRole::Primary, Some("probe"), None);
    p.start();
    p.on_bytes(&welcome());
    let r = reason(p.on_eof());
    assert!(r.contains("waiting for pg_is_in_recovery()"), "{r}");
}
