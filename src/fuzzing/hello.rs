//! The ClientHello parser's invariants, for the `client_hello` target and
//! the properties in `route::hello::tests`.

use crate::route::hello::{parse, ClientHello, HelloParse, HELLO_MAX};

/// Prefixes checked besides the ones next to where the answer is settled.
const SAMPLES: usize = 64;

/// Panics when an invariant breaks:
/// - the answers to the prefixes of `data` are Incomplete up to some
///   length, then one answer for good (the whole buffer's): a client that
///   sends its bytes in any pieces gets the same verdict, and nothing past
///   that point is read (bytes appended change nothing);
/// - Incomplete is said only below [`HELLO_MAX`] bytes, and a hello is
///   Done within them;
/// - a Done hello's handshake message, reassembled by a plain second
///   reading of the records, gives the same hello in records of any size;
/// - a server name is 1 to 255 bytes of printable lower-case ASCII; no
///   ALPN protocol name is empty;
/// - an error displays as one line.
pub fn client_hello(data: &[u8]) {
    let answer = parse(data);
    if answer == HelloParse::Incomplete {
        assert!(data.len() < HELLO_MAX, "Incomplete at {} bytes", data.len());
    }
    let settled = settled_at(data);
    for n in samples(settled) {
        assert_eq!(parse(&data[..n]), HelloParse::Incomplete, "prefix {n}");
    }
    for n in samples(data.len() - settled).map(|n| settled + n) {
        assert_eq!(
            parse(&data[..n]),
            answer,
            "prefix {n}, settled at {settled}"
        );
    }
    let mut more = data.to_vec();
    // A record header, then bytes a hello could hold.
    more.extend_from_slice(&[22, 3, 3, 0, 8, 1, 0, 0, 4, 3, 3, 0x2e, 0]);
    match answer {
        HelloParse::Incomplete => {}
        HelloParse::Done(hello) => {
            assert_eq!(parse(&more), HelloParse::Done(hello.clone()), "grew");
            check_done(&data[..settled], &hello);
        }
        HelloParse::Invalid(e) => {
            assert!(!e.to_string().contains('\n'), "two lines: {e}");
            assert_eq!(parse(&more), HelloParse::Invalid(e), "grew");
        }
    }
}

/// The shortest prefix of `data` whose answer is not Incomplete (the
/// length of `data` if there is none), by bisection: the answers of
/// shorter prefixes are Incomplete, which [`client_hello`] checks.
fn settled_at(data: &[u8]) -> usize {
    if parse(data) == HelloParse::Incomplete {
        return data.len();
    }
    // parse(data[..lo]) is Incomplete, parse(data[..hi]) is not.
    let (mut lo, mut hi) = (0, data.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if parse(&data[..mid]) == HelloParse::Incomplete {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// Up to [`SAMPLES`] + 2 lengths below `n`: the first, the last and some
/// evenly spread between.
fn samples(n: usize) -> impl Iterator<Item = usize> {
    let step = (n / SAMPLES).max(1);
    (0..n).step_by(step).chain(n.checked_sub(1))
}

/// `hello` came from `data`, which ends where the hello does.
fn check_done(data: &[u8], hello: &ClientHello) {
    assert!(data.len() <= HELLO_MAX, "Done at {} bytes", data.len());
    if let Some(name) = &hello.server_name {
        assert!((1..=255).contains(&name.len()), "server name {name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
            "server name {name:?}"
        );
    }
    assert!(hello.alpn.iter().all(|p| !p.is_empty()), "{hello:?}");
    let message = reference_message(data);
    for size in [1, 7, 256, 1 << 14] {
        let again = tls_records(&message, size);
        if again.len() <= HELLO_MAX {
            assert_eq!(
                parse(&again),
                HelloParse::Done(hello.clone()),
                "in records of {size}"
            );
        }
    }
}

/// The first handshake message in the records of `data`, read plainly:
/// every record's payload (the last may be cut short) concatenated.
fn reference_message(data: &[u8]) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut rest = data;
    while let [_, _, _, hi, lo, payload @ ..] = rest {
        let take = usize::from(u16::from_be_bytes([*hi, *lo])).min(payload.len());
        handshake.extend_from_slice(&payload[..take]);
        rest = &payload[take..];
    }
    let [1, a, b, c, ..] = handshake[..] else {
        panic!("Done, yet the records hold no ClientHello header: {handshake:?}");
    };
    let len = 4 + u32::from_be_bytes([0, a, b, c]) as usize;
    assert_eq!(
        handshake.len(),
        len,
        "Done where the records hold {} handshake bytes, the message {len}",
        handshake.len()
    );
    handshake
}

/// `message` in handshake records (TLS 1.0 record version, as clients
/// send a first flight) of `size` payload bytes each, the last shorter.
pub(crate) fn tls_records(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len().div_ceil(size) * 5);
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}
