//! Two in-process front ends that accept, connect to the upstream and then
//! relay, so embedding spliced can be compared with what an async program
//! does today:
//!
//! - `handoff`: a blocking accept thread connects each client's upstream
//!   and hands the pair to a spliced [`Runtime`](crate::Runtime).
//! - `tokio`: one current-thread tokio runtime accepts, connects and runs
//!   `tokio::io::copy_bidirectional` per pair, the usual async proxy.
//!
//! Both run their threads under the `spliced-w` prefix, so `--pin-proxy`
//! pins them like the proxy's workers, and their CPU time is what they
//! cost: accept and connect included.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Mode, Runtime, Stats};

/// A running front end.
pub struct Front {
    pub addr: SocketAddr,
    /// Threads of this front end beyond a runtime's workers.
    tids: Vec<Arc<AtomicI32>>,
    runtime: Option<Arc<Runtime>>,
    stop: Arc<AtomicBool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

/// Threads one front end adds to `--workers` worker threads.
pub const EXTRA_THREADS: usize = 1;

impl Front {
    /// A blocking acceptor handing pairs to a spliced runtime.
    pub fn handoff(
        mode: Mode,
        workers: usize,
        listen: IpAddr,
        upstream: SocketAddr,
    ) -> io::Result<Front> {
        let runtime = Arc::new(
            Runtime::builder()
                .workers(workers)
                .mode(mode)
                .start()
                .map_err(|e| io::Error::other(e.to_string()))?,
        );
        let listener = TcpListener::bind((listen, 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let (stop_flag, tid_slot) = (Arc::clone(&stop), Arc::clone(&tid));
        let pairs = Arc::clone(&runtime);
        let thread = std::thread::Builder::new()
            .name("spliced-w-accept".into())
            .spawn(move || {
                tid_slot.store(crate::os::gettid(), Ordering::Relaxed);
                for client in listener.incoming() {
                    if stop_flag.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    // A refused pair (shutting down) is dropped: closed.
                    let _ = pairs.handoff(client, server);
                }
            })?;
        Ok(Front {
            addr,
            tids: vec![tid],
            runtime: Some(runtime),
            stop,
            shutdown: None,
            threads: vec![thread],
        })
    }

    /// A tokio current-thread runtime running `copy_bidirectional` per pair.
    pub fn tokio(listen: IpAddr, upstream: SocketAddr) -> io::Result<Front> {
        let listener = TcpListener::bind((listen, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tid = Arc::new(AtomicI32::new(0));
        let tid_slot = Arc::clone(&tid);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spliced-w-tokio".into())
            .spawn(move || {
                tid_slot.store(crate::os::gettid(), Ordering::Relaxed);
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let accept = async {
                        loop {
                            let Ok((mut client, _)) = listener.accept().await else {
                                continue;
                            };
                            tokio::spawn(async move {
                                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await
                                else {
                                    return;
                                };
                                let _ = client.set_nodelay(true);
                                let _ = server.set_nodelay(true);
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = rx => {}
                    }
                });
                // Dropping the runtime cancels every pair's task.
            })?;
        Ok(Front {
            addr,
            tids: vec![tid],
            runtime: None,
            stop: Arc::new(AtomicBool::new(false)),
            shutdown: Some(tx),
            threads: vec![thread],
        })
    }

    /// CPU time of every thread of this front end so far.
    pub fn cpu(&self) -> Duration {
        let own: Duration = self
            .tids
            .iter()
            .map(|t| crate::os::thread_cpu_time(t.load(Ordering::Relaxed)))
            .sum();
        own + self
            .runtime
            .as_ref()
            .map_or(Duration::ZERO, |r| r.worker_cpu_time())
    }

    /// Every thread of this front end, its runtime's workers included.
    pub fn tids(&self) -> Vec<i32> {
        let mut tids: Vec<i32> = self
            .tids
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect();
        if let Some(rt) = &self.runtime {
            tids.extend(rt.worker_tids());
        }
        tids
    }

    pub fn stats(&self) -> Option<Stats> {
        self.runtime.as_ref().map(|r| r.stats())
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        } else {
            // Wake the blocking accept so it sees the flag.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The accept thread has let go of its share.
        if let Some(rt) = self.runtime.take().and_then(Arc::into_inner) {
            rt.abort();
            rt.join();
        }
    }
}
