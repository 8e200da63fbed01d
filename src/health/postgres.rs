//! Postgres: a startup message; without a role, the first authentication
//! request (or ReadyForQuery) means alive. With a role: log in (trust,
//! cleartext, md5, SCRAM-SHA-256) and ask `pg_is_in_recovery()` and, on a
//! primary, its timeline (taken from the current WAL file's name, which
//! moves at promotion; `pg_control_checkpoint()` lags it until the first
//! checkpoint after promotion), and the same row's replication position
//! (see [`super::lag`]).
//!
//! A refused login (28P01, 28000), a database that does not exist (3D000)
//! or a password the server asks for and the check lacks are check errors:
//! they say nothing about the server.
//!
//! The message codec, md5 hashing and SCRAM are postgres-protocol's.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;

use super::lag::{parse_lsn, Position};
use super::{judge, quote, CheckSpec, Role, Step, Verdict, WantRole, MAX_REPLY};

/// The login role when the check names none.
pub(super) const DEFAULT_USER: &str = "postgres";
/// The database when the check names none: the maintenance database every
/// cluster has (libpq would pick the user's name, which often does not exist).
pub(super) const DEFAULT_DATABASE: &str = "postgres";
/// The role, a primary's timeline, the cluster's identifier, and where the
/// server is in the WAL: a primary's write position, or a standby's replay
/// and receive positions.
pub const QUERY: &str = "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
     (pg_control_system()).system_identifier, \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     pg_last_wal_receive_lsn()";
/// SQLSTATEs that mean the check's own login is wrong, not the server.
const CHECK_ERRORS: [&str; 4] = ["28P01", "28000", "3D000", "42501"];
/// PBKDF2 rounds we accept: each costs the probe's thread (a worker's
/// event loop) about 0.2 µs; PostgreSQL's default is 4096 (≈1 ms), the
/// crate's ceiling of 100 000 would stall the loop for ≈50 ms per probe.
pub(super) const SCRAM_MAX_ITERATIONS: u32 = 16_384;
/// Terminate: 'X' and a length of 4.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Startup sent; waiting for the authentication request.
    Startup,
    /// Authenticating (a password or SCRAM message was sent).
    Auth,
    /// AuthenticationOk seen; waiting for ReadyForQuery.
    Ready,
    /// The query was sent; waiting for its row and ReadyForQuery.
    Query,
}

pub(super) struct Postgres {
    state: State,
    user: String,
    database: String,
    password: Option<String>,
    want: WantRole,
    scram: Option<ScramSha256>,
    /// `pg_is_in_recovery()`'s answer, once its row arrived.
    recovery: Option<bool>,
    /// A primary's timeline, from the same row.
    timeline: Option<u32>,
    /// Where the server is in the WAL, from the same row.
    position: Option<Position>,
    ask_role: bool,
    /// A session was established: end it with Terminate.
    logged_in: bool,
    buf: BytesMut,
}

impl Postgres {
    pub(super) fn new(spec: &CheckSpec) -> Self {
        Postgres {
            state: State::Startup,
            user: spec.user.clone().unwrap_or_else(|| DEFAULT_USER.into()),
            database: spec
                .database
                .clone()
                .unwrap_or_else(|| DEFAULT_DATABASE.into()),
            password: spec.password.clone(),
            want: spec.role,
            scram: None,
            recovery: None,
            timeline: None,
            position: None,
            ask_role: spec.ask_role,
            logged_in: false,
            buf: BytesMut::new(),
        }
    }

    pub(super) fn start(&mut self) -> Step {
        let params = [
            ("user", self.user.as_str()),
            ("database", self.database.as_str()),
            ("application_name", "spliced-health"),
        ];
        let mut out = BytesMut::new();
        match frontend::startup_message(params, &mut out) {
            Ok(()) => Step::Send(out.to_vec()),
            Err(e) => Step::Done(Verdict::down(format!(
                "postgres startup message cannot be built: {e}"
            ))),
        }
    }

