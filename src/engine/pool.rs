//! Per-worker pools of pipes and copy buffers.
//!
//! A direction takes a buffer only when its source is readable and gives it
//! back as soon as it is empty, so an idle relay holds none. Pipes cost two
//! fds and are charged against the user's `pipe-user-pages-soft`, hence the
//! caps: a worker's `--max-pipes`, and the pipes' share of the fd limit
//! ([`PipeFds`], one count for all workers, so pipes never take the socket
//! of a relay under the relay cap). Past either (or on EMFILE/ENFILE) a
//! direction falls back to copy, which is counted and logged at most once a
//! second per worker.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Buffer, Engine, MappedBuffer, PooledPipe};
use crate::config::Config;
use crate::shm::Block;
use crate::stats::{CounterBlock, FallbackReason};
use crate::sys::{self, Pipe};

/// How often a worker may log fallbacks or pipe-size warnings.
const LOG_EVERY: Duration = Duration::from_secs(1);
/// Most empty copy buffers a worker keeps, unless more were in use at once
/// within the last [`PEAK_WINDOW`]: the uring loop's copy buffers are all
/// out at once between a turn's receives and its sends, and a pool smaller
/// than that would unmap and map them again every turn.
const MAX_IDLE_BUFFERS: usize = 256;
/// How long a peak of copy buffers in use keeps that many mapped.
const PEAK_WINDOW: Duration = Duration::from_secs(1);

/// The pipe fds all workers hold (live pipes, in use or pooled), within
/// the share of the fd limit the relays' sockets leave them (see
/// `runtime::fd_budget`).
#[derive(Debug)]
pub(crate) struct PipeFds {
    limit: usize,
    held: AtomicUsize,
}

impl PipeFds {
    pub(crate) fn new(limit: usize) -> PipeFds {
        PipeFds {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Claims the two fds of one pipe; false when they would pass the
    /// limit.
    fn claim(&self) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + 2 <= self.limit).then_some(held + 2)
            })
            .is_ok()
    }

    /// Gives back the two fds of a pipe that closed.
    fn release(&self) {
        self.held.fetch_sub(2, Ordering::Relaxed);
    }

    /// Whether no other pipe fits now.
    fn full(&self) -> bool {
        self.held.load(Ordering::Relaxed) + 2 > self.limit
    }

    /// Pipe fds held now, over all workers.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

pub(crate) struct Pools {
    idle_pipes: Vec<PooledPipe>,
    /// Pipes alive, in use or idle.
    pipes_live: usize,
    max_pipes: usize,
    /// The fds of every worker's pipes, within their share of the limit.
    pipe_fds: Arc<PipeFds>,
    max_idle_pipes: usize,
    pipe_size: usize,
    /// Enlarged-pipe bytes this worker may hold, and holds now.
    pipe_budget: usize,
    pipe_bytes: usize,
    idle_buffers: Vec<MappedBuffer>,
    buffer_size: usize,
    /// Copy buffers taken and not given back; the most at once since
    /// `peak_since` (with the window before it).
    buffers_out: usize,
    buffers_peak: usize,
    peak_since: Option<Instant>,
    /// The worker these belong to: it selects the listener counter block
    /// a relay's transfers are counted on.
    pub(crate) worker: usize,
    counters: Block,
    last_log: Option<Instant>,
    unlogged_fallbacks: u64,
    pipe_size_warned: bool,
}

impl Pools {
    pub(crate) fn new(
        config: &Config,
        worker: usize,
        counters: Block,
        pipe_fds: Arc<PipeFds>,
    ) -> Pools {
        Pools {
            idle_pipes: Vec::new(),
            pipes_live: 0,
            max_pipes: config.max_pipes_per_worker,
            pipe_fds,
            max_idle_pipes: config.max_idle_pipes_per_worker,
            pipe_size: config.pipe_size,
            pipe_budget: config.pipe_budget / config.workers.max(1),
            pipe_bytes: 0,
            idle_buffers: Vec::new(),
            buffer_size: config.copy_buffer_size,
            buffers_out: 0,
            buffers_peak: 0,
            peak_since: None,
            worker,
            counters,
            last_log: None,
            unlogged_fallbacks: 0,
            pipe_size_warned: false,
        }
    }

