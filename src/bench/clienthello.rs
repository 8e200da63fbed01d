//! The TLS ClientHello the routed connect workload opens each connection
//! with, and the one the loopback routing tests send: one handshake record
//! with a server name, ALPN, supported versions and an x25519 key share,
//! padded (RFC 7685) to a size asked for (the bench asks for openssl's,
//! 517 bytes), so a router reads what it would read from a real client.
//! Nothing in it is ever decrypted; its random and key are arbitrary.

/// The record type of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// openssl s_client's ClientHello, record header included.
pub const OPENSSL_HELLO_LEN: usize = 517;

/// The protocols the bench's hello offers: PostgreSQL's ALPN name, then
/// HTTP/1.1.
pub const BENCH_ALPN: [&str; 2] = ["postgresql", "http/1.1"];

/// A ClientHello asking for `server_name` (no server name extension when
/// `None`) and offering `alpn` (no ALPN extension when empty), padded to at
/// least `min_len` bytes in all.
pub fn client_hello(server_name: Option<&str>, alpn: &[&str], min_len: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = server_name {
        let mut names = vec![0u8];
        names.extend_from_slice(&len16(name.len()));
        names.extend_from_slice(name.as_bytes());
        push_ext(&mut exts, 0, &with_len16(&names));
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(u8::try_from(p.len()).unwrap_or(u8::MAX));
            list.extend_from_slice(p.as_bytes());
        }
        push_ext(&mut exts, 16, &with_len16(&list));
    }
    // supported_groups: x25519, secp256r1.
    push_ext(&mut exts, 10, &with_len16(&[0, 0x1d, 0, 0x17]));
    // key_share: one x25519 share.
    let mut share = vec![0, 0x1d, 0, 32];
    share.extend((0..32u8).map(|i| i.wrapping_mul(13)));
    push_ext(&mut exts, 51, &with_len16(&share));
    // supported_versions: TLS 1.3 and 1.2.
    push_ext(&mut exts, 43, &[4, 3, 4, 3, 3]);
    let mut body = vec![3, 3];
    body.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    body.push(32); // a session id, as TLS 1.3 middlebox compatibility sends
    body.extend((0..32u8).map(|i| i.wrapping_mul(11)));
    let suites: [u16; 5] = [0x1302, 0x1303, 0x1301, 0xc02c, 0xc030];
    body.extend_from_slice(&len16(2 * suites.len()));
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // null compression
                                     // Record (5) + handshake header (4) + body + extensions length (2).
    let so_far = 5 + 4 + body.len() + 2 + exts.len();
    if so_far + 4 < min_len {
        push_ext(&mut exts, 21, &vec![0u8; min_len - so_far - 4]);
    }
    body.extend_from_slice(&with_len16(&exts));
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![TLS_HANDSHAKE, 3, 1];
    record.extend_from_slice(&len16(handshake.len()));
    record.extend(handshake);
    record
}

fn len16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

fn with_len16(bytes: &[u8]) -> Vec<u8> {
    let mut out = len16(bytes.len()).to_vec();
    out.extend_from_slice(bytes);
    out
}

fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&with_len16(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::hello::HelloParse;

    #[test]
    fn the_hello_is_one_record_of_openssls_size_that_spliced_reads() {
        let hello = client_hello(Some("b.db.example"), &BENCH_ALPN, OPENSSL_HELLO_LEN);
        assert_eq!(hello.len(), OPENSSL_HELLO_LEN);
        assert_eq!(
            usize::from(u16::from_be_bytes([hello[3], hello[4]])),
            hello.len() - 5
        );
        match crate::route::hello::parse(&hello) {
            HelloParse::Done(h) => {
                assert_eq!(h.server_name.as_deref(), Some("b.db.example"));
                assert_eq!(h.alpn, [&b"postgresql"[..], b"http/1.1"]);
            }
            other => panic!("spliced does not read the hello: {other:?}"),
        }
    }
}
