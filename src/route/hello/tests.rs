use proptest::prelude::*;

use super::*;

/// A ClientHello body with the given extensions (type, data), in order.
fn body_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut b = vec![3, 3];
    b.extend_from_slice(&[0xab; 32]); // random
    b.push(32);
    b.extend_from_slice(&[0x5e; 32]); // legacy session id
    b.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    b.extend_from_slice(&[1, 0]); // null compression
    let mut ext = Vec::new();
    for (kind, data) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    }
    b.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    b.extend_from_slice(&ext);
    b
}

fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
    let mut entry = vec![NAME_TYPE_HOST];
    entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
    entry.extend_from_slice(name);
    let mut d = (entry.len() as u16).to_be_bytes().to_vec();
    d.extend_from_slice(&entry);
    (EXT_SERVER_NAME, d)
}

fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for n in names {
        list.push(n.len() as u8);
        list.extend_from_slice(n);
    }
    let mut d = (list.len() as u16).to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    (EXT_ALPN, d)
}

/// key_share (51) with an X25519MLKEM768 share (1216 bytes) and an X25519
/// one, as OpenSSL 3.5 sends: the hello grows past one TCP segment.
fn key_share_ext() -> (u16, Vec<u8>) {
    let mut shares = Vec::new();
    for (group, len) in [(0x11ecu16, 1216usize), (0x001d, 32)] {
        shares.extend_from_slice(&group.to_be_bytes());
        shares.extend_from_slice(&(len as u16).to_be_bytes());
        shares.extend(std::iter::repeat_n(0x42, len));
    }
    let mut d = (shares.len() as u16).to_be_bytes().to_vec();
    d.extend_from_slice(&shares);
    (51, d)
}

/// The `padding` extension (21) of `n` zero bytes.
fn padding(n: usize) -> (u16, Vec<u8>) {
    (21, vec![0; n])
}

/// The handshake message: type, 3-byte length, body.
fn message(body: &[u8]) -> Vec<u8> {
    let mut m = vec![CLIENT_HELLO];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend_from_slice(body);
    m
}

/// `msg` in handshake records of `size` payload bytes each (the last one
/// shorter).
fn records(msg: &[u8], size: usize) -> Vec<u8> {
    crate::fuzzing::tls_records(msg, size)
}

fn one_record(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    records(&message(&body_with(extensions)), MAX_RECORD)
}

