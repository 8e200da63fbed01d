//! Client openings for routing tests: a synthetic TLS ClientHello (one
//! handshake record, with the server name, ALPN and padding extensions),
//! and the PostgreSQL packets that come before or instead of it.

/// A ClientHello in one TLS record: `server_name` (SNI) and `alpn` as
/// given, padded (RFC 7685 padding extension) to at least `min_len` bytes
/// in all. The cipher suites and random are arbitrary: nothing here is
/// ever decrypted.
pub fn client_hello(server_name: Option<&str>, alpn: &[&str], min_len: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = server_name {
        let mut list = vec![0u8];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name.as_bytes());
        push_ext(&mut exts, 0, &with_len16(&list));
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        push_ext(&mut exts, 16, &with_len16(&list));
    }
    // supported_versions: TLS 1.3, as a modern client offers.
    push_ext(&mut exts, 43, &[2, 3, 4]);
    let mut body = vec![3, 3];
    body.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
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
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

fn with_len16(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&with_len16(data));
}

/// PostgreSQL's SSLRequest.
pub fn ssl_request() -> Vec<u8> {
    [8u32.to_be_bytes(), 80_877_103u32.to_be_bytes()].concat()
}

/// PostgreSQL's GSSENCRequest.
pub fn gssenc_request() -> Vec<u8> {
    [8u32.to_be_bytes(), 80_877_104u32.to_be_bytes()].concat()
}

/// A protocol 3.0 StartupMessage with these parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A CancelRequest for backend `pid` with `key`.
pub fn cancel_request(pid: u32, key: u32) -> Vec<u8> {
    [
        16u32.to_be_bytes(),
        80_877_102u32.to_be_bytes(),
        pid.to_be_bytes(),
        key.to_be_bytes(),
    ]
    .concat()
}
