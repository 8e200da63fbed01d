//! Client openings for routing tests: a synthetic TLS ClientHello (the
//! bench's: one handshake record, with the server name, ALPN and padding
//! extensions as asked), and the PostgreSQL packets that come before or
//! instead of it.

#[allow(unused_imports)]
pub use spliced::bench::clienthello::client_hello;

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
