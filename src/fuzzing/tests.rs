use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::engine::Endpoints;
use crate::error::{Op, Side};
use crate::relay::Peer;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 6] = [
    ("direction", direction_script),
    ("relay_pair", pair_script),
    ("config", config_text),
    ("proxy_header", proxy_header),
    ("health_reply", health_reply),
    ("client_hello", client_hello),
];

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// The committed seed corpus (and any minimized crash saved beside it)
/// is a regression suite, with or without cargo-fuzz.
#[test]
fn seed_corpus_passes() {
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for (path, data) in seeds {
            if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                panic!("{}: {:?}", path.display(), panic.downcast_ref::<String>());
            }
        }
    }
}

/// A tiny xorshift generator: no extra dependency for the fallback loop.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The fallback when cargo-fuzz cannot run: `SPLICED_FUZZ_SECS` seconds
/// of random and mutated-seed inputs for `SPLICED_FUZZ_TARGET` (all
/// targets if unset). Run by scripts/fuzz.sh with `--ignored`.
#[test]
#[ignore = "long-running; scripts/fuzz.sh runs it when cargo-fuzz cannot"]
fn random_inputs() {
    let secs: u64 = std::env::var("SPLICED_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("SPLICED_FUZZ_TARGET").ok();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    for (name, target) in TARGETS {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mut rng = Rng(seed);
        let corpus: Vec<Vec<u8>> = seeds(name).into_iter().map(|(_, d)| d).collect();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut runs = 0u64;
        while Instant::now() < end {
            let mut data = if rng.next() % 2 == 0 {
                corpus[rng.next() as usize % corpus.len()].clone()
            } else {
                Vec::new()
            };
            let len = (rng.next() % 256) as usize;
            for _ in 0..len {
                let b = rng.next() as u8;
                if !data.is_empty() && rng.next() % 3 == 0 {
                    let at = rng.next() as usize % data.len();
                    data[at] = b;
                } else {
                    data.push(b);
                }
            }
            if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                panic!(
                    "{name}: input {data:?} failed: {:?}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or(panic.downcast_ref::<&str>().copied())
                );
            }
            runs += 1;
        }
        eprintln!("fuzz fallback: {name}: {runs} inputs in {secs}s, no failure");
    }
}

#[test]
fn a_release_of_a_full_buffer_is_caught() {
    let mut e = Engine::default();
    e.fills.push_back(Step::Moved(3));
    e.fill(0).unwrap();
    let caught = std::panic::catch_unwind(move || e.release());
    assert!(caught.is_err(), "the engine must catch a lost buffer");
}

#[test]
fn a_drifted_pending_count_is_caught() {
    let mut e = Engine::default();
    e.fills.push_back(Step::Moved(3));
    e.fill(0).unwrap();
    let caught = std::panic::catch_unwind(move || e.drain(2));
    assert!(caught.is_err(), "the engine must catch pending drift");
}

#[test]
fn a_plain_transfer_finishes() {
    let setup = DirSetup {
        settle: true,
        ..DirSetup::default()
    };
    let out = run_direction(
        &setup,
        &[
            Action::Fill(Step::Moved(10)),
            Action::Drain(Step::Moved(4)),
            Action::Pump(16),
        ],
    );
    assert!(out.finished);
    assert_eq!((out.filled, out.drained, out.shutdowns), (10, 10, 1));
    assert!(!out.holding);
}

#[test]
fn a_reset_ends_the_pair_and_discards_both_buffers() {
    let setup = PairSetup {
        settle: true,
        ..PairSetup::default()
    };
    let out = run_pair(
        &setup,
        &[
            PairAction::Fill(Peer::Upstream, Step::Moved(7)),
            PairAction::Drain(Peer::Upstream, Step::WouldBlock),
            PairAction::Pump,
            PairAction::Fill(Peer::Client, Step::Fail(io::ErrorKind::ConnectionReset)),
            PairAction::Ready(Peer::Client, true, false),
            PairAction::Pump,
            PairAction::Pump,
        ],
    );
    assert_eq!(out.pumps, 2, "nothing runs after the error");
    assert_eq!(out.error, Some((Side::Client, Op::Read)));
    assert_eq!(out.discards, [Some(Discard::Pooled), Some(Discard::Closed)]);
}

#[test]
fn config_examples() {
    for text in [
        "0",
        "0s",
        "30s",
        "1m30s",
        " 5m ",
        "1h",
        "500ms",
        "7us",
        "2d",
        "",
        "30",
        "5 s",
        "1x",
        "99999999999999999999s",
        "18446744073709551615d",
    ] {
        check_duration_text(text);
    }
    for text in [
        "65536",
        "64k",
        "1MiB",
        "1m",
        " 2G",
        "k",
        "1 k",
        "18446744073709551615",
        "18446744073709551615k",
    ] {
        check_size_text(text);
    }
    check_duration_number(0);
    check_duration_number(90);
    check_duration_number(u64::MAX);
    check_size_number(u64::MAX);
}

/// The health seeds reach the verdicts their names promise, so the corpus
/// starts deep in each conversation.
#[test]
fn health_seeds_reach_their_verdicts() {
    for (path, data) in seeds("health_reply") {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let up = [
            "tcp",
            "redis_pong",
            "redis_split_pong",
            "redis_primary",
            "redis_auth",
            "pg_alive_md5",
            "pg_trust_primary",
            "pg_trust_replica",
            "pg_md5_login",
            "mysql_handshake",
            "http_200",
        ]
        .contains(&name.as_str());
        let v = health_verdict(&data);
        assert_eq!(v.is_up(), up, "{name}: {v}");
    }
}

/// The ClientHello seeds reach the answers their names promise: real
/// hellos (whole and re-split) are Done, the cut one Incomplete, the rest
/// refused.
#[test]
fn hello_seeds_reach_their_answers() {
    use crate::route::hello::{parse, HelloParse};
    for (path, data) in seeds("client_hello") {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let answer = parse(&data);
        match name.as_str() {
            "openssl_s_client"
            | "openssl_split_three"
            | "libpq18_direct"
            | "libpq18_after_sslrequest"
            | "libpq18_split" => {
                assert!(matches!(answer, HelloParse::Done(_)), "{name}: {answer:?}")
            }
            "openssl_truncated" => assert_eq!(answer, HelloParse::Incomplete, "{name}"),
            _ => assert!(
                matches!(answer, HelloParse::Invalid(_)),
                "{name}: {answer:?}"
            ),
        }
    }
}
