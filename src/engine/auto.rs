//! `auto` mode: per direction, copy while it carries small messages and
//! splice once it streams.
//!
//! Small request/response messages cost the same syscalls either way, and
//! copying them skips the pipe (two more fds and a pipe page per message).
//! Streams are where splice saves CPU. The policy only watches how much
//! each read moves; the slot switches engines only while its buffer is
//! empty, so no byte is ever reordered.

use super::Engine;

/// A read at least this large is stream-like.
const LARGE_READ: usize = 16 * 1024;
/// Reads this small, in splice mode, are message-like.
const SMALL_READ: usize = 4 * 1024;
/// Large reads in a row that switch a copying direction to splice (a read
/// that fills the whole copy buffer switches at once).
const LARGE_STREAK: u8 = 2;
/// Small reads in a row that switch a splicing direction back to copy.
const SMALL_STREAK: u8 = 4;

/// What one direction has looked like lately.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AutoPolicy {
    wanted: Option<Engine>,
    streak: u8,
}

impl AutoPolicy {
    /// A new direction starts copying: most connections open with small
    /// messages (a startup packet, a handshake, a command).
    pub(crate) fn new() -> AutoPolicy {
        AutoPolicy {
            wanted: Some(Engine::Copy),
            streak: 0,
        }
    }

    /// The engine this direction should run from its next empty buffer on.
    pub(crate) fn wanted(&self) -> Engine {
        self.wanted.unwrap_or(Engine::Copy)
    }

    /// Records one read of `moved` bytes by `engine`; `filled` says it
    /// filled all the room the buffer had.
    pub(crate) fn observe(&mut self, engine: Engine, moved: usize, filled: bool) {
        match engine {
            Engine::Copy => {
                if filled && moved >= LARGE_READ {
                    self.switch_to(Engine::Splice);
                } else if moved >= LARGE_READ {
                    self.streak += 1;
                    if self.streak >= LARGE_STREAK {
                        self.switch_to(Engine::Splice);
                    }
                } else {
                    self.streak = 0;
                }
            }
            Engine::Splice => {
                if moved < SMALL_READ {
                    self.streak += 1;
                    if self.streak >= SMALL_STREAK {
                        self.switch_to(Engine::Copy);
                    }
                } else {
                    self.streak = 0;
                }
            }
        }
    }

    fn switch_to(&mut self, engine: Engine) {
        self.wanted = Some(engine);
        self.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod copying {
        use super::*;

        #[test]
        fn small_messages_keep_copying() {
            let mut p = AutoPolicy::new();
            for _ in 0..1000 {
                p.observe(Engine::Copy, 64, false);
            }
            assert_eq!(p.wanted(), Engine::Copy);
        }

        #[test]
        fn a_read_that_fills_the_buffer_switches_at_once() {
            let mut p = AutoPolicy::new();
            p.observe(Engine::Copy, 64 * 1024, true);
            assert_eq!(p.wanted(), Engine::Splice);
        }

        #[test]
        fn large_reads_in_a_row_switch() {
            let mut p = AutoPolicy::new();
            p.observe(Engine::Copy, 20_000, false);
            assert_eq!(p.wanted(), Engine::Copy, "one large read is no stream");
            p.observe(Engine::Copy, 20_000, false);
            assert_eq!(p.wanted(), Engine::Splice);
        }

        #[test]
        fn a_small_read_breaks_the_streak() {
            let mut p = AutoPolicy::new();
            p.observe(Engine::Copy, 20_000, false);
            p.observe(Engine::Copy, 100, false);
            p.observe(Engine::Copy, 20_000, false);
            assert_eq!(p.wanted(), Engine::Copy);
        }

        #[test]
        fn a_small_buffer_filled_is_no_stream() {
            let mut p = AutoPolicy::new();
            // A full buffer after a partial one holds only its rest.
            p.observe(Engine::Copy, 512, true);
            assert_eq!(p.wanted(), Engine::Copy);
        }
    }

    mod splicing {
        use super::*;

        fn streaming() -> AutoPolicy {
            let mut p = AutoPolicy::new();
            p.observe(Engine::Copy, 64 * 1024, true);
            assert_eq!(p.wanted(), Engine::Splice);
            p
        }

        #[test]
        fn large_reads_keep_splicing() {
            let mut p = streaming();
            for _ in 0..100 {
                p.observe(Engine::Splice, 256 * 1024, false);
            }
            assert_eq!(p.wanted(), Engine::Splice);
        }

        #[test]
        fn small_reads_in_a_row_switch_back() {
            let mut p = streaming();
            for _ in 0..SMALL_STREAK - 1 {
                p.observe(Engine::Splice, 100, false);
            }
            assert_eq!(p.wanted(), Engine::Splice);
            p.observe(Engine::Splice, 100, false);
            assert_eq!(p.wanted(), Engine::Copy);
        }

        #[test]
        fn a_tail_of_a_stream_does_not_switch_back() {
            let mut p = streaming();
            p.observe(Engine::Splice, 300, false);
            p.observe(Engine::Splice, 128 * 1024, false);
            p.observe(Engine::Splice, 300, false);
            assert_eq!(p.wanted(), Engine::Splice);
        }
    }
}
