//! Fake upstreams.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// A 127.0.0.1 listener with a large backlog (std uses a small one).
pub fn bind_listener() -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(4096).unwrap();
    s.into()
}

/// A loopback address with nothing listening (bound once, then released).
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A scripted upstream: accepts connections and runs `handler` on each in its
/// own thread. Dropping it stops accepting (live handlers run on).
pub struct Server {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

pub fn serve<F>(handler: F) -> Server
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = bind_listener();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(handler);
    let thread = {
        let accepted = Arc::clone(&accepted);
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("upstream-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let h = Arc::clone(&handler);
                    thread::Builder::new()
                        .name("upstream-conn".into())
                        .stack_size(256 * 1024)
                        .spawn(move || h(conn))
                        .expect("spawn upstream handler");
                }
            })
            .unwrap()
    };
    Server {
        addr,
        accepted,
        stop,
        thread: Some(thread),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes every byte; on EOF, half-closes its side after the last byte.
pub fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

pub fn echo_server() -> Server {
    serve(echo)
}

/// Reads and discards until EOF or error.
pub fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
    }
}

/// A listener whose accept queue is full, so further SYNs are dropped and a
/// connect to it hangs. Returns the listener and the connection filling it.
pub fn black_hole() -> (TcpListener, TcpStream, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&any.into()).unwrap();
    s.listen(0).unwrap();
    let l: TcpListener = s.into();
    let addr = l.local_addr().unwrap();
    let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    // Precondition: one more connect really hangs.
    let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(
        probe.is_err(),
        "test precondition: a full accept queue should make connects hang"
    );
    (l, filler, addr)
}