    pub(super) fn phase(&self) -> &'static str {
        match self.state {
            State::Startup => "waiting for the authentication request",
            State::Auth => "authenticating",
            State::Ready => "waiting for ReadyForQuery",
            State::Query => "waiting for pg_is_in_recovery()",
        }
    }

    pub(super) fn timeline(&self) -> Option<u32> {
        self.timeline
    }

    pub(super) fn position(&self) -> Option<Position> {
        self.position
    }

    pub(super) fn goodbye(&self) -> &'static [u8] {
        if self.logged_in {
            TERMINATE
        } else {
            b""
        }
    }

    pub(super) fn on_bytes(&mut self, data: &[u8]) -> Step {
        // Messages are taken out as they complete and each is capped by its
        // header, so slices bound the buffer at MAX_REPLY plus one slice.
        let mut out = Vec::new();
        for slice in data.chunks(4096) {
            self.buf.extend_from_slice(slice);
            if let Err(v) = self.take_messages(&mut out) {
                return Step::Done(v);
            }
        }
        if out.is_empty() {
            Step::NeedMore
        } else {
            Step::Send(out)
        }
    }

    /// Answers every complete message in the buffer, appending to `out`.
    fn take_messages(&mut self, out: &mut Vec<u8>) -> Result<(), Verdict> {
        loop {
            // Message::parse reserves whatever length a header claims.
            if let Some(len) = self.buf.get(1..5) {
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if len >= MAX_REPLY {
                    return Err(Verdict::down(format!(
                        "postgres announced a message of {len} bytes"
                    )));
                }
            }
            let msg = match Message::parse(&mut self.buf) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(Verdict::down(format!(
                        "postgres sent a malformed message: {e}"
                    )))
                }
            };
            if let Some(bytes) = self.answer(msg)? {
                out.extend_from_slice(&bytes);
            }
        }
    }

    /// Bytes to send for one message, or the verdict.
    fn answer(&mut self, msg: Message) -> Result<Option<Vec<u8>>, Verdict> {
        let liveness = self.want == WantRole::Any && !self.ask_role;
        let mut out = BytesMut::new();
        match msg {
            Message::ErrorResponse(body) => return Err(error_verdict(&body, self.phase())),
            Message::NoticeResponse(_)
            | Message::ParameterStatus(_)
            | Message::BackendKeyData(_) => {}
            // The first authentication request proves a live server.
            Message::AuthenticationCleartextPassword
            | Message::AuthenticationMd5Password(_)
            | Message::AuthenticationSasl(_)
                if liveness && self.state == State::Startup =>
            {
                return Err(Verdict::Up { role: None })
            }
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(self.password("cleartext")?.as_bytes(), &mut out)
                    .map_err(codec)?;
                self.state = State::Auth;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(
                    self.user.as_bytes(),
                    self.password("md5")?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut out).map_err(codec)?;
                self.state = State::Auth;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechs = body.mechanisms();
                let mut scram_offered = false;
                while let Some(m) = mechs.next().map_err(codec)? {
                    scram_offered |= m == SCRAM_SHA_256;
                }
                if !scram_offered {
                    return Err(Verdict::down(
                        "postgres offers no SASL mechanism we speak (want SCRAM-SHA-256)",
                    ));
                }
                let password = self.password("SCRAM-SHA-256")?;
                // No TLS, so no channel binding to offer.
                let scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut out)
                    .map_err(codec)?;
                self.scram = Some(scram);
                self.state = State::Auth;
            }
            Message::AuthenticationSaslContinue(body) => {
                if let Some(n) = scram_iterations(body.data()).filter(|&n| n > SCRAM_MAX_ITERATIONS)
                {
                    return Err(Verdict::down(format!(
                        "postgres SCRAM iteration count {n} over the probe's limit of {SCRAM_MAX_ITERATIONS}"
                    )));
                }
                let scram = self.scram_in_progress()?;
                scram
                    .update(body.data())
                    .map_err(|e| Verdict::down(format!("postgres SCRAM exchange failed: {e}")))?;
                frontend::sasl_response(scram.message(), &mut out).map_err(codec)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let scram = self.scram_in_progress()?;
                scram.finish(body.data()).map_err(|e| {
                    Verdict::down(format!(
                        "postgres SCRAM server signature did not verify: {e}"
                    ))
                })?;
                self.scram = None;
            }
            Message::AuthenticationOk => {
                if self.scram.is_some() {
                    return Err(Verdict::down(
                        "postgres accepted the login before the SCRAM exchange ended",
                    ));
                }
                self.state = State::Ready;
            }
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationGssContinue(_) => {
                if liveness && self.state == State::Startup {
                    return Err(Verdict::Up { role: None });
                }
                return Err(Verdict::down(
                    "postgres asks for an authentication method we do not speak (GSS, SSPI, Kerberos or SCM)",
                ));
            }
            Message::ReadyForQuery(_) if self.state == State::Ready => {
                self.logged_in = true;
                if liveness {
                    return Err(Verdict::Up { role: None });
                }
                frontend::query(QUERY, &mut out).map_err(codec)?;
                self.state = State::Query;
            }
            Message::RowDescription(_) if self.state == State::Query => {}
            Message::CommandComplete(_) if self.state == State::Query => {}
            Message::DataRow(body) if self.state == State::Query => {
                let mut ranges = body.ranges();
                let first = ranges.next().map_err(codec)?.flatten();
                let value = first.map(|r| &body.buffer()[r]);
                let mut text = || -> Result<Option<&str>, Verdict> {
                    let range = ranges.next().map_err(codec)?.flatten();
                    Ok(range.and_then(|r| std::str::from_utf8(&body.buffer()[r]).ok()))
                };
                self.timeline = text()?.and_then(|t| t.parse().ok());
                // The identifier is an int8 holding an unsigned 64-bit value.
                let stream = text()?.and_then(|t| t.parse::<i64>().ok());
                let applied = text()?.and_then(parse_lsn);
                let received = text()?.and_then(parse_lsn);
                self.position = match (stream, applied) {
                    (Some(stream), Some(applied)) => Some(Position {
                        stream: stream as u64,
                        applied,
                        received,
                    }),
                    _ => None,
                };
                self.recovery = Some(match value {
                    Some(b"t") => true,
                    Some(b"f") => false,
                    other => {
                        return Err(Verdict::down(format!(
                            "postgres answered pg_is_in_recovery() with {:?}",
                            other.map(quote)
                        )))
                    }
                });
            }
            Message::ReadyForQuery(_) if self.state == State::Query => {
                return Err(match self.recovery {
                    Some(true) => judge(self.want, Role::Replica),
                    Some(false) => judge(self.want, Role::Primary),
                    None => Verdict::down("postgres answered pg_is_in_recovery() with no row"),
                });
            }
            _ => {
                return Err(Verdict::down(format!(
                    "postgres sent an unexpected message while {}",
                    self.phase()
                )))
            }
        }
        Ok((!out.is_empty()).then(|| out.to_vec()))
    }

    fn password(&self, method: &str) -> Result<&str, Verdict> {
        self.password.as_deref().ok_or_else(|| {
            Verdict::check_error(format!(
                "postgres asks for a password ({method}) for user {:?}; set health.password",
                self.user
            ))
        })
    }

    fn scram_in_progress(&mut self) -> Result<&mut ScramSha256, Verdict> {
        self.scram
            .as_mut()
            .ok_or_else(|| Verdict::down("postgres sent a SCRAM message out of turn"))
    }
}

/// The `i=` attribute of a SCRAM server-first message; postgres-protocol
/// validates the message itself.
fn scram_iterations(server_first: &[u8]) -> Option<u32> {
    std::str::from_utf8(server_first)
        .ok()?
        .split(',')
        .find_map(|a| a.strip_prefix("i="))?
        .parse()
        .ok()
}

fn codec(e: std::io::Error) -> Verdict {
    Verdict::down(format!("postgres message codec: {e}"))
}

/// "postgres error 57P03 while waiting for ...: the database system is
/// starting up".
fn error_verdict(body: &ErrorResponseBody, phase: &str) -> Verdict {
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = quote(f.value_bytes()),
            b'M' => message = quote(f.value_bytes()),
            _ => {}
        }
    }
    let text = format!("postgres error {code} while {phase}: {message}");
    if CHECK_ERRORS.contains(&code.as_str()) {
        Verdict::check_error(text)
    } else {
        Verdict::down(text)
    }
}
