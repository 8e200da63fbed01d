//! Relay deadlines: a min-heap with lazy re-arm.
//!
//! A transfer never touches the heap; it only stores `last_active` in the
//! relay. Each relay has at most one live entry, at the deadline it had when
//! armed. When an entry comes due, the worker recomputes the relay's real
//! deadline: if it moved later (bytes flowed), the relay is re-armed once for
//! the new time, so a busy relay costs one heap push per timeout period, not
//! per transfer. Entries of closed relays, or superseded by an earlier
//! deadline, are recognised by their `(id, at)` and skipped.
//!
//! Resolution: deadlines are exact `Instant`s; the event loop wakes for the
//! earliest one with epoll's millisecond resolution (rounded up), so a
//! deadline fires 0–1 ms late plus scheduling delay.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// A heap entry: when, which slab key, which relay generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Entry {
    pub(crate) at: Instant,
    pub(crate) key: usize,
    pub(crate) id: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<Entry>>,
}

impl Timers {
    pub(crate) fn schedule(&mut self, at: Instant, key: usize, id: u64) {
        self.heap.push(Reverse(Entry { at, key, id }));
    }

    /// The earliest entry's time.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// Pops the earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Entry> {
        match self.heap.peek() {
            Some(Reverse(e)) if e.at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Keeps only the entries `live` accepts.
    pub(crate) fn retain(&mut self, mut live: impl FnMut(&Entry) -> bool) {
        self.heap.retain(|Reverse(e)| live(e));
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.schedule(t0 + Duration::from_millis(20), 2, 20);
        t.schedule(t0 + Duration::from_millis(10), 1, 10);
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(
            t.pop_due(t0 + Duration::from_millis(15)).map(|e| e.key),
            Some(1)
        );
        assert_eq!(t.pop_due(t0 + Duration::from_millis(15)), None);
        assert_eq!(
            t.pop_due(t0 + Duration::from_millis(25)).map(|e| e.id),
            Some(20)
        );
        assert_eq!(t.len(), 0);
    }
}
