//! Starting and controlling a running proxy: the library's front door.
//!
//! [`start`] binds every listener once per worker (SO_REUSEPORT, so the kernel
//! spreads accepts), spawns the workers and returns a [`ProxyHandle`]. Binding
//! happens on the caller's thread, so "address in use" is reported before any
//! worker runs. `spliced run` is this plus signal handling.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::Config;
use crate::error::StartError;
use crate::stats::{Stats, WorkerCounters};
use crate::worker::{self, Worker};

/// Shared between the handle and every worker.
#[derive(Debug, Default)]
pub(crate) struct Control {
    /// Stop accepting and let relays drain (first SIGTERM).
    pub(crate) draining: AtomicBool,
    /// Close every relay now and exit the loop.
    pub(crate) aborting: AtomicBool,
    /// Relays alive in all workers, checked against the relay cap.
    pub(crate) relays_live: AtomicUsize,
}

struct WorkerHandle {
    thread: Option<JoinHandle<()>>,
    waker: Arc<mio::Waker>,
    counters: Arc<WorkerCounters>,
    tid: Arc<AtomicI32>,
}

/// Asks a running proxy to stop, from any thread (a signal handler's, say).
#[derive(Clone)]
pub struct Controller {
    control: Arc<Control>,
    wakers: Vec<Arc<mio::Waker>>,
}

impl Controller {
    /// Stops accepting; live relays finish within the drain timeout.
    pub fn shutdown(&self) {
        self.control.draining.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Closes every relay now.
    pub fn abort(&self) {
        self.control.aborting.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        for waker in &self.wakers {
            // A failed wake means the worker already exited: nothing to tell it.
            let _ = waker.wake();
        }
    }
}

/// A running proxy. Dropping it aborts every relay and joins the workers.
pub struct ProxyHandle {
    local_addrs: Vec<SocketAddr>,
    workers: Vec<WorkerHandle>,
    control: Arc<Control>,
}

/// Binds the listeners and starts the workers.
pub fn start(config: Config) -> Result<ProxyHandle, StartError> {
    config.validate().map_err(StartError::Config)?;
    let nofile = crate::sys::raise_nofile_limit();
    let relay_cap = relay_cap(&config, nofile);
    let config = Arc::new(config);
    let control = Arc::new(Control::default());
    let bound = worker::bind_listeners(&config)?;
    let local_addrs: Vec<SocketAddr> = bound.local_addrs.iter().map(|(_, a)| *a).collect();
    let mut workers = Vec::with_capacity(config.workers);
    for (index, listeners) in bound.per_worker.into_iter().enumerate() {
        let counters = Arc::new(WorkerCounters::default());
        let tid = Arc::new(AtomicI32::new(0));
        let w = Worker::new(
            index,
            Arc::clone(&config),
            listeners,
            Arc::clone(&control),
            Arc::clone(&counters),
            relay_cap,
        )
        .map_err(|e| StartError::Io("create the event loop".into(), e))?;
        let waker = w.waker();
        let tid_slot = Arc::clone(&tid);
        let thread = std::thread::Builder::new()
            .name(format!("spliced-w{index}"))
            .spawn(move || {
                tid_slot.store(crate::sys::gettid(), Ordering::Relaxed);
                w.run();
            })
            .map_err(|e| StartError::Io("spawn a worker thread".into(), e))?;
        workers.push(WorkerHandle {
            thread: Some(thread),
            waker,
            counters,
            tid,
        });
    }
    for (index, addr) in &bound.local_addrs {
        let listener = &config.listeners[*index];
        tracing::info!(
            upstreams = ?listener.upstreams,
            mode = %listener.mode,
            workers = config.workers,
            pipe_size = config.pipe_size,
            "listening on {addr}"
        );
    }
    Ok(ProxyHandle {
        local_addrs,
        workers,
        control,
    })
}

/// The relay cap for the whole process: `max_relays` if set, else what the
/// fd limit allows at two sockets per relay, after a reserve (an eighth of
/// the limit, 16 to 256 fds, plus a few per worker) for the event loops,
/// listeners and pipes. Pipes past the reserve fall back to copy. The cap is
/// shared, not split per worker, because SO_REUSEPORT does not spread
/// connections evenly: a per-worker share would strand clients on a full
/// worker while another has room.
fn relay_cap(config: &Config, nofile: u64) -> usize {
    let reserve = (nofile / 8).clamp(16, 256) + 4 * config.workers as u64;
    let by_fds = (nofile.saturating_sub(reserve) / 2) as usize;
    config.max_relays.map_or(by_fds, |m| m.min(by_fds)).max(1)
}

impl ProxyHandle {
    /// The address the first listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every bound address, in config order (a listener may have several).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Counters summed over all workers.
    pub fn stats(&self) -> Stats {
        Stats::sum(self.workers.iter().map(|w| &*w.counters))
    }

    /// CPU time (user + system) the worker threads have used so far.
    pub fn worker_cpu_time(&self) -> Duration {
        self.workers
            .iter()
            .map(|w| crate::sys::thread_cpu_time(w.tid.load(Ordering::Relaxed)))
            .sum()
    }

    /// A cloneable handle that can stop this proxy from another thread.
    pub fn controller(&self) -> Controller {
        Controller {
            control: Arc::clone(&self.control),
            wakers: self.workers.iter().map(|w| Arc::clone(&w.waker)).collect(),
        }
    }

    /// Stops accepting; live relays finish within the drain timeout.
    pub fn shutdown(&self) {
        self.controller().shutdown();
    }

    /// Closes every relay now.
    pub fn abort(&self) {
        self.controller().abort();
    }

    /// True once every worker has exited (all relays closed).
    pub fn is_finished(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Waits for every worker to exit (after [`shutdown`](Self::shutdown) or
    /// [`abort`](Self::abort)).
    pub fn join(mut self) {
        self.join_workers();
    }

    fn join_workers(&mut self) {
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                // A panicking worker already printed its message; the others go on.
                let _ = t.join();
            }
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            self.abort();
            self.join_workers();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    #[test]
    fn relay_cap_leaves_room_for_the_loop_and_pipes() {
        let mut c = Config::single("127.0.0.1:0".parse().unwrap(), vec![], Mode::Splice);
        c.workers = 1;
        assert_eq!(relay_cap(&c, 64), 22);
        assert_eq!(relay_cap(&c, 20_000), 9_870);
        c.workers = 2;
        assert_eq!(relay_cap(&c, 20_000), 9_868);
        c.max_relays = Some(100);
        assert_eq!(relay_cap(&c, 20_000), 100);
        assert_eq!(relay_cap(&c, 0), 1, "never zero");
    }
}
