//! The handover's messages: one text line each (`SOCK_SEQPACKET`, so one
//! message per send), the listening sockets riding on `sockets` messages.
//!
//! ```text
//! old → new  spliced-upgrade FORMAT from=PID sockets=N servers=M
//! old → new  sockets ADDR ADDR …          (≤ 253 descriptors each)
//! new → old  ack K                         (K sockets received so far)
//! old → new  server ADDR up=0|1 answered=0|1 probed=0|1 [check=KIND
//!            target=ADDR path=P [user=U] [database=D]] [role=ROLE|not-ROLE]
//!            [timeline=N] [error=E]        (M of them, one per server)
//! new → old  ready | refuse REASON
//! old → new  relays N                      (the relays it froze)
//! old → new  relay-batch\nLINE\nLINE …     (≤ 253 descriptors each; a
//!                                          line per relay, `wire`)
//! new → old  ack K                         (K relays received so far)
//! old → new  commit | abort
//! new → old  declined ID ID …              (relays it could not take)
//! new → old  started PID [relays=K p50=US p99=US max=US] | failed REASON
//! ```

use std::fmt;
use std::net::SocketAddr;

use crate::health::{Carried, Reported, Role};
use crate::relay::image::RelayImage;
use crate::upstream::fleet::{CheckKey, ServerHealth, ServerKey};

/// The snapshot format this build speaks. A build that reads another
/// refuses the handover, and the old process carries on. (2: the servers'
/// health follows the sockets; 3: so do the live relays.)
pub const FORMAT: u32 = 3;

const MAGIC: &str = "spliced-upgrade";

/// One message of the handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    Header {
        format: u32,
        from: u32,
        sockets: usize,
        servers: usize,
    },
    Sockets(Vec<SocketAddr>),
    Server(ServerHealth),
    Ack(usize),
    Ready,
    Refuse(String),
    /// How many relays follow, in batches.
    Relays(usize),
    RelayBatch(Vec<RelayImage>),
    Commit,
    Abort,
    /// Relays the new process did not take, by id.
    Declined(Vec<u64>),
    Started(u32, Option<Taken>),
    Failed(String),
}

