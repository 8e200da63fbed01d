//! Passing descriptors between two processes over a Unix socket pair
//! (`SCM_RIGHTS`): the channel a live upgrade hands its listening sockets
//! over. Messages are `SOCK_SEQPACKET`, so each send is one message with
//! its descriptors, and a receiver sees whole messages or none.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// The kernel's limit on descriptors in one message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// The largest message either side sends (addresses of one batch, a
/// reason line).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A socket pair for the handover: the first end stays in this process
/// (close-on-exec), the second is inherited by the process spawned next
/// (close-on-exec cleared), which finds it by number.
pub fn channel_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    set_cloexec(theirs.as_fd(), false)?;
    Ok((ours, theirs))
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Limits how long a send or a receive waits; `None` waits for ever.
pub fn set_timeouts(fd: BorrowedFd<'_>, limit: Option<Duration>) -> io::Result<()> {
    let d = limit.unwrap_or(Duration::ZERO);
    let tv = nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    Ok(())
}

/// Sends one message carrying `fds` (at most [`MAX_FDS_PER_MESSAGE`]).
pub fn send(channel: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message, the kernel takes at most {MAX_FDS_PER_MESSAGE}",
                fds.len()
            ),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match sendmsg::<()>(
            channel.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("sent {n} of a {}-byte message", bytes.len()),
                ))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One received message: its bytes, and the descriptors it carried, owned
/// (close-on-exec). An empty message with no descriptor is the peer's end.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Receives one message with up to [`MAX_FDS_PER_MESSAGE`] descriptors.
/// The control buffer holds that many, and a truncated one (`MSG_CTRUNC`:
/// the kernel closed descriptors that did not fit, e.g. past
/// RLIMIT_NOFILE) is an error, never a silent loss.
pub fn receive(channel: BorrowedFd<'_>) -> io::Result<Received> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    loop {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS gave this process a new
                    // descriptor for each entry; nothing else refers to it,
                    // so it is owned here, once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC);
        let len = msg.bytes;
        if truncated {
            return Err(io::Error::other(format!(
                "a handover message was truncated ({} descriptors arrived): the descriptor limit is too low or the message too long",
                fds.len()
            )));
        }
        buf.truncate(len);
        return Ok(Received { bytes: buf, fds });
    }
}

/// The channel end a spawning process left at descriptor `fd`, owned
/// (close-on-exec set again). Checked to be a Unix socket.
pub fn adopt_channel(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a handover channel"),
        ));
    }
    let stat = nix::sys::stat::fstat(fd)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    // SAFETY: the spawning process left this descriptor open for this
    // process alone and named it in the environment, which the caller
    // reads once (and removes), so it is owned here once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd(), true)?;
    Ok(owned)
}

/// A memory file holding `bytes`, to pass with a message too
/// large to carry them (a copy buffer's contents).
pub fn memfd_holding(bytes: &[u8]) -> io::Result<OwnedFd> {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create(
        c"spliced-upgrade",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(OwnedFd::from(file))
}

/// The first `len` bytes of a memory file [`memfd_holding`] made.
pub fn memfd_bytes(fd: OwnedFd, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd);
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_in_batches_and_the_end_is_seen() {
        let (a, b) = channel_pair().unwrap();
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.as_fd()).collect();
        send(a.as_fd(), b"three", &fds).unwrap();
        let got = receive(b.as_fd()).unwrap();
        assert_eq!(got.bytes, b"three");
        assert_eq!(got.fds.len(), 3);
        for (fd, l) in got.fds.into_iter().zip(&listeners) {
            let passed = std::net::TcpListener::from(fd);
            assert_eq!(passed.local_addr().unwrap(), l.local_addr().unwrap());
        }
        let too_many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS_PER_MESSAGE).map(|_| a.as_fd()).collect();
        assert!(send(a.as_fd(), b"x", &too_many).is_err());
        drop(a);
        let end = receive(b.as_fd()).unwrap();
        assert!(end.bytes.is_empty() && end.fds.is_empty());
    }
}
