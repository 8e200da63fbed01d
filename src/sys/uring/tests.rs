//! The ring against real sockets: batches, armed receives, the wait.

use super::recv_buffers::RECV_BUFFERS;
use super::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

fn ring() -> Option<Ring> {
    match Ring::new() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("io_uring unavailable here ({e}): nothing to test");
            None
        }
    }
}

#[test]
fn a_batch_reads_and_writes_many_sockets_in_one_call() {
    let Some(mut ring) = ring() else { return };
    let pairs: Vec<_> = (0..300).map(|_| UnixStream::pair().unwrap()).collect();
    for (i, (a, _)) in pairs.iter().enumerate() {
        a.set_nonblocking(true).unwrap();
        (&*a).write_all(format!("m{i}").as_bytes()).unwrap();
    }
    // Reads on the far ends: every one has its message; the last pair
    // gets no message and answers EAGAIN, as a non-blocking read does.
    let ops = pairs
        .iter()
        .map(|(_, b)| IoOp {
            fd: b.as_raw_fd(),
            kind: IoKind::Recv,
            buf: vec![0u8; 16],
            range: 0..16,
            result: 0,
        })
        .collect();
    let ops = ring.run(ops).unwrap();
    for (i, op) in ops.iter().enumerate() {
        let want = format!("m{i}");
        assert_eq!(op.result, want.len() as i32, "op {i}");
        assert_eq!(&op.buf[..want.len()], want.as_bytes());
    }
    let again = vec![IoOp {
        fd: pairs[0].1.as_raw_fd(),
        kind: IoKind::Recv,
        buf: vec![0u8; 4],
        range: 0..4,
        result: 0,
    }];
    pairs[0].1.set_nonblocking(true).unwrap();
    let again = ring.run(again).unwrap();
    assert_eq!(again[0].result, -libc::EAGAIN);
    // Writes of a part of each buffer.
    let ops = pairs
        .iter()
        .map(|(a, _)| IoOp {
            fd: a.as_raw_fd(),
            kind: IoKind::Send,
            buf: b"xxhello".to_vec(),
            range: 2..7,
            result: 0,
        })
        .collect();
    let ops = ring.run(ops).unwrap();
    assert!(ops.iter().all(|op| op.result == 5));
    let (_, b) = &pairs[7];
    b.set_nonblocking(false).unwrap();
    let mut got = [0u8; 5];
    (&*b).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
}

fn op(fd: RawFd, kind: IoKind, buf: Vec<u8>, range: Range<usize>) -> IoOp<Vec<u8>> {
    IoOp {
        fd,
        kind,
        buf,
        range,
        result: 0,
    }
}

/// Each answer as one call of a batch and as a single plain call.
fn both_ways(ring: &mut Ring, make: impl Fn() -> IoOp<Vec<u8>>) -> [IoOp<Vec<u8>>; 2] {
    let mut batch = ring.run(vec![make(), make()]).unwrap();
    let single = ring.run(vec![make()]).unwrap().remove(0);
    [batch.remove(0), single]
}

#[test]
fn a_range_outside_the_buffer_is_refused_not_submitted() {
    let Some(mut ring) = ring() else { return };
    let (a, _b) = UnixStream::pair().unwrap();
    for answer in both_ways(&mut ring, || {
        op(a.as_raw_fd(), IoKind::Send, vec![0u8; 4], 2..9)
    }) {
        assert_eq!(answer.result, -libc::EINVAL);
    }
}

/// A batch of one is a plain call, with the same results.
#[test]
fn a_single_call_answers_as_a_batch_would() {
    let Some(mut ring) = ring() else { return };
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let recv = || op(b.as_raw_fd(), IoKind::Recv, vec![0u8; 8], 0..8);
    for answer in both_ways(&mut ring, recv) {
        assert_eq!(answer.result, -libc::EAGAIN);
    }
    (&a).write_all(b"one").unwrap();
    let single = ring.run(vec![recv()]).unwrap().remove(0);
    assert_eq!((single.result, &single.buf[..3]), (3, &b"one"[..]));
    drop(a);
    for answer in both_ways(&mut ring, recv) {
        assert_eq!(answer.result, 0, "EOF");
    }
}

