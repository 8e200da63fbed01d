//! Resets and refused upstreams, both engines: a reset on one side becomes a
//! reset on the other, a dead upstream closes the client quickly, and a
//! second upstream takes over from a dead first one.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use spliced::{CloseReason, Mode};

both_engines!(
    upstream_reset_resets_client,
    client_reset_resets_upstream,
    refused_upstream_closes_client,
    second_upstream_used_when_first_refuses,
);

fn upstream_reset_resets_client(mode: Mode) {
    const DATA: usize = 256 * 1024;
    let up = serve(|mut s: TcpStream| {
        s.write_all(&pattern(1, DATA)).unwrap();
        // The client answers once it has everything; then reset mid-relay
        // (the client has not half-closed, nor have we).
        let ack = read_exact_within(&mut s, 1, Duration::from_secs(10)).unwrap();
        assert_eq!(ack, b"!");
        set_linger_zero(&s);
        drop(s);
    });
    let h = proxy(mode, vec![up.addr], |_| {});

    let mut client = connect(h.local_addr());
    let got = read_exact_within(&mut client, DATA, Duration::from_secs(10)).unwrap();
    assert!(got == pattern(1, DATA), "data before the reset differs");
    client.write_all(b"!").unwrap();

    let (ending, took) = expect_closed(&mut client, Duration::from_secs(2));
    assert_eq!(
        ending,
        Ending::Reset,
        "the upstream reset, but the client saw a clean EOF (after {took:?})"
    );

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::UpstreamReset), 1, "{s:#?}");
}

fn client_reset_resets_upstream(mode: Mode) {
    let (tx, upstream_saw) = mpsc::channel();
    let (got_tx, got_rx) = mpsc::channel();
    let up = serve(move |mut s: TcpStream| {
        let hello = read_exact_within(&mut s, 5, Duration::from_secs(10)).unwrap();
        got_tx.send(hello).unwrap();
        // Wait for whatever comes next: it must be a reset, not EOF.
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        let r = s.read(&mut buf).map_err(|e| e.kind());
        tx.send(r).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |_| {});

    let client = connect(h.local_addr());
    (&client).write_all(b"hello").unwrap();
    let hello = got_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(hello, b"hello");
    set_linger_zero(&client);
    drop(client);

    let r = upstream_saw.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        r,
        Err(ErrorKind::ConnectionReset),
        "the client reset; the upstream's read gave {r:?} (Ok(0) = clean EOF)"
    );

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::ClientReset), 1, "{s:#?}");
}

fn refused_upstream_closes_client(mode: Mode) {
    let dead = refused_addr();
    let h = proxy(mode, vec![dead], |_| {});

    for _ in 0..3 {
        let mut client = connect(h.local_addr());
        // A refused connect fails at once: the client is closed well before
        // any timeout, with a FIN (no byte of it was accepted).
        let (ending, took) = expect_closed(&mut client, Duration::from_secs(10));
        assert!(took < Duration::from_secs(1), "closed after {took:?}");
        assert_eq!(ending, Ending::Eof);
    }

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.relays_accepted, 3, "{s:#?}");
    assert_eq!(s.closed(CloseReason::ConnectFailed), 3, "{s:#?}");
    assert!(s.upstream_connect_failures >= 3, "{s:#?}");
}

fn second_upstream_used_when_first_refuses(mode: Mode) {
    let dead = refused_addr();
    let up = echo_server();
    let h = proxy(mode, vec![dead, up.addr], |_| {});

    // Round-robin: whichever upstream a connection starts with, it must end
    // up on the live one.
    for i in 0..6u64 {
        let mut client = connect(h.local_addr());
        let msg = pattern(100 + i, 128 * 1024);
        round_trip(&mut client, &msg, Duration::from_secs(5));
        client.shutdown(Shutdown::Write).unwrap();
        let rest = read_to_eof(&mut client, Duration::from_secs(5)).unwrap();
        assert!(rest.is_empty());
    }
    assert_eq!(
        up.accepted(),
        6,
        "every connection reached the live upstream"
    );

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), 6, "{s:#?}");
    assert_eq!(s.closed(CloseReason::ConnectFailed), 0, "{s:#?}");
    assert!(
        s.upstream_connect_failures >= 1,
        "round-robin never tried the dead upstream: {s:#?}"
    );
}
