//! Decoding fuzz bytes.

use std::time::Duration;

use crate::config::Timeouts;
use crate::relay::Peer;
use crate::relay::PUMP_BUDGET;

use super::direction::{Action, DirSetup};
use super::engine::{Step, FAIL_KINDS};
use super::pair::{PairAction, PairSetup, CUT_REASONS};

/// Reads fuzz bytes; past the end every byte is 0.
struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    fn byte(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn step(&mut self) -> Step {
        let b = self.byte();
        match b & 7 {
            0 | 1 => Step::Moved(1 + (b >> 3) as usize),
            2 => Step::MovedAll(1 + (b >> 3) as usize),
            3 => Step::Moved(1 + self.u16() as usize * 16),
            4 | 5 => Step::WouldBlock,
            6 => Step::Eof,
            _ => Step::Fail(FAIL_KINDS[(b >> 3) as usize % FAIL_KINDS.len()]),
        }
    }

    fn capacity(&mut self, b: u8) -> Option<usize> {
        match b & 3 {
            0 => None,
            1 => Some(1 + self.byte() as usize),
            2 => Some(1 + self.u16() as usize),
            _ => Some(64 * 1024),
        }
    }
}

pub(super) fn decode_direction(data: &[u8]) -> (DirSetup, Vec<Action>) {
    let mut r = Bytes { data };
    let h = r.byte();
    let setup = DirSetup {
        capacity: r.capacity(h),
        shutdown_fails: (h & 12 == 12).then(|| FAIL_KINDS[(h >> 6) as usize % FAIL_KINDS.len()]),
        from_upstream: h & 16 != 0,
        settle: h & 32 == 0,
    };
    let mut actions = Vec::new();
    while let Some(b) = r.next() {
        match b % 8 {
            0 => actions.push(Action::Fill(r.step())),
            1 => actions.push(Action::Drain(r.step())),
            2 => actions.push(Action::Readable),
            3 => actions.push(Action::Writable),
            4 => actions.push(Action::Pump(u32::from(b >> 3))),
            5 => actions.extend([
                Action::Readable,
                Action::Writable,
                Action::Pump(PUMP_BUDGET / 2),
            ]),
            6 => actions.push(Action::Pump(PUMP_BUDGET / 2)),
            _ => {
                actions.push(Action::Fill(r.step()));
                actions.push(Action::Drain(r.step()));
            }
        }
    }
    (setup, actions)
}

pub(super) fn decode_pair(data: &[u8]) -> (PairSetup, Vec<PairAction>) {
    let mut r = Bytes { data };
    let h = r.byte();
    let timeout = |r: &mut Bytes| match r.byte() {
        0 => None,
        b => Some(Duration::from_millis(u64::from(b) * 10)),
    };
    let timeouts = Timeouts {
        idle: timeout(&mut r),
        fin: timeout(&mut r),
        connect: timeout(&mut r),
    };
    let setup = PairSetup {
        timeouts,
        capacity: r.capacity(h),
        shutdown_fails: (h & 12 == 12).then(|| FAIL_KINDS[(h >> 6) as usize % FAIL_KINDS.len()]),
        settle: h & 32 == 0,
    };
    let side = |b: u8| {
        if b & 8 == 0 {
            Peer::Client
        } else {
            Peer::Upstream
        }
    };
    let mut actions = Vec::new();
    while let Some(b) = r.next() {
        match b % 8 {
            0 | 1 => actions.push(PairAction::Fill(side(b), r.step())),
            2 | 3 => actions.push(PairAction::Drain(side(b), r.step())),
            4 => actions.push(PairAction::Ready(side(b), b & 16 != 0, b & 32 != 0)),
            // The highest three pump bytes cut the relay instead.
            6 if b >> 3 >= 29 => {
                actions.push(PairAction::Cut(CUT_REASONS[usize::from(b >> 3) - 29]))
            }
            5 | 6 => actions.push(PairAction::Pump),
            _ => actions.push(PairAction::Tick(u64::from(b >> 3) * 4)),
        }
    }
    (setup, actions)
}