    /// A buffer for a direction using `engine`. When no pipe can be had the
    /// direction switches to copy for good (`engine` is updated). Fails only
    /// when not even a copy buffer can be mapped (out of memory).
    pub(crate) fn take(
        &mut self,
        engine: &mut Engine,
        counters: &CounterBlock,
    ) -> io::Result<Buffer> {
        if *engine == Engine::Splice {
            match self.take_pipe() {
                Ok(pipe) => return Ok(Buffer::Pipe(pipe)),
                Err((reason, why)) => {
                    *engine = Engine::Copy;
                    self.count_fallback(counters, reason, &why);
                }
            }
        }
        let heap = match self.idle_buffers.pop() {
            Some(heap) => heap,
            None => MappedBuffer::new(self.buffer_size)?,
        };
        CounterBlock::add(&self.counters.buffers_in_use, 1);
        self.buffers_out += 1;
        self.buffers_peak = self.buffers_peak.max(self.buffers_out);
        Ok(Buffer::Mapped(heap))
    }

    /// Once a [`PEAK_WINDOW`]: unmaps the empty copy buffers beyond what
    /// the last window's peak needed (and [`MAX_IDLE_BUFFERS`]), so the
    /// memory a burst mapped goes back to the OS within two windows.
    pub(crate) fn trim(&mut self, now: Instant) {
        match self.peak_since {
            Some(since) if now.saturating_duration_since(since) < PEAK_WINDOW => {}
            _ => {
                self.idle_buffers.truncate(self.idle_cap());
                self.buffers_peak = self.buffers_out;
                self.peak_since = Some(now);
            }
        }
    }

    /// When [`trim`](Self::trim) has buffers to unmap: the worker wakes
    /// for it even with nothing else to do, so a burst's memory does not
    /// stay mapped while the worker sleeps.
    pub(crate) fn trim_due(&self) -> Option<Instant> {
        if self.idle_buffers.len() <= MAX_IDLE_BUFFERS {
            return None;
        }
        Some(
            self.peak_since
                .map_or_else(Instant::now, |since| since + PEAK_WINDOW),
        )
    }

    fn idle_cap(&self) -> usize {
        MAX_IDLE_BUFFERS.max(self.buffers_peak)
    }

    /// A pipe another process filled (a live upgrade's), counted as this
    /// worker's from now on, past the caps if need be: its bytes have
    /// nowhere else to wait.
    #[cfg(feature = "service")]
    pub(crate) fn adopt_pipe(&mut self, pipe: Pipe) -> PooledPipe {
        self.pipe_fds.held.fetch_add(2, Ordering::Relaxed);
        let capacity = sys::pipe_size(&pipe).unwrap_or(64 * 1024);
        self.pipes_live += 1;
        self.pipe_bytes += capacity;
        let c = &self.counters;
        CounterBlock::add_tracking_max(&c.pipes_in_use, &c.pipes_in_use_max);
        PooledPipe::new(pipe, capacity)
    }

    /// A copy buffer holding `bytes` (another process's, a live
    /// upgrade's), larger than the configured size if they need it.
    #[cfg(feature = "service")]
    pub(crate) fn mapped_holding(&mut self, bytes: &[u8]) -> io::Result<Buffer> {
        let pooled = (bytes.len() <= self.buffer_size)
            .then(|| self.idle_buffers.pop())
            .flatten();
        let mut heap = match pooled {
            Some(heap) => heap,
            None => MappedBuffer::new(self.buffer_size.max(bytes.len()))?,
        };
        heap.preload(bytes)?;
        CounterBlock::add(&self.counters.buffers_in_use, 1);
        self.buffers_out += 1;
        Ok(Buffer::Mapped(heap))
    }

