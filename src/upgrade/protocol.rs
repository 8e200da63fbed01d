//! The handover's messages: one text line each (`SOCK_SEQPACKET`, so one
//! message per send), the listening sockets riding on `sockets` messages.
//!
//! ```text
//! old → new  spliced-upgrade FORMAT from=PID sockets=N
//! old → new  sockets ADDR ADDR …          (≤ 253 descriptors each)
//! new → old  ack K                         (K sockets received so far)
//! new → old  ready | refuse REASON
//! old → new  commit | abort
//! new → old  started PID | failed REASON
//! ```

use std::fmt;
use std::net::SocketAddr;

/// The snapshot format this build speaks. A build that reads another
/// refuses the handover, and the old process carries on.
pub const FORMAT: u32 = 1;

const MAGIC: &str = "spliced-upgrade";

/// One message of the handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Header {
        format: u32,
        from: u32,
        sockets: usize,
    },
    Sockets(Vec<SocketAddr>),
    Ack(usize),
    Ready,
    Refuse(String),
    Commit,
    Abort,
    Started(u32),
    Failed(String),
}

/// A message that is not one of the handover's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage(pub String);

impl fmt::Display for BadMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected handover message {:?}", self.0)
    }
}

impl std::error::Error for BadMessage {}

impl Message {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let text = match self {
            Message::Header {
                format,
                from,
                sockets,
            } => format!("{MAGIC} {format} from={from} sockets={sockets}"),
            Message::Sockets(addrs) => {
                let mut line = String::from("sockets");
                for a in addrs {
                    line.push(' ');
                    line.push_str(&a.to_string());
                }
                line
            }
            Message::Ack(n) => format!("ack {n}"),
            Message::Ready => "ready".into(),
            Message::Refuse(why) => format!("refuse {}", one_line(why)),
            Message::Commit => "commit".into(),
            Message::Abort => "abort".into(),
            Message::Started(pid) => format!("started {pid}"),
            Message::Failed(why) => format!("failed {}", one_line(why)),
        };
        text.into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Message, BadMessage> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| BadMessage(String::from_utf8_lossy(bytes).into()))?;
        let bad = || BadMessage(text.chars().take(200).collect());
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let number = |s: &str| s.parse::<u64>().map_err(|_| bad());
        Ok(match word {
            MAGIC => {
                let mut parts = rest.split(' ');
                let format = number(parts.next().unwrap_or(""))? as u32;
                let mut from = None;
                let mut sockets = None;
                for part in parts {
                    match part.split_once('=') {
                        Some(("from", v)) => from = Some(number(v)? as u32),
                        Some(("sockets", v)) => sockets = Some(number(v)? as usize),
                        // A later format may say more; its number tells.
                        _ => {}
                    }
                }
                Message::Header {
                    format,
                    from: from.unwrap_or(0),
                    sockets: sockets.unwrap_or(0),
                }
            }
            "sockets" => Message::Sockets(
                rest.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?,
            ),
            "ack" => Message::Ack(number(rest)? as usize),
            "ready" => Message::Ready,
            "refuse" => Message::Refuse(rest.into()),
            "commit" => Message::Commit,
            "abort" => Message::Abort,
            "started" => Message::Started(number(rest)? as u32),
            "failed" => Message::Failed(rest.into()),
            _ => return Err(bad()),
        })
    }
}

fn one_line(text: &str) -> String {
    text.replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let messages = [
            Message::Header {
                format: FORMAT,
                from: 42,
                sockets: 3,
            },
            Message::Sockets(vec![
                "127.0.0.1:5432".parse().unwrap(),
                "[::1]:6432".parse().unwrap(),
            ]),
            Message::Sockets(vec![]),
            Message::Ack(7),
            Message::Ready,
            Message::Refuse("config: no such file".into()),
            Message::Commit,
            Message::Abort,
            Message::Started(99),
            Message::Failed("bind: in use".into()),
        ];
        for m in messages {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        assert!(Message::decode(b"hello").is_err());
        assert!(Message::decode(b"ack x").is_err());
    }

    #[test]
    fn a_header_of_another_format_still_reads_as_one() {
        let m = Message::decode(b"spliced-upgrade 2 from=5 sockets=1 relays=9").unwrap();
        assert!(matches!(
            m,
            Message::Header {
                format: 2,
                from: 5,
                sockets: 1
            }
        ));
    }
}
