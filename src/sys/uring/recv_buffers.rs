//! A ring's provided-buffer group: buffers the kernel fills for armed
//! receives, picked by the kernel and given back by the worker once it has
//! copied their bytes out.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{types, IoUring};
use memmap2::MmapMut;

/// Buffers in a ring's group, and the size of each: what the receives
/// answered between two turns can hold (beyond it a receive answers
/// `-ENOBUFS` and the relay reads for itself). 8 MiB of address space per
/// worker; the pages a small message never touches stay unmapped.
pub const RECV_BUFFERS: u16 = 512;
pub const RECV_BUFFER_SIZE: usize = 16 * 1024;

/// The group's ring of entries (each points at a buffer; the first holds
/// the tail the kernel reads) and the buffers.
pub(super) struct RecvBuffers {
    entries: MmapMut,
    buffers: MmapMut,
    /// The next tail to publish.
    tail: u16,
}

impl RecvBuffers {
    /// Maps the entries and the buffers, registers them with `ring` as
    /// group `group` (5.19+) and provides every buffer.
    pub(super) fn register(ring: &IoUring, group: u16) -> io::Result<RecvBuffers> {
        let entries = MmapMut::map_anon(
            usize::from(RECV_BUFFERS) * std::mem::size_of::<types::BufRingEntry>(),
        )?;
        let buffers = MmapMut::map_anon(usize::from(RECV_BUFFERS) * RECV_BUFFER_SIZE)?;
        // SAFETY: `entries` is a page-aligned mapping of `RECV_BUFFERS`
        // entries. The ring that registers it is dropped before it (the
        // owning `Ring`'s field order), and the kernel pins the pages it
        // registers until then.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                RECV_BUFFERS,
                group,
                0,
            )?;
        }
        let mut this = RecvBuffers {
            entries,
            buffers,
            tail: 0,
        };
        for bid in 0..RECV_BUFFERS {
            this.write_entry(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The first `len` bytes of buffer `bid`, which an answered receive
    /// filled.
    pub(super) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= RECV_BUFFERS {
            return &[];
        }
        let at = usize::from(bid) * RECV_BUFFER_SIZE;
        // SAFETY: the buffer lies inside the mapping (checked bid), and
        // the kernel wrote these bytes before it posted the answer; it
        // writes this buffer again only once it is provided again, which
        // needs `&mut self` after this borrow ends. Other buffers may be
        // written meanwhile, so no reference covers the whole mapping.
        unsafe {
            std::slice::from_raw_parts(self.buffers.as_ptr().add(at), len.min(RECV_BUFFER_SIZE))
        }
    }

    /// Gives buffer `bid` back to the kernel.
    pub(super) fn provide(&mut self, bid: u16) {
        if bid < RECV_BUFFERS {
            self.write_entry(bid);
            self.publish();
        }
    }

    /// Writes buffer `bid` into the next entry (published by `publish`).
    fn write_entry(&mut self, bid: u16) {
        let mask = usize::from(RECV_BUFFERS - 1);
        let at = usize::from(self.tail) & mask;
        let addr = self.buffers.as_ptr() as u64 + u64::from(bid) * RECV_BUFFER_SIZE as u64;
        let size = std::mem::size_of::<types::BufRingEntry>();
        let entry = &mut self.entries[at * size..(at + 1) * size];
        // An io_uring_buf: addr (u64), len (u32), bid (u16), and in the
        // first entry the ring's tail (u16), which `publish` alone writes.
        entry[0..8].copy_from_slice(&addr.to_ne_bytes());
        entry[8..12].copy_from_slice(&(RECV_BUFFER_SIZE as u32).to_ne_bytes());
        entry[12..14].copy_from_slice(&bid.to_ne_bytes());
        self.tail = self.tail.wrapping_add(1);
    }

    /// Hands the entries written so far to the kernel.
    fn publish(&mut self) {
        let base = self.entries.as_mut_ptr().cast::<types::BufRingEntry>();
        // SAFETY: `base` is the first entry of the registered ring, which
        // is page-aligned and initialised; its tail field is a naturally
        // aligned u16 that the kernel reads atomically, and this thread
        // alone writes it.
        let tail = unsafe { &*types::BufRingEntry::tail(base).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}
