//! The OS boundary: the only module allowed to use `unsafe`.
//!
//! What this module provides, and every caller may rely on:
//! - [`Pipe`]: an owned `pipe2(O_NONBLOCK|O_CLOEXEC)` pair with its capacity.
//! - [`splice`]: one non-blocking splice(2) call, never with `SPLICE_F_MORE`
//!   (it delays the final segment by up to ~200 ms on TCP).
//! - [`set_pipe_size`]/[`pipe_size`]: fcntl(2) `F_SETPIPE_SZ`/`F_GETPIPE_SZ`.
//! - [`at_urgent_mark`]: ioctl(2) `SIOCATMARK`, where splice stalls.
//! - process helpers: raise RLIMIT_NOFILE, thread ids, per-thread CPU time.
//! - [`netns::enter`]: setns(2) into a network namespace (the bench's veth paths).
//! - [`shared`]: a mapping as atomic words, and counter blocks placed in it
//!   (the stats file the workers write directly).
//! - [`activation::take_inherited`]: the listening sockets a service manager
//!   passed (`LISTEN_FDS`), owned.
//! - [`uring::Ring`]: a batch of socket recv/send calls submitted and
//!   answered in one io_uring_enter(2), each call `MSG_DONTWAIT`.
//! - [`access::readable_as`]: whether another user can read a file, asked of
//!   the kernel in a forked child with that user's ids.
//!
//! Every libc call goes through [`syscall!`], which turns `-1` into
//! `io::Error::last_os_error()`, so nothing outside sees a raw return code.
#![allow(unsafe_code)]

#[cfg(feature = "service")]
pub mod activation;
#[cfg(feature = "service")]
pub mod fdpass;
#[cfg(feature = "cli")]
pub mod netns;
pub(crate) mod shared;
pub mod uring;

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Calls a libc function and maps `-1` to the thread's last OS error.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each call site documents why its arguments are valid.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

pub mod access;

/// A kernel pipe used as a splice buffer. Both ends are non-blocking and
/// close-on-exec; dropping it closes both fds.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// pipe2(2) with `O_NONBLOCK | O_CLOEXEC`.
    ///
    /// See <https://man7.org/linux/man-pages/man2/pipe.2.html>.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [-1 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires.
        syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))?;
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// A pipe made of two ends passed from another process (a live
    /// upgrade's), read end first.
    #[cfg(feature = "service")]
    pub fn from_ends(read: OwnedFd, write: OwnedFd) -> Pipe {
        Pipe { read, write }
    }

    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: one clock for every process of
/// the host (`Instant` reads it too, but does not show its value), so two
/// processes can tell how long passed between their readings.
#[cfg(feature = "service")]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on
    // every Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Sets a pipe's capacity with `fcntl(F_SETPIPE_SZ)` and returns what the
/// kernel granted (it rounds up to a power-of-two number of pages).
///
/// Fails with `EPERM` for an unprivileged user past `pipe-user-pages-soft` or
/// above `pipe-max-size`, and with `EBUSY` if the pipe holds more bytes than
/// the new size. See <https://man7.org/linux/man-pages/man2/fcntl.2.html>.
pub fn set_pipe_size(pipe: &Pipe, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live pipe end borrowed from `pipe`; F_SETPIPE_SZ takes an int.
    let got = syscall!(fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, want))?;
    Ok(got as usize)
}

/// A pipe's capacity, `fcntl(F_GETPIPE_SZ)`.
pub fn pipe_size(pipe: &Pipe) -> io::Result<usize> {
    // SAFETY: the fd is a live pipe end borrowed from `pipe`; F_GETPIPE_SZ takes no argument.
    let got = syscall!(fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ))?;
    Ok(got as usize)
}

/// One splice(2) call from `from` to `to` of at most `len` bytes, with
/// `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`. One of the two fds must be a pipe.
/// Returns the bytes moved; `Ok(0)` from a socket source means EOF.
///
/// See <https://man7.org/linux/man-pages/man2/splice.2.html>.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both fds are borrowed, so open for the call; null offsets are
    // allowed (and required) for sockets and pipes.
    let n = syscall!(splice(
        from.as_raw_fd(),
        std::ptr::null_mut(),
        to.as_raw_fd(),
        std::ptr::null_mut(),
        len,
        flags,
    ))?;
    Ok(n as usize)
}

/// Whether a TCP socket's read position sits at its urgent mark
/// (`ioctl(SIOCATMARK)`, what sockatmark(3) does).
///
/// splice(2) from a TCP socket stops at the urgent mark and reports EAGAIN
/// (or 0 once the peer's FIN arrived) without moving past it; only recv(2)
/// steps over the mark. See <https://man7.org/linux/man-pages/man3/sockatmark.3.html>.
pub fn at_urgent_mark(socket: BorrowedFd<'_>) -> io::Result<bool> {
    // From <asm-generic/sockios.h>; the libc crate does not export it for Linux.
    const SIOCATMARK: libc::c_ulong = 0x8905;
    let mut at_mark: libc::c_int = 0;
    // SAFETY: the fd is borrowed, so open; SIOCATMARK writes one int to the
    // pointer, which points at a live, writable c_int.
    syscall!(ioctl(
        socket.as_raw_fd(),
        SIOCATMARK as _,
        &mut at_mark as *mut libc::c_int
    ))?;
    Ok(at_mark != 0)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and returns the new
/// soft limit. A failure leaves the limit as it was: that is not fatal.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// The calling thread's kernel id.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// CPU time a thread of this process has used, from
/// `/proc/self/task/TID/schedstat` (nanosecond resolution). Zero if the thread
/// is gone or `tid` is 0.
pub fn thread_cpu_time(tid: i32) -> Duration {
    if tid == 0 {
        return Duration::ZERO;
    }
    fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn pipe_is_nonblocking_and_sized() {
        let p = Pipe::new().unwrap();
        let base = pipe_size(&p).unwrap();
        assert!(base >= 4096);
        let got = set_pipe_size(&p, 256 * 1024).unwrap();
        assert!(got >= 256 * 1024);
        assert_eq!(pipe_size(&p).unwrap(), got);
        let mut buf = [0u8; 1];
        let err = nix::unistd::read(p.read_end().as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(err, nix::errno::Errno::EAGAIN);
    }

    #[test]
    fn splice_moves_bytes_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let p = Pipe::new().unwrap();
        let err = splice(b.as_fd(), p.write_end(), 1 << 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        a.write_all(b"hello").unwrap();
        let mut moved = 0;
        while moved == 0 {
            match splice(b.as_fd(), p.write_end(), 1 << 16) {
                Ok(n) => moved = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(moved, 5);
        assert_eq!(splice(p.read_end(), c.as_fd(), moved).unwrap(), 5);
        let mut got = [0u8; 5];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(a);
        // The peer's FIN reads as a zero-byte splice.
        loop {
            match splice(b.as_fd(), p.write_end(), 1 << 16) {
                Ok(n) => {
                    assert_eq!(n, 0);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn thread_cpu_time_reads_this_thread() {
        let tid = gettid();
        let start = thread_cpu_time(tid);
        // schedstat advances at scheduler ticks, so spin across several.
        let spin_until = std::time::Instant::now() + Duration::from_millis(60);
        let mut x = 0u64;
        while std::time::Instant::now() < spin_until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(thread_cpu_time(tid) > start);
        assert_eq!(thread_cpu_time(0), Duration::ZERO);
    }
}
