//! Redis: optional `AUTH`, `PING` → `+PONG`, and with a role,
//! `INFO replication` → `role:master` / `role:slave`, and the replication
//! position in the same reply (see [`super::lag`]): a master's
//! `master_repl_offset`; a replica's `slave_repl_offset` (or its own
//! `master_repl_offset`) and Redis 7's `slave_read_repl_offset`, on the
//! stream named by `master_replid`.

use super::lag::{stream_of, Position};
use super::{judge, quote, CheckSpec, Inbox, Step, Verdict, WantRole};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Auth,
    Ping,
    Info,
}

pub(super) struct Redis {
    state: State,
    auth: Option<Vec<u8>>,
    want: WantRole,
    ask_role: bool,
    /// Where the server is in its replication stream, from INFO.
    position: Option<Position>,
    inbox: Inbox,
}

/// One RESP reply, as far as a probe cares.
enum Reply<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Bulk(&'a [u8]),
    Other(u8),
}

impl Redis {
    pub(super) fn new(spec: &CheckSpec) -> Self {
        let auth = spec.password.as_ref().map(|p| {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(u) = &spec.user {
                args.push(u.as_bytes());
            }
            args.push(p.as_bytes());
            command(&args)
        });
        Redis {
            state: State::Ping,
            auth,
            want: spec.role,
            ask_role: spec.asks_role(),
            position: None,
            inbox: Inbox::default(),
        }
    }

    pub(super) fn start(&mut self) -> Step {
        match self.auth.take() {
            Some(auth) => {
                self.state = State::Auth;
                Step::Send(auth)
            }
            None => Step::Send(command(&[b"PING"])),
        }
    }

    pub(super) fn phase(&self) -> &'static str {
        match self.state {
            State::Auth => "waiting for the AUTH reply",
            State::Ping => "waiting for +PONG",
            State::Info => "waiting for INFO replication",
        }
    }

    pub(super) fn position(&self) -> Option<Position> {
        self.position
    }

    pub(super) fn on_bytes(&mut self, data: &[u8]) -> Step {
        let taken = self.inbox.push(data);
        let (reply, used) = match parse(&self.inbox.buf) {
            Ok(Some(r)) => r,
            Ok(None) => return self.inbox.incomplete("redis"),
            Err(why) => return Step::Done(Verdict::down(format!("redis sent {why}"))),
        };
        if let (State::Info, Reply::Bulk(info)) = (self.state, &reply) {
            self.position = position_of(info);
        }
        let step = answer(&mut self.state, self.want, self.ask_role, reply);
        self.inbox.buf.drain(..used);
        if matches!(step, Step::Send(_)) && (!self.inbox.buf.is_empty() || taken < data.len()) {
            // Replies we did not ask for yet: not a Redis we understand.
            return Step::Done(Verdict::down("redis sent more replies than asked for"));
        }
        step
    }
}

fn answer(state: &mut State, want: WantRole, ask_role: bool, reply: Reply<'_>) -> Step {
    match (*state, reply) {
        (_, Reply::Error(e)) if e.starts_with(b"NOAUTH") => Step::Done(Verdict::check_error(
            "redis requires a password (NOAUTH); set health.password-file",
        )),
        (_, Reply::Error(e)) if e.starts_with(b"NOPERM") => Step::Done(Verdict::check_error(
            format!("redis refused the check: {}", quote(e)),
        )),
        (State::Auth, Reply::Simple(b"OK")) => {
            *state = State::Ping;
            Step::Send(command(&[b"PING"]))
        }
        (State::Auth, Reply::Error(e)) => Step::Done(Verdict::check_error(format!(
            "redis refused AUTH: {}",
            quote(e)
        ))),
        (State::Ping, Reply::Simple(b"PONG")) => {
            if !ask_role {
                Step::Done(Verdict::Up { role: None })
            } else {
                *state = State::Info;
                Step::Send(command(&[b"INFO", b"replication"]))
            }
        }
        (State::Ping, Reply::Error(e)) => Step::Done(Verdict::down(format!(
            "redis answered PING with an error: {}",
            quote(e)
        ))),
        (State::Info, Reply::Bulk(text)) => Step::Done(role_of(text, want)),
        (State::Info, Reply::Error(e)) => Step::Done(Verdict::down(format!(
            "redis answered INFO with an error: {}",
            quote(e)
        ))),
        (state, reply) => Step::Done(Verdict::down(format!(
            "redis sent an unexpected reply {} while {}",
            describe(&reply),
            match state {
                State::Auth => "authenticating",
                State::Ping => "waiting for +PONG",
                State::Info => "waiting for INFO",
            }
        ))),
    }
}

fn role_of(info: &[u8], want: WantRole) -> Verdict {
    let role = info
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .find_map(|l| l.strip_prefix(b"role:"));
    match role {
        Some(b"master") => judge(want, super::Role::Primary),
        Some(b"slave") => judge(want, super::Role::Replica),
        Some(other) => Verdict::down(format!("redis reports role {:?}", quote(other))),
        None => Verdict::down("redis INFO replication has no role line"),
    }
}

/// The replication position in an `INFO replication` reply.
fn position_of(info: &[u8]) -> Option<Position> {
    let field = |name: &[u8]| {
        info.split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(b":"))
    };
    let number =
        |name: &[u8]| -> Option<u64> { std::str::from_utf8(field(name)?).ok()?.parse().ok() };
    let replid = field(b"master_replid").filter(|id| !id.is_empty())?;
    let (applied, received) = match field(b"role")? {
        b"master" => (number(b"master_repl_offset")?, None),
        b"slave" => (
            number(b"slave_repl_offset").or_else(|| number(b"master_repl_offset"))?,
            number(b"slave_read_repl_offset"),
        ),
        _ => return None,
    };
    Some(Position {
        stream: stream_of(replid),
        applied,
        received,
    })
}

fn describe(reply: &Reply<'_>) -> String {
    match reply {
        Reply::Simple(s) => format!("+{}", quote(s)),
        Reply::Error(s) => format!("-{}", quote(s)),
        Reply::Bulk(_) => "(bulk string)".to_string(),
        Reply::Other(t) => format!("of type {:?}", *t as char),
    }
}

/// A RESP array of bulk strings: the form every Redis accepts.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

/// One reply and the bytes it took, `None` if incomplete.
fn parse(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, String> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some((head, head_len)) = line(&buf[1..]) else {
        return Ok(None);
    };
    let head_len = head_len + 1;
    Ok(Some(match tag {
        b'+' => (Reply::Simple(head), head_len),
        b'-' => (Reply::Error(head), head_len),
        b'$' => {
            let len: usize = std::str::from_utf8(head)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("a bad bulk length {:?}", quote(head)))?;
            let end = head_len
                .checked_add(len)
                .filter(|&e| e < super::MAX_REPLY)
                .ok_or_else(|| format!("a bulk string of {len} bytes"))?;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err("a bulk string without its CRLF".to_string());
            }
            (Reply::Bulk(&buf[head_len..end]), end + 2)
        }
        b':' | b'*' | b'_' | b'%' | b'#' | b',' => (Reply::Other(tag), head_len),
        _ => return Err(format!("a reply that is not RESP (first byte {tag:#04x})")),
    }))
}
