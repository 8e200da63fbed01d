//! The health probes' invariants on arbitrary server bytes, for the
//! `health_reply` target and the properties in `health::tests`.

use std::net::SocketAddr;

use crate::health::{CheckSpec, Kind, Probe, Step, Verdict, WantRole};

/// Byte 0 picks the kind, the wanted role and whether a password is set;
/// the rest is chunks, each a length byte and that many bytes.
pub fn decode_health(data: &[u8]) -> (CheckSpec, Vec<&[u8]>) {
    let sel = data.first().copied().unwrap_or(0);
    let kind = [
        Kind::Tcp,
        Kind::Redis,
        Kind::Postgres,
        Kind::Mysql,
        Kind::Http,
    ][sel as usize % 5];
    let role = match kind {
        Kind::Redis | Kind::Postgres => {
            [WantRole::Any, WantRole::Primary, WantRole::Replica][(sel as usize / 5) % 3]
        }
        _ => WantRole::Any,
    };
    let mut spec = CheckSpec::new(kind);
    spec.role = role;
    if matches!(kind, Kind::Redis | Kind::Postgres) && (sel / 15) % 2 == 1 {
        spec.user = Some("probe".into());
        spec.password = Some("pw".into());
    }
    let mut chunks = Vec::new();
    let mut rest = data.get(1..).unwrap_or_default();
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        chunks.push(&tail[..n]);
        rest = &tail[n..];
    }
    (spec, chunks)
}

/// Feeds the chunks; returns the verdict (EOF after the last chunk).
fn feed(spec: &CheckSpec, chunks: &[&[u8]]) -> Verdict {
    let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
    let mut p = Probe::new(spec, addr);
    let mut done = match p.start() {
        Step::Done(v) => Some(v),
        _ => None,
    };
    for c in chunks {
        let step = p.on_bytes(c);
        match (&done, step) {
            (Some(v), Step::Done(w)) => assert_eq!(v, &w, "a verdict changed"),
            (Some(v), other) => panic!("{other:?} after {v:?}"),
            (None, Step::Done(w)) => done = Some(w),
            (None, _) => {}
        }
    }
    let eof = p.on_eof();
    if let Some(v) = &done {
        assert_eq!(v, &eof, "EOF changed the verdict");
    }
    assert_eq!(p.verdict(), Some(&eof));
    if let Verdict::Down { reason } = &eof {
        assert!(!reason.is_empty() && !reason.contains('\n'), "{reason:?}");
        assert!(reason.len() < 1024, "reason of {} bytes", reason.len());
    }
    eof
}

/// The verdict for a fuzz input, chunk by chunk (for seed checks).
pub fn health_verdict(data: &[u8]) -> Verdict {
    let (spec, chunks) = decode_health(data);
    feed(&spec, &chunks)
}

/// Panics when an invariant breaks: a verdict once given never changes and
/// nothing is sent after it; reasons are one bounded line; and except for
/// Redis (which refuses replies it did not ask for yet, so a server that
/// runs ahead is judged by how its bytes were split), the verdict does not
/// depend on how the bytes were split.
pub fn health_reply(data: &[u8]) {
    let (spec, chunks) = decode_health(data);
    let chunked = feed(&spec, &chunks);
    if spec.kind != Kind::Redis {
        let whole: Vec<u8> = chunks.concat();
        let one = feed(&spec, &[&whole]);
        // SCRAM nonces are random; no fuzzed server can complete that login,
        // so both ways fail, perhaps at different bytes.
        if !(spec.kind == Kind::Postgres && spec.password.is_some()) {
            assert_eq!(chunked, one, "the split changed the verdict");
        } else {
            assert_eq!(chunked.is_up(), one.is_up(), "the split changed up/down");
        }
    }
}
