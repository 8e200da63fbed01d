//! One admin connection: read a request head into a bounded buffer, answer
//! it, write the answer without blocking, then the next request or a
//! closing linger. Pipelined requests are answered one at a time, and
//! nothing more is read while an answer is pending, so a client that does
//! not read only stalls itself until its write deadline.

use std::io::{self, ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use super::http::{self, Head, Parsed, Response, MAX_HEAD_BYTES};

/// From the connection's start, or the end of the previous answer, until a
/// whole request head has arrived.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// From an answer's start until its last byte is written.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last answer: how long the client's leftovers are read and
/// dropped, so closing does not reset the connection under the answer.
pub(super) const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes dropped while lingering before the connection is cut.
pub(super) const LINGER_BYTES: usize = 64 * 1024;
/// Most requests one connection gets answered per turn, so a fast
/// pipelining client takes turns with the others.
pub(super) const ANSWERS_PER_TURN: usize = 8;

/// The socket side, so that the state machine can run over a test double.
pub(super) trait Socket: Read + Write {
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Socket for mio::net::TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// What a turn left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// Waiting on the socket (the next readiness event).
    Wait,
    /// More to do at once: give it another turn after the others.
    Again,
    /// Done: close the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    Writing { keep_alive: bool },
    Lingering { dropped: usize },
}

pub(super) struct Conn {
    input: Box<[u8]>,
    held: usize,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    deadline: Instant,
    last_progress: Instant,
}

impl Conn {
    pub(super) fn new(now: Instant) -> Conn {
        Conn {
            input: vec![0; MAX_HEAD_BYTES].into_boxed_slice(),
            held: 0,
            output: Vec::new(),
            written: 0,
            phase: Phase::Reading,
            deadline: now + REQUEST_TIMEOUT,
            last_progress: now,
        }
    }

    /// When the connection is closed unless its phase ends first.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The last time a byte was read or written (or the accept).
    pub(super) fn last_progress(&self) -> Instant {
        self.last_progress
    }

    /// Does what the socket allows now.
    pub(super) fn turn<S: Socket>(
        &mut self,
        socket: &mut S,
        now: Instant,
        answer: &mut dyn FnMut(&Head<'_>) -> Response,
    ) -> Turn {
        let mut answered = 0;
        loop {
            match self.phase {
                Phase::Reading => {
                    if answered == ANSWERS_PER_TURN {
                        return Turn::Again;
                    }
                    if let Some(keep_alive) = self.answer_held(answer) {
                        answered += 1;
                        self.phase = Phase::Writing { keep_alive };
                        self.deadline = now + WRITE_TIMEOUT;
                        continue;
                    }
                    match socket.read(&mut self.input[self.held..]) {
                        Ok(0) => return Turn::Close,
                        Ok(n) => {
                            self.held += n;
                            self.last_progress = now;
                        }
                        Err(e) => match step(&e) {
                            Some(turn) => return turn,
                            None => continue,
                        },
                    }
                }
                Phase::Writing { keep_alive } => {
                    while self.written < self.output.len() {
                        match socket.write(&self.output[self.written..]) {
                            Ok(0) => return Turn::Close,
                            Ok(n) => {
                                self.written += n;
                                self.last_progress = now;
                            }
                            Err(e) => match step(&e) {
                                Some(turn) => return turn,
                                None => continue,
                            },
                        }
                    }
                    self.output.clear();
                    self.written = 0;
                    if keep_alive {
                        self.phase = Phase::Reading;
                        self.deadline = now + REQUEST_TIMEOUT;
                    } else {
                        if socket.shutdown_write().is_err() {
                            return Turn::Close;
                        }
                        self.held = 0;
                        self.phase = Phase::Lingering { dropped: 0 };
                        self.deadline = now + LINGER_TIMEOUT;
                    }
                }
                Phase::Lingering { dropped } => match socket.read(&mut self.input) {
                    Ok(0) => return Turn::Close,
                    Ok(n) if dropped + n > LINGER_BYTES => return Turn::Close,
                    Ok(n) => {
                        self.phase = Phase::Lingering {
                            dropped: dropped + n,
                        };
                        self.last_progress = now;
                    }
                    Err(e) => match step(&e) {
                        Some(turn) => return turn,
                        None => continue,
                    },
                },
            }
        }
    }

    /// Queues the answer to the request held at the start of the input, if
    /// it is whole (or bad); returns whether to keep the connection after.
    fn answer_held(&mut self, answer: &mut dyn FnMut(&Head<'_>) -> Response) -> Option<bool> {
        let (keep_alive, used) = match http::parse(&self.input[..self.held]) {
            Parsed::Partial => return None,
            Parsed::Bad(response) => {
                response.encode(&mut self.output, true, false);
                (false, self.held)
            }
            Parsed::Complete(head, len) => {
                let keep_alive = head.keep_alive && !head.has_body;
                answer(&head).encode(&mut self.output, head.method != "HEAD", keep_alive);
                (keep_alive, len)
            }
        };
        self.input.copy_within(used..self.held, 0);
        self.held -= used;
        Some(keep_alive)
    }
}

/// What an I/O error means for the turn: `None` to retry (interrupted).
fn step(e: &io::Error) -> Option<Turn> {
    match e.kind() {
        ErrorKind::Interrupted => None,
        ErrorKind::WouldBlock => Some(Turn::Wait),
        _ => Some(Turn::Close),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A socket that hands out `incoming` then would block (or EOF), and
    /// accepts up to `room` bytes of output before it would block.
    #[derive(Default)]
    struct Fake {
        incoming: Vec<u8>,
        eof: bool,
        sent: Vec<u8>,
        room: usize,
        shut: Cell<bool>,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.incoming.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.incoming.len());
            buf[..n].copy_from_slice(&self.incoming[..n]);
            self.incoming.drain(..n);
            Ok(n)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.sent.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Socket for Fake {
        fn shutdown_write(&self) -> io::Result<()> {
            self.shut.set(true);
            Ok(())
        }
    }

    fn ok(head: &Head<'_>) -> Response {
        Response::text(200, format!("{}\n", head.path))
    }

    fn answers(sent: &[u8]) -> usize {
        String::from_utf8_lossy(sent).matches("HTTP/1.1 ").count()
    }

    #[test]
    fn pipelined_requests_wait_for_the_pending_answer() {
        let t0 = Instant::now();
        let mut c = Conn::new(t0);
        let mut s = Fake {
            incoming: b"GET /a HTTP/1.1\r\n\r\n".repeat(3),
            room: 10,
            ..Fake::default()
        };
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Wait);
        // One answer started, nothing more read than the buffer held.
        assert_eq!(c.phase, Phase::Writing { keep_alive: true });
        assert_eq!(c.deadline(), t0 + WRITE_TIMEOUT);
        assert_eq!(s.sent.len(), 10);
        // The reader drains: every request is answered, then it waits.
        s.room = usize::MAX;
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.turn(&mut s, t1, &mut ok), Turn::Wait);
        assert_eq!(answers(&s.sent), 3);
        assert_eq!(c.phase, Phase::Reading);
        assert_eq!(c.deadline(), t1 + REQUEST_TIMEOUT);
        assert_eq!(c.last_progress(), t1);
    }

    #[test]
    fn a_fast_pipeliner_takes_turns() {
        let t0 = Instant::now();
        let mut c = Conn::new(t0);
        let mut s = Fake {
            incoming: b"GET /a HTTP/1.1\r\n\r\n".repeat(ANSWERS_PER_TURN + 2),
            room: usize::MAX,
            ..Fake::default()
        };
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Again);
        assert_eq!(answers(&s.sent), ANSWERS_PER_TURN);
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Wait);
        assert_eq!(answers(&s.sent), ANSWERS_PER_TURN + 2);
    }

    #[test]
    fn a_bad_request_is_answered_then_the_connection_lingers_and_closes() {
        let t0 = Instant::now();
        let mut c = Conn::new(t0);
        let mut s = Fake {
            incoming: b"NOT HTTP AT ALL\r\n\r\nmore".to_vec(),
            room: usize::MAX,
            ..Fake::default()
        };
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Wait);
        assert!(s.sent.starts_with(b"HTTP/1.1 400 "));
        assert!(s.shut.get(), "write side shut after the answer");
        assert_eq!(c.deadline(), t0 + LINGER_TIMEOUT);
        s.eof = true;
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Close);
    }

    #[test]
    fn an_oversized_head_gets_431_and_lingering_is_bounded() {
        let t0 = Instant::now();
        let mut c = Conn::new(t0);
        let mut incoming = b"GET / HTTP/1.1\r\nX: ".to_vec();
        incoming.resize(MAX_HEAD_BYTES + 2 * LINGER_BYTES, b'a');
        let mut s = Fake {
            incoming,
            room: usize::MAX,
            ..Fake::default()
        };
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Close);
        assert!(s.sent.starts_with(b"HTTP/1.1 431 "), "{:?}", s.sent);
        assert!(!s.incoming.is_empty(), "stopped reading past the bound");
    }

    #[test]
    fn eof_before_a_whole_request_closes() {
        let t0 = Instant::now();
        let mut c = Conn::new(t0);
        let mut s = Fake {
            incoming: b"GET / HT".to_vec(),
            eof: true,
            ..Fake::default()
        };
        assert_eq!(c.turn(&mut s, t0, &mut ok), Turn::Close);
        assert!(s.sent.is_empty());
    }
}