    /// Takes a buffer back. `empty` must be false when bytes may remain in
    /// it; such a pipe is closed, never pooled. Neither is a pipe pooled
    /// while the pipes' fd share is used up: closed, its fds serve another
    /// worker's directions.
    pub(crate) fn give(&mut self, buffer: Buffer, empty: bool) {
        match buffer {
            Buffer::Pipe(pipe) => {
                CounterBlock::sub(&self.counters.pipes_in_use, 1);
                if empty && self.idle_pipes.len() < self.max_idle_pipes && !self.pipe_fds.full() {
                    self.idle_pipes.push(pipe);
                    CounterBlock::add(&self.counters.pipes_idle, 1);
                } else {
                    self.pipes_live -= 1;
                    self.pipe_bytes -= pipe.capacity();
                    drop(pipe);
                    self.pipe_fds.release();
                }
            }
            Buffer::Mapped(heap) => {
                CounterBlock::sub(&self.counters.buffers_in_use, 1);
                self.buffers_out = self.buffers_out.saturating_sub(1);
                if heap.is_empty() && self.idle_buffers.len() < self.idle_cap() {
                    self.idle_buffers.push(heap);
                }
            }
        }
    }

    /// Counts a direction's fallback to copy on its listener's block
    /// `counters`, and logs it (rate-limited) for the worker.
    pub(crate) fn count_fallback(
        &mut self,
        counters: &CounterBlock,
        reason: FallbackReason,
        why: &str,
    ) {
        CounterBlock::add(&counters.splice_fallbacks, 1);
        counters.fell_back(reason);
        self.unlogged_fallbacks += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                count = self.unlogged_fallbacks,
                reason = why,
                "splice fallback: direction(s) switched to userspace copy"
            );
            self.unlogged_fallbacks = 0;
            self.last_log = Some(now);
        }
    }

    fn take_pipe(&mut self) -> Result<PooledPipe, (FallbackReason, String)> {
        let c = &self.counters;
        if let Some(pipe) = self.idle_pipes.pop() {
            CounterBlock::sub(&c.pipes_idle, 1);
            CounterBlock::add_tracking_max(&c.pipes_in_use, &c.pipes_in_use_max);
            return Ok(pipe);
        }
        if self.pipes_live >= self.max_pipes {
            let why = format!("pipe cap of {} per worker reached", self.max_pipes);
            return Err((FallbackReason::PipeCap, why));
        }
        if !self.pipe_fds.claim() {
            let why = format!(
                "the pipes' share of the fd limit ({} fds) is in use",
                self.pipe_fds.limit
            );
            return Err((FallbackReason::PipeCap, why));
        }
        let pipe = Pipe::new().map_err(|e| {
            self.pipe_fds.release();
            (FallbackReason::NoPipe, format!("pipe2 failed: {e}"))
        })?;
        let capacity = self.size_pipe(&pipe);
        self.pipes_live += 1;
        self.pipe_bytes += capacity;
        let c = &self.counters;
        CounterBlock::add(&c.pipes_created, 1);
        CounterBlock::add_tracking_max(&c.pipes_in_use, &c.pipes_in_use_max);
        Ok(PooledPipe::new(pipe, capacity))
    }

    /// Applies `pipe_size` if the budget allows and reads back what the
    /// kernel granted. EPERM (past `pipe-user-pages-soft`, or above
    /// `pipe-max-size` unprivileged) leaves the default size: slower, still
    /// correct.
    fn size_pipe(&mut self, pipe: &Pipe) -> usize {
        if self.pipe_size > 0 && self.pipe_bytes + self.pipe_size <= self.pipe_budget {
            if let Err(e) = sys::set_pipe_size(pipe, self.pipe_size) {
                if !self.pipe_size_warned {
                    self.pipe_size_warned = true;
                    tracing::warn!(
                        want = self.pipe_size,
                        error = %e,
                        "cannot set pipe size; using the kernel's (see pipe-user-pages-soft and pipe-max-size)"
                    );
                }
            }
        }
        sys::pipe_size(pipe).unwrap_or(64 * 1024)
    }
}

