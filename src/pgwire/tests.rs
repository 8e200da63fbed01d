use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use proptest::prelude::*;

use super::*;

// Tests for the ErrorResponse

/// The bytes PostgreSQL's protocol documentation gives for this message,
/// written out by hand: `E`, length 66, then S, V, C, M and the final NUL.
const RECORDED: &[u8] = b"E\x00\x00\x00\x42\
SFATAL\x00\
VFATAL\x00\
C57P03\x00\
Mspliced: no primary for listener pg-rw\x00\
\x00";

#[test]
fn the_error_response_matches_the_recorded_bytes() {
    let got = error_response(
        SqlState::CannotConnectNow,
        "spliced: no primary for listener pg-rw",
    );
    assert_eq!(got, RECORDED);
}

/// (type, value) of every field, read back with postgres-protocol's parser.
fn fields(bytes: &[u8]) -> Vec<(u8, String)> {
    let mut buf = BytesMut::from(bytes);
    let Some(Message::ErrorResponse(body)) = Message::parse(&mut buf).unwrap() else {
        panic!("not an ErrorResponse: {bytes:?}");
    };
    assert!(buf.is_empty(), "nothing after the message");
    body.fields()
        .map(|f| {
            Ok((
                f.type_(),
                String::from_utf8(f.value_bytes().to_vec()).unwrap(),
            ))
        })
        .collect()
        .unwrap()
}

#[test]
fn every_sqlstate_reads_back_with_the_crate_parser() {
    for state in [
        SqlState::CannotConnectNow,
        SqlState::TooManyConnections,
        SqlState::InsufficientResources,
        SqlState::InvalidAuthorization,
    ] {
        let got = fields(&error_response(state, "spliced: why"));
        assert_eq!(
            got,
            vec![
                (b'S', "FATAL".to_string()),
                (b'V', "FATAL".to_string()),
                (b'C', state.code().to_string()),
                (b'M', "spliced: why".to_string()),
            ]
        );
    }
}

#[test]
fn a_message_loses_its_nul_bytes_and_is_cut_at_a_character_boundary() {
    let got = fields(&error_response(SqlState::CannotConnectNow, "a\0b"));
    assert_eq!(got[3], (b'M', "ab".to_string()));
    // 'é' is two bytes: 511 of 'a' then 'é' straddles the limit.
    let long = format!("{}é and more", "a".repeat(MAX_MESSAGE_LEN - 1));
    let got = fields(&error_response(SqlState::CannotConnectNow, &long));
    assert_eq!(got[3].1, "a".repeat(MAX_MESSAGE_LEN - 1));
}

// Tests for the Greeting

fn ssl_request() -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::ssl_request(&mut b);
    b.to_vec()
}

fn gssenc_request() -> Vec<u8> {
    let mut b = 8u32.to_be_bytes().to_vec();
    b.extend_from_slice(&GSSENC_REQUEST_CODE.to_be_bytes());
    b
}

fn startup() -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::startup_message([("user", "app"), ("database", "app")], &mut b).unwrap();
    b.to_vec()
}

fn cancel() -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::cancel_request(42, 7, &mut b);
    b.to_vec()
}

/// Everything `feed` tells over `bytes` cut into pieces of `step` bytes
/// (the `More`s left out), and the bytes it took in all.
fn heard_in_steps(bytes: &[u8], step: usize) -> (Vec<(usize, Heard)>, usize) {
    let mut g = Greeting::default();
    let mut heard = Vec::new();
    let mut taken = 0;
    for piece in bytes.chunks(step.max(1)) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (used, h) = g.feed(rest);
            assert!(used <= rest.len());
            taken += used;
            rest = &rest[used..];
            if h != Heard::More {
                heard.push((taken, h));
            } else {
                assert!(rest.is_empty(), "More takes everything it was given");
            }
        }
    }
    (heard, taken)
}

#[test]
fn a_startup_message_is_heard_once_whole() {
    let s = startup();
    for step in 1..=s.len() {
        let (heard, taken) = heard_in_steps(&s, step);
        assert_eq!(heard, vec![(s.len(), Heard::Startup)], "step {step}");
        assert_eq!(taken, s.len());
    }
}

#[test]
fn encryption_requests_are_heard_then_the_startup_message() {
    let mut bytes = gssenc_request();
    bytes.extend(ssl_request());
    bytes.extend(startup());
    let total = bytes.len();
    for step in 1..=bytes.len() {
        let (heard, _) = heard_in_steps(&bytes, step);
        assert_eq!(
            heard,
            vec![
                (8, Heard::EncryptionRequest),
                (16, Heard::EncryptionRequest),
                (total, Heard::Startup),
            ],
            "step {step}"
        );
    }
}

#[test]
fn a_second_request_for_the_same_encryption_is_answered_at_once() {
    let mut bytes = ssl_request();
    bytes.extend(ssl_request());
    let (heard, _) = heard_in_steps(&bytes, 64);
    assert_eq!(
        heard,
        vec![(8, Heard::EncryptionRequest), (16, Heard::Startup)]
    );
}

#[test]
fn a_cancel_request_is_heard_from_its_header() {
    let (heard, taken) = heard_in_steps(&cancel(), 64);
    assert_eq!(heard, vec![(8, Heard::Cancel)]);
    assert_eq!(taken, 16, "the rest is taken, and tells nothing");
}

#[test]
fn a_length_out_of_bounds_is_answered_without_waiting_for_its_body() {
    for len in [0u32, 4, 7, MAX_STARTUP_LEN + 1, u32::MAX] {
        let mut b = len.to_be_bytes().to_vec();
        b.extend_from_slice(&196_608u32.to_be_bytes());
        let (heard, _) = heard_in_steps(&b, 3);
        assert_eq!(heard, vec![(8, Heard::Startup)], "length {len}");
    }
    // The bound itself is a startup packet still.
    let mut b = MAX_STARTUP_LEN.to_be_bytes().to_vec();
    b.extend_from_slice(&196_608u32.to_be_bytes());
    let (heard, _) = heard_in_steps(&b, 3);
    assert_eq!(heard, vec![]);
}

proptest! {
    /// However a client's bytes arrive, the same things are heard at the
    /// same offsets, and at most three (two encryption requests, then a
    /// startup packet or a cancel), the last of them final.
    #[test]
    fn what_is_heard_does_not_depend_on_the_split(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        prefix in 0usize..4,
        step in 1usize..20,
    ) {
        let mut all = match prefix {
            0 => Vec::new(),
            1 => ssl_request(),
            2 => gssenc_request(),
            _ => [gssenc_request(), ssl_request()].concat(),
        };
        all.extend(bytes);
        let (whole, taken) = heard_in_steps(&all, all.len());
        let (split, _) = heard_in_steps(&all, step);
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(taken, all.len());
        prop_assert!(whole.len() <= 3);
        for (i, (_, h)) in whole.iter().enumerate() {
            let last = i + 1 == whole.len();
            prop_assert!(*h == Heard::EncryptionRequest || last, "{:?} then more", h);
        }
    }
}
