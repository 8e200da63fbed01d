use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn complete(buf: &[u8]) -> Parsed {
    match parse(buf) {
        Ok(Parse::Complete(p)) => p,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn error(buf: &[u8]) -> ProxyHeaderError {
    match parse(buf) {
        Err(e) => e,
        ok => panic!(
            "{:?}: expected an error, got {ok:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

/// Every proper prefix of a complete header is Incomplete.
fn prefixes_incomplete(buf: &[u8], header_len: usize) {
    for n in 0..header_len {
        assert_eq!(
            parse(&buf[..n]),
            Ok(Parse::Incomplete),
            "prefix {n} of {buf:?}"
        );
    }
}

// Tests for v1

#[test]
fn v1_tcp4_with_payload_after() {
    let buf = b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\nGET / HTTP/1.1\r\n";
    let p = complete(buf);
    assert_eq!(p.header_len, 43);
    assert_eq!(p.version, 1);
    assert_eq!(p.source, Some(sa("192.168.0.1:56324")));
    assert_eq!(p.destination, Some(sa("10.0.0.2:443")));
    prefixes_incomplete(buf, p.header_len);
}

#[test]
fn v1_tcp6() {
    let p = complete(b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n");
    assert_eq!(p.source, Some(sa("[2001:db8::1]:0")));
    assert_eq!(p.destination, Some(sa("[::1]:65535")));
}

#[test]
fn v1_unknown_gives_no_addresses() {
    for line in [
        &b"PROXY UNKNOWN\r\n"[..],
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    ] {
        let p = complete(line);
        assert_eq!((p.source, p.destination), (None, None));
        assert_eq!(p.header_len, line.len());
    }
}

#[test]
fn v1_longest_header_fits_and_one_more_byte_does_not() {
    let worst = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(
        complete(worst).header_len,
        104,
        "the specification's worst case"
    );
    let mut longest = b"PROXY UNKNOWN ".to_vec();
    longest.resize(V1_MAX - 2, b'x');
    longest.extend_from_slice(b"\r\n");
    assert_eq!(complete(&longest).header_len, V1_MAX);
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX - 1, b'x');
    assert_eq!(parse(&long), Ok(Parse::Incomplete));
    long.extend_from_slice(b"\r\n");
    assert_eq!(error(&long), ProxyHeaderError::V1TooLong);
    assert_eq!(error(&long[..V1_MAX]), ProxyHeaderError::V1TooLong);
}

#[test]
fn v1_malformed_lines_are_refused() {
    for (line, why) in [
        (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"[..], "five"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "five"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "five"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "five"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "IPv4 source"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "IPv4 destination"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4 source"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6 source"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r\n", "destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR without LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "control"),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "control"),
        (b"PROXY \xc3\xa9\r\n", "control"),
    ] {
        match error(line) {
            ProxyHeaderError::V1Malformed(w) => {
                assert!(w.contains(why), "{:?}: {w}", String::from_utf8_lossy(line))
            }
            other => panic!("{line:?}: {other:?}"),
        }
    }
}

#[test]
fn v1_a_bad_byte_is_refused_as_soon_as_it_arrives() {
    assert!(parse(b"PROXY TCP4 1.2\0").is_err());
    assert!(parse(b"PROXY TCP4 1.2\r").unwrap() == Parse::Incomplete);
}

#[test]
fn neither_signature_is_refused_at_once() {
    for buf in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"X",
        b"PROXX",
        b"proxy ",
        b"\r\n\r\n\0\r\nQUIX",
    ] {
        assert_eq!(error(buf), ProxyHeaderError::NotProxy, "{buf:?}");
    }
}

// Tests for v2

fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[ver_cmd, fam]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

const INET: [u8; 12] = [10, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x01, 0xbb];

#[test]
fn v2_tcp4_with_payload_after() {
    let mut buf = v2(0x21, 0x11, &INET);
    buf.extend_from_slice(b"payload");
    let p = complete(&buf);
    assert_eq!(p.header_len, 28);
    assert_eq!(p.version, 2);
    assert_eq!(p.source, Some(sa("10.0.0.1:8080")));
    assert_eq!(p.destination, Some(sa("10.0.0.2:443")));
    prefixes_incomplete(&buf, p.header_len);
}

#[test]
fn v2_tcp6() {
    let mut body = [0u8; 36];
    body[15] = 1;
    body[16] = 0x20;
    body[17] = 0x01;
    body[32..].copy_from_slice(&[0, 1, 0xff, 0xff]);
    let p = complete(&v2(0x21, 0x21, &body));
    assert_eq!(p.source, Some(sa("[::1]:1")));
    assert_eq!(p.destination, Some(sa("[2001::]:65535")));
}

#[test]
fn v2_local_unspec_and_unix_give_no_addresses() {
    for buf in [
        v2(0x20, 0x00, b""),
        v2(0x20, 0x11, &INET),
        v2(0x20, 0x12, &INET),
        v2(0x21, 0x00, b""),
        v2(0x21, 0x31, &[0u8; 216]),
    ] {
        let p = complete(&buf);
        assert_eq!((p.source, p.destination), (None, None), "{buf:?}");
        assert_eq!(p.header_len, buf.len());
    }
}

#[test]
fn v2_tlvs_within_the_cap() {
    let mut body = INET.to_vec();
    body.extend_from_slice(&[0x04, 0x00, 0x00]); // NOOP, empty
    body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // ALPN
    assert_eq!(complete(&v2(0x21, 0x11, &body)).header_len, 16 + 20);
    let mut big = INET.to_vec();
    big.extend_from_slice(&[0x04, 0x01, 0xfd]);
    big.resize(12 + V2_MAX_EXTRA, 0);
    assert_eq!(complete(&v2(0x21, 0x11, &big)).header_len, 16 + 12 + 512);
}

#[test]
fn v2_malformed_headers_are_refused() {
    use ProxyHeaderError::*;
    let mut over = INET.to_vec();
    over.resize(12 + V2_MAX_EXTRA + 1, 0);
    for (buf, want) in [
        (v2(0x11, 0x11, &INET), V2Version(1)),
        (v2(0x31, 0x11, &INET), V2Version(3)),
        (v2(0x22, 0x11, &INET), V2Command(2)),
        (v2(0x21, 0x12, &INET), V2Family(0x12)),
        (v2(0x21, 0x41, &INET), V2Family(0x41)),
        (v2(0x21, 0x13, &INET), V2Family(0x13)),
        (v2(0x20, 0x41, &INET), V2Family(0x41)),
        (v2(0x20, 0x10, &INET), V2Family(0x10)),
        (v2(0x20, 0x22, &INET), V2Short(12)),
        (v2(0x21, 0x21, &INET), V2Short(12)),
        (v2(0x21, 0x11, &over), V2TooLong(12 + 513)),
        (v2(0x21, 0x11, &[&INET[..], &[1, 0, 5, 0]].concat()), V2Tlv),
        (v2(0x21, 0x11, &[&INET[..], &[1, 0]].concat()), V2Tlv),
    ] {
        assert_eq!(error(&buf), want, "{buf:?}");
    }
}

#[test]
fn v2_an_oversized_length_is_refused_before_the_body_arrives() {
    let mut head = V2_SIGNATURE.to_vec();
    head.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    assert_eq!(error(&head), ProxyHeaderError::V2TooLong(65535));
}

// Tests for the encoders

#[test]
fn encoders_write_the_documented_bytes() {
    let (s, d) = (sa("192.168.0.1:56324"), sa("10.0.0.2:443"));
    assert_eq!(
        encode_v1(Some((s, d))),
        b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n"
    );
    assert_eq!(encode_v1(None), b"PROXY UNKNOWN\r\n");
    assert_eq!(encode_v2(None), v2(0x20, 0x00, b""));
    let mut body = vec![192, 168, 0, 1, 10, 0, 0, 2];
    body.extend_from_slice(&56324u16.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    assert_eq!(encode_v2(Some((s, d))), v2(0x21, 0x11, &body));
}

#[test]
fn encoders_map_a_mixed_pair_to_ipv6() {
    let (s, d) = (sa("10.0.0.1:1"), sa("[2001:db8::2]:2"));
    for buf in [encode_v1(Some((s, d))), encode_v2(Some((s, d)))] {
        let p = complete(&buf);
        assert_eq!(p.source, Some(sa("[::ffff:10.0.0.1]:1")));
        assert_eq!(p.destination, Some(d));
    }
}

// Tests for Trusted

#[test]
fn trusted_matches_networks_and_hosts() {
    let t = Trusted::parse(&["10.1.0.0/16", "2001:db8::/32", "192.0.2.7"]).unwrap();
    assert!(t.contains("10.1.255.3".parse().unwrap()));
    assert!(!t.contains("10.2.0.1".parse().unwrap()));
    assert!(t.contains("2001:db8::9".parse().unwrap()));
    assert!(t.contains("192.0.2.7".parse().unwrap()));
    assert!(!t.contains("192.0.2.8".parse().unwrap()));
    assert!(
        t.contains("::ffff:10.1.0.1".parse().unwrap()),
        "dual-stack peer"
    );
    assert_eq!(t.networks().len(), 3);
}

#[test]
fn trusted_empty_trusts_no_one() {
    let t = Trusted::default();
    assert!(!t.contains(IpAddr::from([127, 0, 0, 1])));
}

#[test]
fn trusted_refuses_a_bad_entry_naming_the_setting() {
    let e = Trusted::parse(&["10.1.0.0/33"]).unwrap_err().to_string();
    assert!(
        e.starts_with("accept-proxy.trusted: \"10.1.0.0/33\""),
        "{e}"
    );
}

// Properties

fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(s, d, sp, dp)| (
                SocketAddr::new(s.into(), sp),
                SocketAddr::new(d.into(), dp)
            )),
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(s, d, sp, dp)| (
                SocketAddr::new(s.into(), sp),
                SocketAddr::new(d.into(), dp)
            )),
    ]
}

proptest! {
    #[test]
    fn round_trip(pair in addr_pair(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        for (version, mut buf) in [(1, encode_v1(Some(pair))), (2, encode_v2(Some(pair)))] {
            let len = buf.len();
            if version == 1 {
                prop_assert!(len <= V1_MAX);
            }
            buf.extend_from_slice(&tail);
            let p = complete(&buf);
            prop_assert_eq!(p.header_len, len);
            prop_assert_eq!(p.version, version);
            prop_assert_eq!(p.source, Some(pair.0));
            prop_assert_eq!(p.destination, Some(pair.1));
        }
    }

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..800)) {
        crate::fuzzing::proxy_header(&data);
    }

    #[test]
    fn arbitrary_bytes_after_a_signature(
        v2_head in any::<bool>(),
        data in proptest::collection::vec(any::<u8>(), 0..800),
    ) {
        let mut buf = if v2_head { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
        buf.extend_from_slice(&data);
        crate::fuzzing::proxy_header(&buf);
    }
}

#[test]
fn errors_name_the_side_on_one_line() {
    assert_eq!(
        error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n").to_string(),
        "client PROXY header: v1 line has a bad destination port"
    );
}