/// What the new process took of the relays, and how long they paused
/// (from the freeze to the registration in the new process), in
/// microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub relays: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
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
                servers,
            } => format!("{MAGIC} {format} from={from} sockets={sockets} servers={servers}"),
            Message::Sockets(addrs) => {
                let mut line = String::from("sockets");
                for a in addrs {
                    line.push(' ');
                    line.push_str(&a.to_string());
                }
                line
            }
            Message::Server(server) => encode_server(server),
            Message::Ack(n) => format!("ack {n}"),
            Message::Ready => "ready".into(),
            Message::Refuse(why) => format!("refuse {}", one_line(why)),
            Message::Relays(n) => format!("relays {n}"),
            Message::RelayBatch(images) => {
                let mut text = String::from("relay-batch");
                for image in images {
                    text.push('\n');
                    text.push_str(&super::wire::encode(image));
                }
                text
            }
            Message::Commit => "commit".into(),
            Message::Abort => "abort".into(),
            Message::Declined(ids) => {
                let mut line = String::from("declined");
                for id in ids {
                    line.push_str(&format!(" {id}"));
                }
                line
            }
            Message::Started(pid, None) => format!("started {pid}"),
            Message::Started(pid, Some(t)) => format!(
                "started {pid} relays={} p50={} p99={} max={}",
                t.relays, t.p50_us, t.p99_us, t.max_us
            ),
            Message::Failed(why) => format!("failed {}", one_line(why)),
        };
        text.into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Message, BadMessage> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| BadMessage(String::from_utf8_lossy(bytes).into()))?;
        let bad = || BadMessage(text.chars().take(200).collect());
        if let Some(lines) = text.strip_prefix("relay-batch") {
            let images = lines
                .split('\n')
                .skip(1)
                .map(|line| super::wire::decode(line).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            if !lines.is_empty() && !lines.starts_with('\n') {
                return Err(bad());
            }
            return Ok(Message::RelayBatch(images));
        }
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let number = |s: &str| s.parse::<u64>().map_err(|_| bad());
        Ok(match word {
            MAGIC => {
                let mut parts = rest.split(' ');
                let format = number(parts.next().unwrap_or(""))? as u32;
                let mut from = None;
                let mut sockets = None;
                let mut servers = None;
                for part in parts {
                    match part.split_once('=') {
                        Some(("from", v)) => from = Some(number(v)? as u32),
                        Some(("sockets", v)) => sockets = Some(number(v)? as usize),
                        Some(("servers", v)) => servers = Some(number(v)? as usize),
                        // A later format may say more; its number tells.
                        _ => {}
                    }
                }
                Message::Header {
                    format,
                    from: from.unwrap_or(0),
                    sockets: sockets.unwrap_or(0),
                    servers: servers.unwrap_or(0),
                }
            }
            "server" => Message::Server(decode_server(rest).ok_or_else(bad)?),
            "sockets" => Message::Sockets(
                rest.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?,
            ),
            "ack" => Message::Ack(number(rest)? as usize),
            "ready" => Message::Ready,
            "refuse" => Message::Refuse(rest.into()),
            "relays" => Message::Relays(number(rest)? as usize),
            "commit" => Message::Commit,
            "abort" => Message::Abort,
            "declined" => Message::Declined(
                rest.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(number)
                    .collect::<Result<_, _>>()?,
            ),
            "started" => {
                let mut parts = rest.split(' ');
                let pid = number(parts.next().unwrap_or(""))? as u32;
                let mut fields = std::collections::HashMap::new();
                for part in parts {
                    let (name, value) = part.split_once('=').ok_or_else(bad)?;
                    fields.insert(name, number(value)?);
                }
                let taken = match fields.get("relays") {
                    None => None,
                    Some(&relays) => Some(Taken {
                        relays: relays as usize,
                        p50_us: *fields.get("p50").ok_or_else(bad)?,
                        p99_us: *fields.get("p99").ok_or_else(bad)?,
                        max_us: *fields.get("max").ok_or_else(bad)?,
                    }),
                };
                Message::Started(pid, taken)
            }
            "failed" => Message::Failed(rest.into()),
            _ => return Err(bad()),
        })
    }
}

fn one_line(text: &str) -> String {
    text.replace('\n', "; ")
}

fn encode_server(server: &ServerHealth) -> String {
    let (key, h) = (&server.key, &server.health);
    let flag = |b: bool| if b { '1' } else { '0' };
    let mut line = format!(
        "server {} up={} answered={} probed={}",
        key.addr,
        flag(h.up),
        flag(h.answered),
        flag(h.probed)
    );
    let mut field = |name: &str, value: &str| {
        line.push(' ');
        line.push_str(name);
        line.push('=');
        line.push_str(&escape(value));
    };
    if let Some(c) = &key.check {
        field("check", c.kind.name());
        field("target", &c.target.to_string());
        field("path", &c.path);
        if let Some(u) = &c.user {
            field("user", u);
        }
        if let Some(d) = &c.database {
            field("database", d);
        }
    }
    match h.reported {
        Some(Reported::Is(r)) => field("role", &r.to_string()),
        Some(Reported::Not(r)) => field("role", &format!("not-{r}")),
        None => {}
    }
    if let Some(t) = h.timeline {
        field("timeline", &t.to_string());
    }
    if let Some(e) = &h.check_error {
        field("error", e);
    }
    line
}

