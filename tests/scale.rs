//! Many relays, a slow reader and fd exhaustion, both engines. Each test
//! holds the `serial()` lock: they are heavy, and two of them measure the
//! child proxy's memory and CPU.

#[macro_use]
mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use spliced::{CloseReason, Mode};

both_engines!(
    two_thousand_concurrent_relays,
    slow_reader_keeps_memory_bounded,
    fd_exhaustion_pauses_accept_without_spinning,
);

fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn two_thousand_concurrent_relays(mode: Mode) {
    const N: usize = 2000;
    let _serial = serial();
    raise_nofile();
    let up = echo_server();
    let h = proxy(mode, vec![up.addr], |c| c.workers = 2);

    // Open every connection first, then exchange on each: all N relays are
    // live at the same time.
    let mut clients: Vec<TcpStream> = (0..N).map(|_| connect(h.local_addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(format!("hello {i:05}\n").as_bytes()).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let back = read_exact_within(c, 12, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(back, format!("hello {i:05}\n").as_bytes(), "client {i}");
    }
    wait_stats(
        &h,
        Duration::from_secs(5),
        "all relays are live at once",
        |s| s.relays_active == N as u64,
    );
    assert_eq!(up.accepted(), N);

    for c in &clients {
        c.shutdown(Shutdown::Write).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let rest =
            read_to_eof(c, Duration::from_secs(20)).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(rest.is_empty(), "client {i}: bytes after the echo");
    }
    drop(clients);

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.relays_accepted, N as u64, "{s:#?}");
    assert_eq!(s.closed(CloseReason::Eof), N as u64, "{s:#?}");
}

fn slow_reader_keeps_memory_bounded(mode: Mode) {
    const TOTAL: usize = 200 * MIB;
    const STALL: Duration = Duration::from_secs(3);
    const RSS_LIMIT_KIB: u64 = 64 * 1024;
    let _serial = serial();

    let written = Arc::new(AtomicUsize::new(0));
    let (tx, sent_rx) = std::sync::mpsc::channel();
    let up = {
        let written = Arc::clone(&written);
        serve(move |mut s: TcpStream| {
            let d = send_stream(&mut s, 0x51_0E, TOTAL, 16 * 1024, Some(&written));
            if d.is_ok() {
                let _ = s.shutdown(Shutdown::Write);
            }
            tx.send(d.map_err(|e| e.to_string())).unwrap();
        })
    };
    let addr = up.addr.to_string();
    let proxy = Spliced::run(&[
        "--upstream",
        &addr,
        "--mode",
        mode.as_str(),
        "--workers",
        "1",
    ]);
    let baseline = proxy.rss_kib();

    let mut client = connect(proxy.addr);
    // The slow reader: read nothing for STALL while the upstream pushes.
    let started = Instant::now();
    let mut peak = baseline;
    while started.elapsed() < STALL {
        peak = peak.max(proxy.rss_kib());
        pace(Duration::from_millis(50));
    }
    let stalled_at = written.load(Ordering::Relaxed);
    eprintln!(
        "{mode}: RSS baseline {baseline} KiB, peak {peak} KiB while stalled; \
         upstream wrote {} KiB",
        stalled_at / 1024
    );
    assert!(
        peak < RSS_LIMIT_KIB,
        "proxy RSS reached {peak} KiB (baseline {baseline} KiB) while the client read nothing"
    );
    assert!(
        stalled_at > 0,
        "the upstream sent nothing in {STALL:?} ({} upstream connection(s) accepted); proxy log:\n{}",
        up.accepted(),
        proxy.logs().join("\n")
    );
    assert!(
        stalled_at < TOTAL / 2,
        "backpressure: the upstream wrote {stalled_at} bytes to a reader that read nothing"
    );

    let got = digest_to_eof(&mut client, Duration::from_secs(60)).expect("client read");
    let sent = sent_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("upstream send");
    assert_eq!(got, sent, "the stalled stream arrived damaged");
    assert_eq!(got.len, TOTAL as u64);
    client.shutdown(Shutdown::Write).unwrap();
    wait_until(
        Duration::from_secs(5),
        "the proxy logs the relay's close",
        || proxy.logs().iter().any(|l| l.contains("relay closed")),
    );
}

fn fd_exhaustion_pauses_accept_without_spinning(mode: Mode) {
    const NOFILE: u32 = 64;
    const CLIENTS: usize = 120;
    let _serial = serial();
    let up = echo_server();
    let addr = up.addr.to_string();
    let proxy = Spliced::run_with_nofile(
        NOFILE,
        &[
            "--upstream",
            &addr,
            "--mode",
            mode.as_str(),
            "--workers",
            "1",
        ],
    );

    // It serves before the flood.
    let mut first = connect(proxy.addr);
    round_trip(&mut first, b"before", Duration::from_secs(5));

    // More clients than the proxy has fds for. Connects complete in the
    // kernel's accept queue whether or not the proxy can accept them.
    let mut flood = Vec::new();
    for i in 0..CLIENTS {
        if let Ok(mut c) = TcpStream::connect_timeout(&proxy.addr, Duration::from_millis(300)) {
            let _ = c.write_all(format!("flood {i}").as_bytes());
            flood.push(c);
        }
    }
    assert!(
        flood.len() > NOFILE as usize,
        "only {} of {CLIENTS} connects succeeded",
        flood.len()
    );

    // Out of fds (or at the relay cap derived from them) with connections
    // pending: it must wait, not spin.
    let cpu_before = proxy.cpu_time();
    let window = Duration::from_secs(2);
    measure_window(window);
    let cpu = proxy.cpu_time() - cpu_before;
    let served = up.accepted();
    eprintln!(
        "{mode}: {} fds open, {served} upstream connections for {} clients, \
         {cpu:?} CPU over {window:?}",
        proxy.fd_count(),
        flood.len() + 1
    );
    assert!(
        served < flood.len() + 1,
        "all {served} clients were served: the fd limit was never reached"
    );
    assert!(
        cpu < Duration::from_millis(500),
        "the proxy burned {cpu:?} CPU in {window:?} while out of fds"
    );
    assert!(proxy.fd_count() > 0, "the proxy died");

    // Free everything; new connections get served again.
    drop(flood);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt =
            TcpStream::connect_timeout(&proxy.addr, Duration::from_secs(1)).and_then(|mut c| {
                c.write_all(b"after")?;
                read_exact_within(&mut c, 5, Duration::from_secs(2))
            });
        match attempt {
            Ok(back) => {
                assert_eq!(back, b"after");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                // The backlog of closed clients is still being worked off.
                eprintln!("not served yet: {e}");
                thread::yield_now();
            }
            Err(e) => panic!("no longer served after the clients closed: {e}"),
        }
    }
    assert!(
        !proxy.logs().iter().any(|l| l.contains("panicked")),
        "the proxy panicked:\n{}",
        proxy.logs().join("\n")
    );
}
