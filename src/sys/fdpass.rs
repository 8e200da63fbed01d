//! Passing file descriptors between processes: a `SOCK_SEQPACKET` Unix
//! socket pair, messages carrying up to [`SCM_MAX_FD`] descriptors each as
//! `SCM_RIGHTS`, a monotonic clock both processes share, and anonymous
//! memory files for bytes that travel beside the descriptors.
//!
//! The receiver sizes its control buffer for [`SCM_MAX_FD`] descriptors, so
//! the kernel never has to drop any (it closes the ones that do not fit and
//! sets `MSG_CTRUNC`); a message that still comes truncated is an error.
//! A sequenced-packet socket keeps message boundaries, so one `recvmsg`
//! returns exactly one message and the descriptors sent with it.

use std::ffi::CStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// The most descriptors Linux passes in one message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// A connected pair of `SOCK_SEQPACKET` Unix sockets, close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Lets `fd` survive `execve` (clears `FD_CLOEXEC`), for the one
/// descriptor a child process is meant to inherit.
pub fn inherit_on_exec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// Takes ownership of descriptor `fd`, inherited from the parent process
/// and named in the environment. Refuses a descriptor that is not open,
/// or not a Unix sequenced-packet socket, so a stray number cannot make
/// this process close (or talk to) something it does not own.
pub fn adopt_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::socket::{getsockopt, sockopt};
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is a standard stream"),
        ));
    }
    fcntl(fd, FcntlArg::F_GETFD)?;
    // SAFETY: the descriptor is open (F_GETFD succeeded); the parent made
    // it for this process alone and named it once in the environment,
    // and the caller adopts it once (it removes the variable).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let kind = getsockopt(&owned, sockopt::SockType).map_err(io::Error::from)?;
    if kind != SockType::SeqPacket {
        // Not ours to keep: leave it open, as it was.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(owned);
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a sequenced-packet socket"),
        ));
    }
    fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(owned)
}

/// Sends one message with `fds` (at most [`SCM_MAX_FD`]) attached. The
/// kernel duplicates each descriptor into the receiver when it reads the
/// message; the sender's copies stay open.
pub fn send_with_fds(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message (at most {SCM_MAX_FD})",
                fds.len()
            ),
        ));
    }
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "sent {n} of a {}-byte message",
                    bytes.len()
                )))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message into `buf` and the descriptors sent with it
/// (owned, close-on-exec). `Ok(None)` when the peer closed its end.
/// A message longer than `buf`, or whose descriptors did not all arrive,
/// is an error.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other(
            "descriptors were dropped by the kernel (MSG_CTRUNC)",
        ));
    }
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process
                // for this message; nothing else knows of it yet.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::other(format!(
            "a message longer than the {}-byte buffer",
            buf.len()
        )));
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((msg.bytes, fds)))
}

/// Makes every later receive on `socket` fail with `WouldBlock` after
/// `timeout` without a message.
pub fn set_recv_timeout(socket: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::{TimeVal, TimeValLike};
    let tv = TimeVal::microseconds(timeout.as_micros().min(i64::MAX as u128) as i64);
    setsockopt(&socket, sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
}

/// An anonymous memory file holding `bytes`, read back with [`read_memfd`].
pub fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    const NAME: &CStr = c"spliced-buffer";
    let fd = memfd_create(NAME, MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, bytes)?;
    Ok(file.into())
}

/// The first `len` bytes of a memory file made by [`memfd_with`].
pub fn read_memfd(fd: OwnedFd, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd);
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the
/// host, so two processes can measure an interval together.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_and_pipe_contents_cross_a_socket_pair() {
        let (a, b) = seqpacket_pair().unwrap();
        let pipe = super::super::Pipe::new().unwrap();
        nix::unistd::write(pipe.write_end(), b"in flight").unwrap();
        let fds: Vec<RawFd> = (0..SCM_MAX_FD)
            .map(|_| pipe.read_end().as_raw_fd())
            .collect();
        send_with_fds(a.as_fd(), b"hello", &fds).unwrap();
        let mut buf = [0u8; 64];
        let (n, got) = recv_with_fds(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(got.len(), SCM_MAX_FD);
        drop(pipe);
        let mut reader = std::fs::File::from(got.into_iter().next().unwrap());
        let mut text = [0u8; 9];
        reader.read_exact(&mut text).unwrap();
        assert_eq!(&text, b"in flight");
        assert!(send_with_fds(a.as_fd(), b"x", &vec![0; SCM_MAX_FD + 1]).is_err());
        drop(a);
        assert!(recv_with_fds(b.as_fd(), &mut buf).unwrap().is_none());
    }

    #[test]
    fn a_memfd_gives_its_bytes_back() {
        let fd = memfd_with(b"payload").unwrap();
        assert_eq!(read_memfd(fd, 7).unwrap(), b"payload");
        let mut f = std::fs::File::from(memfd_with(b"").unwrap());
        f.write_all(b"").unwrap();
    }
}