impl Drop for Pools {
    fn drop(&mut self) {
        let idle = self.idle_pipes.len();
        CounterBlock::sub(&self.counters.pipes_idle, idle as u64);
        for _ in self.idle_pipes.drain(..) {
            self.pipe_fds.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn pools(max_pipes: usize, pipe_size: usize, budget: usize) -> (Pools, Block) {
        sharing(
            max_pipes,
            pipe_size,
            budget,
            Arc::new(PipeFds::new(usize::MAX)),
        )
    }

    fn sharing(
        max_pipes: usize,
        pipe_size: usize,
        budget: usize,
        pipe_fds: Arc<PipeFds>,
    ) -> (Pools, Block) {
        let mut config = Config::single(
            "127.0.0.1:1".parse().unwrap(),
            vec![],
            crate::config::Mode::Splice,
        );
        config.workers = 1;
        config.max_pipes_per_worker = max_pipes;
        config.pipe_size = pipe_size;
        config.pipe_budget = budget;
        let counters = crate::shm::detached_block();
        (Pools::new(&config, 0, counters.clone(), pipe_fds), counters)
    }

    fn capacity(b: &Buffer) -> usize {
        match b {
            Buffer::Pipe(p) => p.capacity(),
            Buffer::Mapped(_) => panic!("expected a pipe"),
        }
    }

    #[test]
    fn pipes_are_reused_and_counted() {
        let (mut p, c) = pools(8, 0, 0);
        let mut mode = Engine::Splice;
        let a = p.take(&mut mode, &c).unwrap();
        assert!(matches!(a, Buffer::Pipe(_)));
        assert_eq!(c.pipes_in_use.load(Relaxed), 1);
        p.give(a, true);
        assert_eq!(
            (c.pipes_in_use.load(Relaxed), c.pipes_idle.load(Relaxed)),
            (0, 1)
        );
        let b = p.take(&mut mode, &c).unwrap();
        assert_eq!(
            c.pipes_created.load(Relaxed),
            1,
            "the pooled pipe was reused"
        );
        p.give(b, true);
    }

    /// A burst keeps as many copy buffers mapped as it had out at once,
    /// for the window after it, and the worker wakes to unmap them.
    #[test]
    fn a_bursts_copy_buffers_stay_pooled_for_a_window_then_go() {
        let (mut p, c) = pools(8, 0, 0);
        let burst = MAX_IDLE_BUFFERS + 44;
        let t0 = Instant::now();
        p.trim(t0);
        let taken: Vec<_> = (0..burst)
            .map(|_| p.take(&mut Engine::Copy, &c).unwrap())
            .collect();
        for b in taken {
            p.give(b, true);
        }
        assert_eq!(
            p.idle_buffers.len(),
            burst,
            "all pooled: the peak needed them"
        );
        assert_eq!(p.trim_due(), Some(t0 + PEAK_WINDOW));
        p.trim(t0 + PEAK_WINDOW / 2);
        assert_eq!(p.idle_buffers.len(), burst, "within the window");
        // The window that saw the burst ends: kept for one more.
        p.trim(t0 + PEAK_WINDOW);
        assert_eq!(p.idle_buffers.len(), burst);
        assert_eq!(p.trim_due(), Some(t0 + 2 * PEAK_WINDOW));
        // A window with none out: back to the fixed cap, nothing more due.
        p.trim(t0 + 2 * PEAK_WINDOW);
        assert_eq!(p.idle_buffers.len(), MAX_IDLE_BUFFERS);
        assert_eq!(p.trim_due(), None);
        // Buffers taken again come from the pool, not new mappings.
        let again = p.take(&mut Engine::Copy, &c).unwrap();
        assert_eq!(p.idle_buffers.len(), MAX_IDLE_BUFFERS - 1);
        p.give(again, true);
    }

    #[test]
    fn a_pipe_holding_bytes_is_never_pooled() {
        let (mut p, c) = pools(8, 0, 0);
        let mut mode = Engine::Splice;
        let a = p.take(&mut mode, &c).unwrap();
        p.give(a, false);
        assert_eq!(c.pipes_idle.load(Relaxed), 0);
        assert_eq!(p.pipes_live, 0);
    }

    #[test]
    fn past_the_cap_a_direction_falls_back_to_copy() {
        let (mut p, c) = pools(1, 0, 0);
        let mut first = Engine::Splice;
        let a = p.take(&mut first, &c).unwrap();
        let mut second = Engine::Splice;
        let b = p.take(&mut second, &c).unwrap();
        assert!(matches!(b, Buffer::Mapped(_)));
        assert_eq!(second, Engine::Copy);
        assert_eq!(c.splice_fallbacks.load(Relaxed), 1);
        assert_eq!(c.buffers_in_use.load(Relaxed), 1);
        p.give(a, true);
        p.give(b, true);
        assert_eq!(c.buffers_in_use.load(Relaxed), 0);
    }

    #[test]
    fn past_the_budget_pipes_keep_the_default_size() {
        let (mut p, c) = pools(8, 256 * 1024, 512 * 1024);
        let mut mode = Engine::Splice;
        let taken: Vec<Buffer> = (0..3).map(|_| p.take(&mut mode, &c).unwrap()).collect();
        assert_eq!(capacity(&taken[0]), 256 * 1024);
        assert_eq!(capacity(&taken[1]), 256 * 1024);
        assert!(
            capacity(&taken[2]) < 256 * 1024,
            "budget spent: default size"
        );
        for b in taken {
            p.give(b, false);
        }
        assert_eq!(p.pipe_bytes, 0);
    }

    #[test]
    fn pipes_of_all_workers_stay_within_their_fd_share() {
        // Room for three pipes, shared by two workers.
        let fds = Arc::new(PipeFds::new(6));
        let (mut a, ca) = sharing(8, 0, 0, Arc::clone(&fds));
        let (mut b, cb) = sharing(8, 0, 0, Arc::clone(&fds));
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut mode = Engine::Splice;
            held.push(a.take(&mut mode, &ca).unwrap());
            assert_eq!(mode, Engine::Splice);
        }
        let mut mode = Engine::Splice;
        let third = b.take(&mut mode, &cb).unwrap();
        assert!(matches!(third, Buffer::Pipe(_)));
        assert_eq!(fds.held(), 6);
        // The share is used up: the next direction copies, counted.
        let mut over = Engine::Splice;
        let copied = b.take(&mut over, &cb).unwrap();
        assert!(matches!(copied, Buffer::Mapped(_)));
        assert_eq!(over, Engine::Copy);
        assert_eq!(
            crate::stats::Stats::sum([&*cb]).fallbacks(FallbackReason::PipeCap),
            1
        );
        b.give(copied, true);
        // With the share used up an empty pipe is closed, not pooled, so
        // another worker can have its fds.
        b.give(third, true);
        assert_eq!(cb.pipes_idle.load(Relaxed), 0);
        assert_eq!(fds.held(), 4);
        let mut mode = Engine::Splice;
        held.push(a.take(&mut mode, &ca).unwrap());
        assert_eq!(
            mode,
            Engine::Splice,
            "the freed fds went to the other worker"
        );
        // Pooled pipes hold fds too, until their pool is dropped.
        let last = held.pop().unwrap();
        a.give(last, true);
        assert_eq!(ca.pipes_idle.load(Relaxed), 0, "full again: closed");
        let one = held.pop().unwrap();
        a.give(one, true);
        assert_eq!(ca.pipes_idle.load(Relaxed), 1, "room again: pooled");
        assert_eq!(fds.held(), 4);
        for h in held {
            a.give(h, false);
        }
        drop(a);
        assert_eq!(fds.held(), 0);
    }
}
