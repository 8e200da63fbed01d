//! PROXY protocol headers in (v1, v2, malformed, untrusted, late) and out,
//! and access limits judged by the address a header names.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use spliced::config::{AcceptProxy, SendProxy};
use spliced::proxy_protocol::{self, Parse};
use spliced::{Mode, ProxyHandle};

use super::T;
use crate::common::*;

// Every case that relays bytes, under every engine.
both_engines!(
    a_v1_header_in_becomes_a_v2_header_out_with_the_same_addresses,
    a_v2_header_in_becomes_a_v1_header_out,
    send_proxy_alone_names_the_real_client,
    limits_apply_to_the_address_in_the_header,
);

/// An upstream that parses the PROXY header it is sent, reports it with
/// the payload that followed, and closes.
fn header_reader() -> (Server, mpsc::Receiver<(proxy_protocol::Parsed, Vec<u8>)>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let server = serve(move |mut s: TcpStream| {
        s.set_read_timeout(Some(T)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if let Ok(Parse::Complete(h)) = proxy_protocol::parse(&got) {
                if got.len() >= h.header_len + 5 {
                    let rest = got[h.header_len..].to_vec();
                    let _ = tx.lock().unwrap().send((h, rest));
                    return;
                }
            }
        }
    });
    (server, rx)
}

fn proxied(mode: Mode, upstream: SocketAddr, trusted: &str, send: SendProxy) -> ProxyHandle {
    proxy(mode, vec![upstream], |c| {
        c.listeners[0].accept_proxy = Some(AcceptProxy::new(vec![trusted.parse().unwrap()]));
        c.listeners[0].pool.send_proxy = send;
    })
}

fn a_v1_header_in_becomes_a_v2_header_out_with_the_same_addresses(mode: Mode) {
    let (up, rx) = header_reader();
    let h = proxied(mode, up.addr, "127.0.0.0/8", SendProxy::V2);
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    c.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 6432\r\nhello")
        .unwrap();
    let (header, rest) = rx.recv_timeout(T).unwrap();
    assert_eq!(header.version, 2);
    assert_eq!(header.source, Some("192.0.2.7:5555".parse().unwrap()));
    assert_eq!(
        header.destination,
        Some("198.51.100.1:6432".parse().unwrap())
    );
    assert_eq!(rest, b"hello");
}

fn a_v2_header_in_becomes_a_v1_header_out(mode: Mode) {
    let (up, rx) = header_reader();
    let h = proxied(mode, up.addr, "127.0.0.1/32", SendProxy::V1);
    let src: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1]:5432".parse().unwrap();
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    let mut msg = proxy_protocol::encode_v2(Some((src, dst)));
    msg.extend_from_slice(b"world");
    c.write_all(&msg).unwrap();
    let (header, rest) = rx.recv_timeout(T).unwrap();
    assert_eq!(header.version, 1);
    assert_eq!((header.source, header.destination), (Some(src), Some(dst)));
    assert_eq!(rest, b"world");
}

fn send_proxy_alone_names_the_real_client(mode: Mode) {
    let (up, rx) = header_reader();
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].pool.send_proxy = SendProxy::V2;
    });
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    c.write_all(b"12345").unwrap();
    let (header, rest) = rx.recv_timeout(T).unwrap();
    assert_eq!(header.source, Some(c.local_addr().unwrap()));
    assert_eq!(header.destination, Some(h.local_addr()));
    assert_eq!(rest, b"12345");
}

fn expect_refused(h: &ProxyHandle, up: &Server, send: &[u8]) {
    let before = h.stats().refused_proxy_header;
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    if !send.is_empty() {
        c.write_all(send).unwrap();
    }
    let (ending, _) = expect_closed(&mut c, T);
    assert_eq!(ending, Ending::Reset);
    wait_until(T, "the refusal is counted", || {
        h.stats().refused_proxy_header == before + 1
    });
    assert_eq!(up.accepted(), 0, "no server was contacted");
}

#[test]
fn malformed_headers_reset_the_client_and_are_counted() {
    let up = echo_server();
    let h = proxied(Mode::Splice, up.addr, "127.0.0.0/8", SendProxy::None);
    expect_refused(&h, &up, b"GET / HTTP/1.1\r\n\r\n");
    expect_refused(&h, &up, b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n");
    expect_refused(&h, &up, &[b'P'; 200]);
    let mut bad_v2 = proxy_protocol::V2_SIGNATURE.to_vec();
    bad_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    expect_refused(&h, &up, &bad_v2);
}

#[test]
fn an_untrusted_source_is_reset_at_accept() {
    let up = echo_server();
    let h = proxied(Mode::Splice, up.addr, "10.0.0.0/8", SendProxy::None);
    // Reset at accept, before it could send anything.
    expect_refused(&h, &up, b"");
}

fn limits_apply_to_the_address_in_the_header(mode: Mode) {
    let up = echo_server();
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].accept_proxy = Some(AcceptProxy::new(vec!["127.0.0.0/8".parse().unwrap()]));
        c.listeners[0].access.deny = vec!["192.0.2.0/24".parse().unwrap()];
    });
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    c.write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 1 2\r\n")
        .unwrap();
    assert_eq!(expect_closed(&mut c, T).0, Ending::Reset);
    wait_until(T, "denied by the header's address", || {
        h.stats().refused_denied == 1
    });
    let mut ok = TcpStream::connect(h.local_addr()).unwrap();
    ok.write_all(b"PROXY TCP4 198.51.100.9 127.0.0.1 1 2\r\n")
        .unwrap();
    round_trip(&mut ok, b"allowed", T);
}

#[test]
fn a_header_not_whole_within_its_timeout_is_reset() {
    let up = echo_server();
    let timeout = Duration::from_millis(300);
    let h = proxy(Mode::Splice, vec![up.addr], |c| {
        let mut accept = AcceptProxy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        accept.timeout = timeout;
        c.listeners[0].accept_proxy = Some(accept);
    });
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    c.write_all(b"PROXY TCP4 192.0.2.9").unwrap();
    let (ending, after) = expect_closed(&mut c, T);
    assert_eq!(ending, Ending::Reset);
    assert!(
        after >= timeout && after < AcceptProxy::DEFAULT_TIMEOUT,
        "reset after {after:?}, the timeout is {timeout:?}"
    );
    wait_until(T, "the late header is counted", || {
        h.stats().refused_proxy_header == 1
    });
    assert_eq!(up.accepted(), 0, "no server was contacted");
}