/// A `server` line's fields; `None` if one is missing or malformed.
fn decode_server(rest: &str) -> Option<ServerHealth> {
    let mut parts = rest.split(' ');
    let addr: SocketAddr = parts.next()?.parse().ok()?;
    let mut fields = std::collections::HashMap::new();
    for part in parts {
        let (name, value) = part.split_once('=')?;
        fields.insert(name, unescape(value)?);
    }
    let flag = |name: &str| match fields.get(name).map(String::as_str) {
        Some("1") => Some(true),
        Some("0") => Some(false),
        _ => None,
    };
    let role = |s: &str| match s {
        "primary" => Some(Role::Primary),
        "replica" => Some(Role::Replica),
        _ => None,
    };
    let check = match fields.get("check") {
        None => None,
        Some(kind) => Some(CheckKey {
            kind: kind.parse().ok()?,
            target: fields.get("target")?.parse().ok()?,
            path: fields.get("path")?.clone(),
            user: fields.get("user").cloned(),
            database: fields.get("database").cloned(),
        }),
    };
    let reported = match fields.get("role") {
        None => None,
        Some(r) => Some(match r.strip_prefix("not-") {
            Some(not) => Reported::Not(role(not)?),
            None => Reported::Is(role(r)?),
        }),
    };
    let timeline = match fields.get("timeline") {
        None => None,
        Some(t) => Some(t.parse().ok()?),
    };
    Some(ServerHealth {
        key: ServerKey { addr, check },
        health: Carried {
            up: flag("up")?,
            reported,
            timeline,
            answered: flag("answered")?,
            probed: flag("probed")?,
            check_error: fields.get("error").cloned(),
        },
    })
}

/// A value as one field: `%`, space, `=` and control bytes as `%XX`.
pub(super) fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '%' || c == ' ' || c == '=' || (c.is_control() && (c as u32) < 0x80) {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn unescape(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
                servers: 2,
            },
            Message::Server(ServerHealth {
                key: ServerKey {
                    addr: "10.0.0.1:5432".parse().unwrap(),
                    check: Some(CheckKey {
                        kind: crate::health::Kind::Postgres,
                        target: "10.0.0.1:5432".parse().unwrap(),
                        path: "/".into(),
                        user: Some("mon itor=%x".into()),
                        database: Some("postgres".into()),
                    }),
                },
                health: Carried {
                    up: true,
                    reported: Some(Reported::Is(Role::Primary)),
                    timeline: Some(4),
                    answered: true,
                    probed: true,
                    check_error: None,
                },
            }),
            Message::Server(ServerHealth {
                key: ServerKey {
                    addr: "[::1]:6379".parse().unwrap(),
                    check: Some(CheckKey {
                        kind: crate::health::Kind::Http,
                        target: "[::1]:8008".parse().unwrap(),
                        path: "/replica".into(),
                        user: None,
                        database: None,
                    }),
                },
                health: Carried {
                    up: false,
                    reported: Some(Reported::Not(Role::Replica)),
                    timeline: None,
                    answered: true,
                    probed: true,
                    check_error: Some("login refused:\n 28P01".into()),
                },
            }),
            Message::Server(ServerHealth {
                key: ServerKey {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    check: None,
                },
                health: Carried {
                    up: true,
                    reported: None,
                    timeline: None,
                    answered: false,
                    probed: false,
                    check_error: None,
                },
            }),
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
            Message::Started(99, None),
            Message::Started(
                99,
                Some(Taken {
                    relays: 500,
                    p50_us: 900,
                    p99_us: 4100,
                    max_us: 5000,
                }),
            ),
            Message::Relays(3),
            Message::RelayBatch(vec![]),
            Message::Declined(vec![4, 5, 1 << 40]),
            Message::Declined(vec![]),
            Message::Failed("bind: in use".into()),
        ];
        for m in messages {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        assert!(Message::decode(b"hello").is_err());
        assert!(Message::decode(b"ack x").is_err());
        assert!(Message::decode(b"server 127.0.0.1:1 up=1").is_err());
        assert!(
            Message::decode(b"server 127.0.0.1:1 up=1 answered=0 probed=0 role=leader").is_err()
        );
        assert!(Message::decode(b"server 127.0.0.1:1 up=1 answered=0 probed=0 error=%4").is_err());
    }

    #[test]
    fn a_header_of_another_format_still_reads_as_one() {
        let m = Message::decode(b"spliced-upgrade 3 from=5 sockets=1 relays=9").unwrap();
        assert!(matches!(
            m,
            Message::Header {
                format: 3,
                from: 5,
                sockets: 1,
                servers: 0
            }
        ));
        // Format 1's header (no servers) reads too, to be refused by number.
        let m = Message::decode(b"spliced-upgrade 1 from=5 sockets=1").unwrap();
        assert!(matches!(m, Message::Header { format: 1, .. }));
    }
}
