//! HTTP: `GET path`; a 2xx status line means up. A role path (Patroni's
//! `/primary`, `/master`, `/leader`, `/replica`, `/read-only`) reports a
//! role: a 2xx says the server is in it, a 503 that it is not (an answer,
//! applied at once, not a failure counted towards `fall`). 401 and 403
//! mean the check's own credentials are wrong: a check error.

use std::net::SocketAddr;

use super::{quote, CheckSpec, Inbox, Role, Step, Verdict};

/// The role a path asks about, if it is a role path.
pub fn path_role(path: &str) -> Option<Role> {
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    match path {
        "/primary" | "/master" | "/leader" | "/read-write" => Some(Role::Primary),
        "/replica" | "/read-only" | "/standby" => Some(Role::Replica),
        _ => None,
    }
}

/// A status line longer than this is not one.
const MAX_STATUS_LINE: usize = 1024;

pub(super) struct Http {
    path: String,
    host: SocketAddr,
    inbox: Inbox,
}

impl Http {
    pub(super) fn new(spec: &CheckSpec, target: SocketAddr) -> Self {
        Http {
            path: spec.http_path.clone(),
            host: target,
            inbox: Inbox::default(),
        }
    }

    pub(super) fn start(&mut self) -> Step {
        Step::Send(
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: spliced-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
                self.path, self.host
            )
            .into_bytes(),
        )
    }

    pub(super) fn on_bytes(&mut self, data: &[u8]) -> Step {
        let room = MAX_STATUS_LINE.saturating_sub(self.inbox.buf.len());
        // Only the status line matters: keep no more than it may need.
        self.inbox.push(&data[..data.len().min(room)]);
        let buf = &self.inbox.buf;
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() >= MAX_STATUS_LINE {
                return Step::Done(Verdict::down(format!(
                    "http status line longer than {MAX_STATUS_LINE} bytes"
                )));
            }
            return Step::NeedMore;
        };
        Step::Done(self.judge(&buf[..end]))
    }

    fn judge(&self, line: &[u8]) -> Verdict {
        // "HTTP/1.1 200 OK"
        let mut parts = line.splitn(3, |&b| b == b' ');
        let version = parts.next().unwrap_or_default();
        let code = parts.next().unwrap_or_default();
        let reason = parts.next().unwrap_or_default();
        if !version.starts_with(b"HTTP/1.")
            || code.len() != 3
            || !code.iter().all(u8::is_ascii_digit)
        {
            return Verdict::down(format!(
                "http answered with a bad status line {:?}",
                quote(line)
            ));
        }
        let role = path_role(&self.path);
        if code[0] == b'2' {
            Verdict::Up { role }
        } else if let (Some(role), b"503") = (role, code) {
            Verdict::NotRole { role }
        } else if code == b"401" || code == b"403" {
            Verdict::check_error(format!(
                "http GET {} answered {} {}: the check's credentials are refused",
                self.path,
                quote(code),
                quote(reason)
            ))
        } else {
            Verdict::down(format!(
                "http GET {} answered {} {}",
                self.path,
                quote(code),
                quote(reason)
            ))
        }
    }
}