#[test]
fn a_closed_peer_is_an_error_result_not_a_signal() {
    let Some(mut ring) = ring() else { return };
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    for answer in both_ways(&mut ring, || {
        op(a.as_raw_fd(), IoKind::Send, vec![1u8; 4], 0..4)
    }) {
        assert_eq!(answer.result, -libc::EPIPE);
    }
}

/// Answers until one with `tag` came, within a second.
fn answer(ring: &mut Ring, tag: u64) -> (i32, Vec<u8>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline {
        ring.wait(Some(Duration::from_millis(50))).unwrap();
        ring.take_received(&mut got);
        if let Some(i) = got.iter().position(|r| r.tag == tag) {
            let r = got.swap_remove(i);
            let answer = (r.result, ring.bytes(&r).to_vec());
            ring.recycle(r);
            return answer;
        }
    }
    panic!("no answer for tag {tag}");
}

#[test]
fn an_armed_receive_waits_for_bytes_and_brings_them() {
    let Some(mut ring) = ring() else { return };
    let (a, b) = UnixStream::pair().unwrap();
    ring.arm_recv(b.as_raw_fd(), 7, 64).unwrap();
    ring.wait(Some(Duration::ZERO)).unwrap();
    let mut got = Vec::new();
    ring.take_received(&mut got);
    assert!(got.is_empty(), "nothing was sent yet: {got:?}");
    (&a).write_all(b"hello").unwrap();
    assert_eq!(answer(&mut ring, 7), (5, b"hello".to_vec()));
    // Its length is what it may take: the rest waits for the next one.
    (&a).write_all(b"0123456789").unwrap();
    ring.arm_recv(b.as_raw_fd(), 8, 4).unwrap();
    assert_eq!(answer(&mut ring, 8), (4, b"0123".to_vec()));
    drop(a);
    ring.arm_recv(b.as_raw_fd(), 9, 64).unwrap();
    assert_eq!(answer(&mut ring, 9), (6, b"456789".to_vec()));
    ring.arm_recv(b.as_raw_fd(), 10, 64).unwrap();
    assert_eq!(answer(&mut ring, 10), (0, Vec::new()), "EOF");
}

#[test]
fn every_buffer_comes_back_to_the_group() {
    let Some(mut ring) = ring() else { return };
    let (a, b) = UnixStream::pair().unwrap();
    // Three times round the group: a buffer not given back would run it
    // dry (-ENOBUFS).
    for i in 0..3 * u64::from(RECV_BUFFERS) {
        ring.arm_recv(b.as_raw_fd(), i, 64).unwrap();
        (&a).write_all(&i.to_ne_bytes()).unwrap();
        assert_eq!(answer(&mut ring, i), (8, i.to_ne_bytes().to_vec()));
    }
}

#[test]
fn a_cancelled_receive_answers_and_lets_go_of_its_socket() {
    let Some(mut ring) = ring() else { return };
    let (a, b) = UnixStream::pair().unwrap();
    ring.arm_recv(b.as_raw_fd(), 3, 64).unwrap();
    ring.wait(Some(Duration::ZERO)).unwrap();
    ring.cancel_recv(3).unwrap();
    assert_eq!(answer(&mut ring, 3).0, -libc::ECANCELED);
    // Closed now, the socket is gone: its peer reads EOF.
    drop(b);
    a.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert_eq!((&a).read(&mut [0u8; 4]).unwrap(), 0);
}

#[test]
fn the_wait_ends_when_the_epoll_fd_fires() {
    let Some(mut ring) = ring() else { return };
    let poll = mio::Poll::new().unwrap();
    let waker = mio::Waker::new(poll.registry(), mio::Token(1)).unwrap();
    ring.watch_epoll(poll.as_raw_fd());
    // Watching starts as fired: epoll may hold events from before.
    ring.wait(Some(Duration::ZERO)).unwrap();
    assert!(ring.take_epoll_ready());
    ring.wait(Some(Duration::from_millis(20))).unwrap();
    assert!(!ring.take_epoll_ready(), "nothing happened");
    waker.wake().unwrap();
    let started = std::time::Instant::now();
    ring.wait(Some(Duration::from_secs(5))).unwrap();
    assert!(ring.take_epoll_ready(), "woken by the epoll fd");
    assert!(started.elapsed() < Duration::from_secs(4));
}
