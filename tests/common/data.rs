//! Deterministic data.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

/// xorshift64*: deterministic, fast, good enough to catch any reordering,
/// duplication or loss of bytes.
#[derive(Clone)]
pub struct Prng {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng {
            // Never zero, and different seeds give unrelated streams.
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with the next bytes of the stream; chunking never changes
    /// the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// `len` bytes of the stream of `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Prng::new(seed).bytes(len)
}

/// Length and SHA-256 of a byte stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digested {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for Digested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, sha256 ", self.len)?;
        for b in &self.sha256[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// Length and hash of `len` bytes of the stream of `seed`, without sending them.
pub fn expected_digest(seed: u64, len: usize) -> Digested {
    let mut rng = Prng::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n;
    }
    Digested {
        len: len as u64,
        sha256: hasher.finalize().into(),
    }
}

pub fn digest(bytes: &[u8]) -> Digested {
    Digested {
        len: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
    }
}

/// Writes `len` bytes of the stream of `seed` in `chunk`-sized writes; returns
/// what was written. `progress` (if any) counts bytes as they are accepted.
pub fn send_stream(
    stream: &mut TcpStream,
    seed: u64,
    len: usize,
    chunk: usize,
    progress: Option<&AtomicUsize>,
) -> io::Result<Digested> {
    let mut rng = Prng::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        if let Some(p) = progress {
            p.fetch_add(n, Ordering::Relaxed);
        }
        left -= n;
    }
    Ok(Digested {
        len: len as u64,
        sha256: hasher.finalize().into(),
    })
}
