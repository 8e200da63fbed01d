//! MySQL / MariaDB: the server speaks first; its initial handshake packet
//! (protocol version 10) means up, an error packet (0xff) means down.

use super::{quote, Inbox, Step, Verdict};

/// A handshake is a few hundred bytes; a first packet claiming more than
/// this is not one.
const MAX_FIRST_PACKET: usize = 16 * 1024;

#[derive(Default)]
pub(super) struct Mysql {
    inbox: Inbox,
}

impl Mysql {
    pub(super) fn on_bytes(&mut self, data: &[u8]) -> Step {
        self.inbox.push(data);
        let buf = &self.inbox.buf;
        if buf.len() < 4 {
            return Step::NeedMore;
        }
        // 3-byte little-endian payload length, then the sequence number.
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], 0]) as usize;
        if len == 0 || len > MAX_FIRST_PACKET {
            return Step::Done(Verdict::down(format!(
                "mysql first packet claims {len} bytes; not a MySQL handshake"
            )));
        }
        if buf[3] != 0 {
            return Step::Done(Verdict::down(format!(
                "mysql first packet has sequence number {}, want 0",
                buf[3]
            )));
        }
        if buf.len() < 4 + len {
            return Step::NeedMore;
        }
        let payload = &buf[4..4 + len];
        Step::Done(match payload[0] {
            0x0a => Verdict::Up { role: None },
            0xff => error_verdict(payload),
            v => Verdict::down(format!("mysql handshake has protocol version {v}, want 10")),
        })
    }
}

/// 0xff, a 2-byte error code, then (before capabilities are agreed) the
/// message; newer servers may put `#` and a 5-byte SQLSTATE first.
fn error_verdict(payload: &[u8]) -> Verdict {
    if payload.len() < 3 {
        return Verdict::down("mysql sent a truncated error packet");
    }
    let code = u16::from_le_bytes([payload[1], payload[2]]);
    let mut msg = &payload[3..];
    if msg.first() == Some(&b'#') && msg.len() >= 6 {
        msg = &msg[6..];
    }
    let text = format!("mysql refused the connection: error {code}: {}", quote(msg));
    // 1045 access denied, 1130 host not allowed: the check's own setup.
    if matches!(code, 1045 | 1130) {
        Verdict::check_error(text)
    } else {
        Verdict::down(text)
    }
}
