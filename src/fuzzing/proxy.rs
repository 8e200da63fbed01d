//! The PROXY header parser's invariants, for the `proxy_header` target and
//! the proptest properties in `proxy_protocol::tests`.

use crate::proxy_protocol::{encode_v1, encode_v2, parse, Parse, V1_MAX, V2_MAX_EXTRA};

/// The most bytes any header may take: v2 with UNIX addresses and full TLVs.
const MAX_HEADER: usize = 16 + 216 + V2_MAX_EXTRA;

/// Panics when an invariant breaks:
/// - a complete header fits the buffer and the caps, and parsing just its
///   bytes gives the same answer (nothing past `header_len` was read);
/// - every shorter prefix of it is Incomplete (incremental parsing agrees);
/// - Incomplete is only said below the caps, and an error stays an error
///   when more bytes arrive;
/// - addresses come in pairs and survive re-encoding.
pub fn proxy_header(data: &[u8]) {
    match parse(data) {
        Ok(Parse::Complete(p)) => {
            assert!(p.header_len <= data.len(), "header past the buffer");
            let cap = if p.version == 1 { V1_MAX } else { MAX_HEADER };
            assert!(p.header_len <= cap, "header of {} over {cap}", p.header_len);
            let exact = parse(&data[..p.header_len]);
            assert_eq!(
                exact,
                Ok(Parse::Complete(p.clone())),
                "read past header_len"
            );
            for n in 0..p.header_len {
                assert_eq!(parse(&data[..n]), Ok(Parse::Incomplete), "prefix {n}");
            }
            assert_eq!(p.source.is_some(), p.destination.is_some());
            if let (Some(s), Some(d)) = (p.source, p.destination) {
                assert_eq!(s.is_ipv4(), d.is_ipv4(), "one family per header");
                for again in [encode_v1(Some((s, d))), encode_v2(Some((s, d)))] {
                    match parse(&again) {
                        Ok(Parse::Complete(q)) => {
                            assert_eq!((q.source, q.destination), (p.source, p.destination))
                        }
                        other => panic!("re-encoded header: {other:?}"),
                    }
                }
            }
        }
        Ok(Parse::Incomplete) => {
            assert!(
                data.len() < MAX_HEADER,
                "Incomplete after {} bytes",
                data.len()
            );
            if data.first() == Some(&b'P') {
                assert!(
                    data.len() < V1_MAX,
                    "v1 Incomplete after {} bytes",
                    data.len()
                );
            }
        }
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "one-line error");
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n");
            assert!(parse(&more).is_err(), "error {e} went away with more bytes");
        }
    }
}
