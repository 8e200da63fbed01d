//! The balancing policies as pure functions over a pool's candidates: no
//! sockets, no clock, no shared state, so each is unit-tested here.

use std::net::{IpAddr, SocketAddr};

/// One server as a policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) weight: u32,
    /// Live relays (for least-conn).
    pub(crate) live: usize,
    /// A stable hash of the server's address (for source-hash).
    pub(crate) key: u64,
}

/// The order in which weighted round-robin visits servers, one full cycle
/// (the sum of the weights long): nginx's smooth weighted round-robin, so a
/// weight-3 server is spread through the cycle (A B A C A), never bunched.
pub(crate) fn wrr_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let Some(best) = (0..weights.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
        else {
            break;
        };
        current[best] -= total;
        order.push(best);
    }
    order
}

/// The candidate with the fewest live relays for its weight
/// (`live / weight`, compared without division). Ties go to the first at
/// or after `start`, so equal servers take turns.
pub(crate) fn least_conn(cands: &[Candidate], start: usize) -> Option<usize> {
    let n = cands.len();
    (0..n).map(|k| (start + k) % n).min_by(|&a, &b| {
        let (ca, cb) = (&cands[a], &cands[b]);
        (ca.live as u128 * u128::from(cb.weight)).cmp(&(cb.live as u128 * u128::from(ca.weight)))
    })
}

/// Weighted rendezvous (highest random weight) hashing: every candidate
/// scores the client, the best score wins. A client keeps its server while
/// the set is stable, and adding or removing one server moves only the
/// clients that server wins or won.
pub(crate) fn rendezvous(cands: &[Candidate], client: u64) -> Option<usize> {
    let score = |c: &Candidate| {
        let h = mix(client ^ c.key.rotate_left(17));
        // A uniform number in (0, 1); -w / ln(u) is the weighted score.
        let u = ((h >> 11) | 1) as f64 / (1u64 << 53) as f64;
        -f64::from(c.weight) / u.ln()
    };
    (0..cands.len()).max_by(|&a, &b| score(&cands[a]).total_cmp(&score(&cands[b])))
}

/// splitmix64's finaliser: a fast, well-spread 64-bit mix (not for secrets).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    bytes.chunks(8).fold(0x9e37_79b9_7f4a_7c15, |h, chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        mix(h ^ u64::from_le_bytes(word))
    })
}

/// A client address's hash; an IPv4-mapped IPv6 address hashes as IPv4.
pub(crate) fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(&v4.octets()),
            None => hash_bytes(&v6.octets()),
        },
    }
}

pub(crate) fn hash_addr(addr: SocketAddr) -> u64 {
    mix(hash_ip(addr.ip()) ^ u64::from(addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                weight,
                live: 0,
                key: hash_addr(SocketAddr::from(([10, 0, 0, i as u8 + 1], 5432))),
            })
            .collect()
    }

    #[test]
    fn weighted_round_robin_interleaves_by_weight() {
        assert_eq!(wrr_schedule(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(wrr_schedule(&[2, 1]), [0, 1, 0]);
        let s = wrr_schedule(&[5, 1, 1]);
        assert_eq!(s, [0, 0, 1, 0, 2, 0, 0]);
        assert!(wrr_schedule(&[]).is_empty());
    }

    #[test]
    fn least_conn_weighs_live_relays_and_rotates_ties() {
        let mut c = cands(&[1, 1, 2]);
        c[0].live = 3;
        c[1].live = 1;
        c[2].live = 3;
        // 1/1 < 3/2 < 3/1
        assert_eq!(least_conn(&c, 0), Some(1));
        c[1].live = 3;
        c[2].live = 6;
        // all at 3 per weight: the first at or after start
        assert_eq!(least_conn(&c, 0), Some(0));
        assert_eq!(least_conn(&c, 1), Some(1));
        assert_eq!(least_conn(&c, 5), Some(2));
        assert_eq!(least_conn(&[], 0), None);
    }

    #[test]
    fn rendezvous_moves_only_the_added_servers_share() {
        let clients: Vec<u64> = (0..3000u32)
            .map(|i| hash_ip(IpAddr::from([192, 168, (i >> 8) as u8, i as u8])))
            .collect();
        let three = cands(&[1, 1, 1]);
        let four = cands(&[1, 1, 1, 1]);
        let mut moved = 0;
        let mut counts = [0usize; 4];
        for &c in &clients {
            let before = rendezvous(&three, c).unwrap();
            let after = rendezvous(&four, c).unwrap();
            counts[after] += 1;
            if before != after {
                assert_eq!(after, 3, "a client moved between old servers");
                moved += 1;
            }
        }
        // The new server takes about a quarter, each keeps about a quarter.
        assert!((600..900).contains(&moved), "moved {moved}");
        assert!(
            counts.iter().all(|&n| (600..900).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn rendezvous_follows_weights() {
        let c = cands(&[3, 1]);
        let mut first = 0;
        for i in 0..4000u32 {
            if rendezvous(&c, hash_ip(IpAddr::from(i.to_be_bytes()))) == Some(0) {
                first += 1;
            }
        }
        assert!((2800..3200).contains(&first), "{first} of 4000");
    }

    #[test]
    fn mapped_addresses_hash_as_ipv4() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(hash_ip(v4), hash_ip(mapped));
    }
}
