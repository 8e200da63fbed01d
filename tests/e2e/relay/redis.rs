//! Redis clients through spliced: redis-benchmark, a large `redis-cli
//! --pipe` load, and sampled GETs compared value by value.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{all_closed_clean, listener, stops_cleanly};
use crate::fixture::{
    free_port, knob, loopback, redis_benchmark, redis_bin, redis_cli, run_limited, Proxy, Redis,
    Resp, RespConn, TempDir,
};

const PAD: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_";

fn keys() -> u64 {
    knob("E2E_REDIS_KEYS", 100_000)
}

fn key(mode: &str, i: u64) -> String {
    format!("e2e:{mode}:{i}")
}

fn value(mode: &str, i: u64) -> String {
    format!("val:{i}:{mode}:{PAD}")
}

/// `n` RESP `SET`s, as `redis-cli --pipe` reads them.
fn write_pipe(path: &Path, mode: &str, n: u64) -> usize {
    let mut out = Vec::new();
    for i in 1..=n {
        let (k, v) = (key(mode, i), value(mode, i));
        out.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    std::fs::write(path, &out).unwrap();
    out.len()
}

/// One command on a fresh connection.
fn one(addr: SocketAddr, args: &[&str]) -> Resp {
    RespConn::connect(addr, Duration::from_secs(10))
        .and_then(|mut c| c.cmd(args))
        .unwrap_or_else(|e| panic!("{args:?} via {addr}: {e}"))
}

/// 500 GETs spread over the keys (the first sample, the last key, the
/// rest scattered) and one of a key never set, in one pipeline: the
/// replies in order.
fn sampled_gets(addr: SocketAddr, mode: &str, n: u64) -> (Vec<Resp>, Vec<Resp>) {
    let mut idx: Vec<u64> = (0..500u64).map(|k| 1 + (k * 7919 + k * k) % n).collect();
    idx[1] = n;
    let mut cmds: Vec<Vec<String>> = idx
        .iter()
        .map(|i| vec!["GET".to_string(), key(mode, *i)])
        .collect();
    cmds.push(vec!["GET".into(), key(mode, n + 1)]);
    let mut want: Vec<Resp> = idx
        .iter()
        .map(|i| Resp::Bulk(Some(value(mode, *i).into_bytes())))
        .collect();
    want.push(Resp::Bulk(None));
    let cmds: Vec<Vec<&str>> = cmds
        .iter()
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();
    let cmds: Vec<&[&str]> = cmds.iter().map(Vec::as_slice).collect();
    let got = RespConn::connect(addr, Duration::from_secs(30))
        .and_then(|mut c| c.pipeline(&cmds))
        .unwrap_or_else(|e| panic!("GETs via {addr}: {e}"));
    (want, got)
}

fn redis_clients_through_spliced(mode: &str) {
    let test = format!("redis_clients_through_spliced({mode})");
    let Some(bin) = redis_bin(&test) else { return };
    let dir = TempDir::new(&format!("e2e-relay-redis-{mode}"));
    let server = Redis::master(&bin, &dir, "redis", None);
    let port = free_port();
    let proxy = Proxy::start(
        &dir,
        &format!("relay-redis-{mode}"),
        &listener("redis", port, server.port, mode, ""),
    );
    let via = loopback(port);

    redis_benchmark(
        via,
        "set,get,incr,lpush,mset",
        &["-n", "20000", "-c", "20"],
        &format!("[{mode}] redis-benchmark via spliced"),
    );

    // 100 000 SETs in one `redis-cli --pipe` stream.
    let n = keys();
    assert_eq!(
        one(via, &["FLUSHALL"]),
        Resp::Simple("OK".into()),
        "FLUSHALL"
    );
    let file = dir.join("pipe.resp");
    let size = write_pipe(&file, mode, n);
    let ran = run_limited(
        redis_cli(via, &["--pipe"]),
        Some(&file),
        Duration::from_secs(120),
    );
    eprintln!(
        "[{mode}] --pipe of {size} bytes, {n} SETs: {}",
        ran.out().trim()
    );
    assert!(ran.ok(), "[{mode}] redis-cli --pipe: {}", ran.show());
    let summary = format!("errors: 0, replies: {n}");
    assert!(
        ran.out().lines().any(|l| l.trim() == summary),
        "[{mode}] expected the line '{summary}': {}",
        ran.show()
    );
    assert_eq!(
        one(via, &["DBSIZE"]),
        Resp::Int(n as i64),
        "[{mode}] DBSIZE via spliced"
    );
    let _ = std::fs::remove_file(&file);

    // Sampled GETs via spliced match the generated values; read directly,
    // the same sample agrees.
    let (want, got) = sampled_gets(via, mode, n);
    let differ: Vec<usize> = (0..want.len()).filter(|i| want[*i] != got[*i]).collect();
    assert!(
        differ.is_empty() && got.len() == want.len(),
        "[{mode}] {} of {} GET replies via spliced differ, first at {:?}: want {:?}, got {:?}",
        differ.len(),
        want.len(),
        differ.first(),
        differ.first().map(|i| &want[*i]),
        differ.first().map(|i| &got[*i])
    );
    let (_, direct) = sampled_gets(server.addr(), mode, n);
    assert!(direct == want, "[{mode}] direct GETs disagree");

    all_closed_clean(&proxy, "redis", 0);
    stops_cleanly(proxy);
}

crate::every_engine!(redis_clients_through_spliced);