fn done(buf: &[u8]) -> ClientHello {
    match parse(buf) {
        HelloParse::Done(h) => h,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn invalid(buf: &[u8]) -> HelloError {
    match parse(buf) {
        HelloParse::Invalid(e) => e,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn malformed(extensions: &[(u16, Vec<u8>)], why: &str) {
    let e = invalid(&one_record(extensions));
    assert!(
        matches!(e, Malformed(w) if w.contains(why)),
        "{e} does not say {why:?}"
    );
}

const OPENSSL_S_CLIENT: &[u8] = include_bytes!("testdata/openssl-s_client.bin");
const LIBPQ18_DIRECT: &[u8] = include_bytes!("testdata/libpq18-direct.bin");
const LIBPQ18_AFTER_SSLREQUEST: &[u8] = include_bytes!("testdata/libpq18-after-sslrequest.bin");

#[test]
fn a_hello_gives_its_name_lower_cased_and_its_protocols_in_order() {
    let buf = one_record(&[
        sni_ext(b"A.DB.Example"),
        (10, vec![0, 2, 0, 0x1d]),
        alpn_ext(&[b"postgresql", b"h2"]),
    ]);
    let h = done(&buf);
    assert_eq!(h.server_name.as_deref(), Some("a.db.example"));
    assert_eq!(h.alpn, vec![b"postgresql".to_vec(), b"h2".to_vec()]);
    crate::fuzzing::client_hello(&buf);
}

#[test]
fn real_hellos_of_openssl_and_libpq() {
    // `openssl s_client -servername a.db.example -alpn postgresql`
    // (OpenSSL 3.0): one record.
    let h = done(OPENSSL_S_CLIENT);
    assert_eq!(h.server_name.as_deref(), Some("a.db.example"));
    assert_eq!(h.alpn, vec![b"postgresql".to_vec()]);
    // libpq 18 (psycopg's wheel): `host=a.db.example hostaddr=127.0.0.1
    // sslnegotiation=direct`; its X25519MLKEM768 share makes it 1569 bytes.
    assert_eq!(LIBPQ18_DIRECT.len(), 1569);
    let h = done(LIBPQ18_DIRECT);
    assert_eq!(h.server_name.as_deref(), Some("a.db.example"));
    assert_eq!(h.alpn, vec![b"postgresql".to_vec()]);
    // The same client after an SSLRequest (`sslnegotiation=postgres`, to
    // host=b.db.example): libpq 18 offers ALPN there too.
    let h = done(LIBPQ18_AFTER_SSLREQUEST);
    assert_eq!(h.server_name.as_deref(), Some("b.db.example"));
    assert_eq!(h.alpn, vec![b"postgresql".to_vec()]);
    for real in [OPENSSL_S_CLIENT, LIBPQ18_DIRECT, LIBPQ18_AFTER_SSLREQUEST] {
        crate::fuzzing::client_hello(real);
    }
}

#[test]
fn a_large_hello_over_three_records_fed_a_byte_at_a_time() {
    let msg = message(&body_with(&[
        sni_ext(b"b.db.example"),
        key_share_ext(),
        alpn_ext(&[b"postgresql"]),
        padding(200),
    ]));
    assert!(msg.len() > 1500, "{} bytes", msg.len());
    let buf = records(&msg, msg.len() / 3 + 1);
    assert_eq!(buf.len(), msg.len() + 3 * RECORD_HEADER);
    for n in 0..buf.len() {
        assert_eq!(parse(&buf[..n]), HelloParse::Incomplete, "prefix {n}");
    }
    let h = done(&buf);
    assert_eq!(h.server_name.as_deref(), Some("b.db.example"));
    assert_eq!(h.alpn, vec![b"postgresql".to_vec()]);
    // One byte per record, even in the handshake header.
    let small = message(&body_with(&[sni_ext(b"b.db.example")]));
    assert_eq!(done(&records(&small, 1)).server_name, h.server_name);
    crate::fuzzing::client_hello(&buf);
}

#[test]
fn bytes_after_the_hello_are_not_read() {
    let mut buf = one_record(&[sni_ext(b"a.db.example")]);
    let want = done(&buf);
    // A ChangeCipherSpec record and early data, or anything at all.
    buf.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 0]);
    assert_eq!(done(&buf), want);
    buf.extend_from_slice(&[0xff; HELLO_MAX]);
    assert_eq!(done(&buf), want);
}

#[test]
fn a_hello_without_extensions_or_names_is_done_with_nothing() {
    let mut body = body_with(&[]);
    body.truncate(body.len() - 2); // no extensions vector at all (TLS 1.2)
    assert_eq!(done(&records(&message(&body), 100)), ClientHello::default());
    assert_eq!(
        done(&one_record(&[(10, vec![0, 2, 0, 0x1d])])),
        ClientHello::default()
    );
}

#[test]
fn what_is_not_tls_is_refused_at_its_first_byte() {
    for first in [
        &b"GET / HTTP/1.1\r\n"[..],
        &[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f], // PostgreSQL SSLRequest
        &[0, 0, 0, 0x54, 0, 3, 0, 0],       // a PostgreSQL startup packet
        &[0x80, 0x2e, 0x01, 0x03, 0x01],    // an SSLv2-framed hello
        &[21, 3, 3, 0, 2, 2, 40],           // an alert record
    ] {
        assert_eq!(invalid(first), NotHandshake, "{first:?}");
        assert_eq!(invalid(&first[..1]), NotHandshake, "{first:?}");
    }
    assert_eq!(invalid(&[22, 2]), NotHandshake, "record version 2.x");
    assert_eq!(parse(&[]), HelloParse::Incomplete);
    assert_eq!(parse(&[22, 3]), HelloParse::Incomplete);
}

#[test]
fn bad_records_are_refused() {
    let msg = message(&body_with(&[sni_ext(b"a")]));
    let mut buf = records(&msg, 20);
    assert_eq!(
        invalid(&[22, 3, 1, 0, 0]),
        Malformed("an empty handshake record")
    );
    assert!(matches!(invalid(&[22, 3, 1, 0x40, 1]), Malformed(w) if w.contains("2^14")));
    assert!(matches!(invalid(&[22, 3, 1, 0x41]), Malformed(w) if w.contains("2^14")));
    // A record of exactly 2^14 bytes is allowed.
    let base = message(&body_with(&[padding(0)])).len();
    let full = records(
        &message(&body_with(&[padding(MAX_RECORD - base)])),
        MAX_RECORD,
    );
    assert_eq!(&full[3..5], &[0x40, 0]);
    assert_eq!(full.len(), RECORD_HEADER + MAX_RECORD);
    assert_eq!(done(&full), ClientHello::default());
    // The second record an alert, then a bad version.
    buf[25] = 21;
    assert!(matches!(invalid(&buf), Malformed(w) if w.contains("other than handshake")));
    buf[25] = 22;
    buf[26] = 4;
    assert!(matches!(invalid(&buf), Malformed(w) if w.contains("version")));
    // A ServerHello where the ClientHello belongs.
    assert_eq!(
        invalid(&[22, 3, 1, 0, 1, 2]),
        Malformed("the first handshake message is not a ClientHello")
    );
}

#[test]
fn truncations_are_incomplete_and_mutations_keep_the_invariants() {
    let buf = records(
        &message(&body_with(&[
            sni_ext(b"a.db.example"),
            alpn_ext(&[b"postgresql"]),
        ])),
        40,
    );
    let want = done(&buf);
    for n in 0..buf.len() {
        assert_eq!(parse(&buf[..n]), HelloParse::Incomplete, "prefix {n}");
    }
    for at in 0..buf.len() {
        for flip in [0x01, 0x20, 0x80, 0xff] {
            let mut bad = buf.clone();
            bad[at] ^= flip;
            crate::fuzzing::client_hello(&bad);
        }
    }
    assert_eq!(want.server_name.as_deref(), Some("a.db.example"));
}

#[test]
fn too_large_is_said_as_early_as_the_lengths_tell() {
    // The header says 20 000 bytes: refused at the header's fourth byte.
    let huge = message(&body_with(&[padding(20_000)]));
    let buf = records(&huge, MAX_RECORD);
    assert_eq!(parse(&buf[..8]), HelloParse::Incomplete);
    assert_eq!(invalid(&buf[..9]), TooLarge);
    // The largest hello that fits: two records ending at HELLO_MAX exactly.
    let fits = |extra: usize| {
        let base = message(&body_with(&[padding(0)])).len();
        let msg = message(&body_with(&[padding(
            HELLO_MAX - 2 * RECORD_HEADER - base + extra,
        )]));
        records(&msg, MAX_RECORD)
    };
    let edge = fits(0);
    assert_eq!(edge.len(), HELLO_MAX);
    assert_eq!(done(&edge), ClientHello::default());
    assert_eq!(parse(&edge[..HELLO_MAX - 1]), HelloParse::Incomplete);
    let over = fits(1);
    assert_eq!(invalid(&over[..HELLO_MAX - 1]), TooLarge);
    // A 3 000-byte hello in 1-byte records needs 18 000 bytes: refused when
    // the offsets show it cannot end in time, before HELLO_MAX arrive.
    let msg = message(&body_with(&[padding(3000 - 100)]));
    let tiny = records(&msg, 1);
    let at = (0..tiny.len())
        .find(|&n| parse(&tiny[..n]) != HelloParse::Incomplete)
        .unwrap();
    assert!(at < HELLO_MAX, "refused only at {at}");
    assert_eq!(invalid(&tiny[..at]), TooLarge);
    // Incomplete is never said at HELLO_MAX bytes: here the lengths so far
    // let the hello end by HELLO_MAX - 1, but it needs a third record whose
    // header is not whole at HELLO_MAX.
    let base = message(&body_with(&[padding(0)])).len();
    let msg = message(&body_with(&[padding(16_393 - base)]));
    let mut cut = records(&msg[..16_392], MAX_RECORD);
    cut.extend_from_slice(&[CONTENT_HANDSHAKE, 3]);
    assert_eq!(cut.len(), HELLO_MAX);
    assert_eq!(parse(&cut[..HELLO_MAX - 1]), HelloParse::Incomplete);
    assert_eq!(invalid(&cut), TooLarge);
    // The same hello in two records ends at HELLO_MAX - 1.
    let two = records(&msg, MAX_RECORD);
    assert_eq!(two.len(), HELLO_MAX - 1);
    assert_eq!(done(&two), ClientHello::default());
}

#[test]
fn server_names_are_checked() {
    assert_eq!(
        done(&one_record(&[sni_ext(&[b'x'; MAX_HOST_NAME])]))
            .server_name
            .map(|n| n.len()),
        Some(MAX_HOST_NAME)
    );
    malformed(&[sni_ext(&[b'x'; MAX_HOST_NAME + 1])], "longer than 255");
    malformed(&[sni_ext(b"")], "empty host name");
    malformed(&[sni_ext(b"a.db\0.example")], "printable ASCII");
    malformed(&[sni_ext(b"a.db.example\0")], "printable ASCII");
    malformed(&[sni_ext(b"caf\xc3\xa9.example")], "printable ASCII");
    malformed(&[sni_ext(b"a b")], "printable ASCII");
    malformed(&[sni_ext(b"a"), sni_ext(b"b")], "two server_name");
    malformed(&[(EXT_SERVER_NAME, vec![])], "server name list runs past");
    malformed(&[(EXT_SERVER_NAME, vec![0, 0])], "empty server name list");
    // Two names in one list; a name type other than host_name.
    let (_, one) = sni_ext(b"a");
    let mut two = vec![0, 8];
    two.extend_from_slice(&one[2..]);
    two.extend_from_slice(&one[2..]);
    malformed(&[(EXT_SERVER_NAME, two)], "more than one server name");
    let mut other = one.clone();
    other[2] = 1;
    malformed(&[(EXT_SERVER_NAME, other)], "not a host_name");
    let mut long = one.clone();
    long[4] = 9;
    malformed(&[(EXT_SERVER_NAME, long)], "host name runs past");
    let mut trailing = one;
    trailing.push(0);
    malformed(&[(EXT_SERVER_NAME, trailing)], "after the server name list");
}

#[test]
fn alpn_lists_are_checked() {
    malformed(&[alpn_ext(&[])], "empty ALPN list");
    malformed(&[alpn_ext(&[b""])], "empty ALPN protocol");
    malformed(
        &[alpn_ext(&[b"postgresql"]), alpn_ext(&[b"h2"])],
        "two ALPN",
    );
    let (_, mut d) = alpn_ext(&[b"postgresql"]);
    d[2] = 11;
    malformed(&[(EXT_ALPN, d)], "ALPN protocol runs past");
    let (_, mut d) = alpn_ext(&[b"h2"]);
    d[1] = 9;
    malformed(&[(EXT_ALPN, d)], "ALPN list runs past");
}

#[test]
fn every_vector_of_the_hello_is_checked() {
    let good = body_with(&[sni_ext(b"a.db.example")]);
    let bad = |edit: &dyn Fn(&mut Vec<u8>), why: &str| {
        let mut b = good.clone();
        edit(&mut b);
        let e = invalid(&records(&message(&b), 50));
        assert!(
            matches!(e, Malformed(w) if w.contains(why)),
            "{e}: want {why:?}"
        );
    };
    bad(&|b| b[0] = 2, "version");
    bad(&|b| b.truncate(20), "random");
    bad(&|b| b[34] = 33, "session id");
    bad(&|b| b[34] = 0xff, "session id runs past");
    bad(&|b| b[68] = 5, "odd length");
    bad(&|b| b[68] = 0, "empty or of odd length");
    bad(&|b| b[75] = 0, "no compression method");
    bad(&|b| b.push(0), "after the extensions");
    bad(&|b| b[78] += 1, "extensions run past");
    bad(&|b| b[82] = 0xf0, "an extension runs past");
    bad(
        &|b| {
            b[78] += 1;
            b.push(0)
        },
        "extension type runs past",
    );
    bad(&|b| b.truncate(1), "version");
}

#[test]
fn errors_read_as_one_line_naming_the_client() {
    for e in [
        NotHandshake,
        TooLarge,
        Malformed("a record longer than 2^14 bytes"),
    ] {
        let text = e.to_string();
        assert!(text.starts_with("client TLS hello: "), "{text}");
        assert!(!text.contains('\n'));
    }
    assert_eq!(
        TooLarge.to_string(),
        format!("client TLS hello: not complete within {HELLO_MAX} bytes")
    );
}

fn host_name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(b"abcXYZ019.-_*".to_vec()), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// However the hello is cut into records and however the bytes arrive,
    /// the answer is Incomplete until the last byte, then the same hello.
    #[test]
    fn any_split_and_any_arrival_give_the_same_hello(
        name in host_name(),
        protocols in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..12), 0..4),
        pad in 0usize..3000,
        size in 1usize..2000,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut ext = vec![padding(pad), sni_ext(&name)];
        if !protocols.is_empty() {
            let refs: Vec<&[u8]> = protocols.iter().map(Vec::as_slice).collect();
            ext.push(alpn_ext(&refs));
        }
        let msg = message(&body_with(&ext));
        let buf = records(&msg, size);
        let want = ClientHello {
            server_name: Some(String::from_utf8(name.to_ascii_lowercase()).unwrap()),
            alpn: protocols,
        };
        prop_assume!(buf.len() <= HELLO_MAX);
        prop_assert_eq!(parse(&buf), HelloParse::Done(want.clone()));
        prop_assert_eq!(parse(&records(&msg, MAX_RECORD)), HelloParse::Done(want));
        for cut in cuts {
            let n = cut.index(buf.len());
            prop_assert_eq!(parse(&buf[..n]), HelloParse::Incomplete);
        }
        crate::fuzzing::client_hello(&buf);
    }

    /// Arbitrary bytes after a valid record header: no panic, and the
    /// fuzz target's invariants hold.
    #[test]
    fn arbitrary_bytes_keep_the_invariants(
        tail in prop::collection::vec(any::<u8>(), 0..600),
        len in 0u16..0x4100,
    ) {
        let mut buf = vec![22, 3, 1];
        buf.extend_from_slice(&len.to_be_bytes());
        buf.push(CLIENT_HELLO);
        buf.extend_from_slice(&tail);
        crate::fuzzing::client_hello(&buf);
        crate::fuzzing::client_hello(&tail);
    }
}
