//! The sanity floor of a veth path that models a NIC: before the bench
//! reports, `direct` (no proxy) over the path must reach at least a quarter
//! of `direct` over loopback for each veth pair it crosses (a quarter on
//! `veth`; an eighth on `veth2`, where `direct` crosses two pairs and is
//! forwarded between them), both measured in turn in the same run (one
//! connection, one way). A path below that measures its own setup, not
//! a proxy: offloads that did not take, a tc qdisc or a namespace routed the
//! wrong way, or a machine too loaded to measure on. The bench then prints
//! no table and exits non-zero.

use std::time::Duration;

use super::args::{EngineSpec, Settings};
use super::engines::Engine;
use super::load::Way;
use super::measure::Summary;
use super::netpath::NetPath;
use super::upstream::{Upstream, DEFAULT_WRITE};
use super::workloads::{self, Metric};

/// The least share of loopback's `direct` rate a NIC-like path must reach,
/// per veth pair crossed.
pub const FRACTION: f64 = 0.25;

/// Runs of each side of the floor, and their length: fixed, so `--quick`
/// checks the path as a full run does.
const RUNS: usize = 3;
const RUN: Duration = Duration::from_millis(200);
const WARMUP: Duration = Duration::from_millis(80);

/// `direct`, one connection one way, over the path and over loopback: the
/// best of each side's runs in GB/s. The best, not the median: the floor asks
/// what the path can carry, and on a busy machine the median says more about
/// the neighbours.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Floor {
    pub path_gbps: f64,
    pub loopback_gbps: f64,
    /// Veth pairs `direct` crosses.
    pub pairs: u32,
}

impl Floor {
    /// The path's rate as a share of loopback's.
    pub fn share(&self) -> f64 {
        if self.loopback_gbps > 0.0 {
            self.path_gbps / self.loopback_gbps
        } else {
            0.0
        }
    }

    /// The least share the path must reach.
    pub fn required(&self) -> f64 {
        FRACTION / f64::from(self.pairs.max(1))
    }

    /// What the header says about the floor.
    pub fn line(&self, path: &str) -> String {
        format!(
            "direct over {path} {:.2} GB/s = {:.0}% of direct over loopback {:.2} GB/s (at least {}% needed)",
            self.path_gbps,
            self.share() * 100.0,
            self.loopback_gbps,
            self.required() * 100.0
        )
    }

    /// Ok if the path reaches the floor; else the reason the bench refuses
    /// to report, with the likely causes.
    pub fn check(&self, path: &str) -> Result<(), String> {
        if self.path_gbps.is_finite() && self.share() >= self.required() {
            return Ok(());
        }
        Err(format!(
            "the {path} path is implausibly slow, so no figure of this run would describe a proxy: {}. \
             Likely causes: the pairs' offloads did not take (`ip netns exec NAME-px ethtool -k vup` \
             should show generic-receive-offload on), a tc qdisc or a netns/route setup that shapes \
             or detours the path, or a machine too loaded to measure on (check `uptime`). \
             `--path veth-nooffload` is the offload-free worst case, which this check does not apply to",
            self.line(path)
        ))
    }
}

/// Measures both sides of the floor from the calling thread, which is on the
/// client side of `path`: `direct` to `up` across the path, and `direct` to
/// an upstream started on the client namespace's own loopback, run by run
/// in turn so that a change in the machine's load hits both alike.
pub fn measure(path: &NetPath, up: &Upstream, s: &Settings) -> Result<Floor, String> {
    let lo = Upstream::start((std::net::Ipv4Addr::LOCALHOST, 0).into())
        .map_err(|e| format!("floor: cannot start a loopback upstream: {e}"))?;
    let s = Settings {
        duration: RUN,
        warmup: WARMUP,
        ..s.clone()
    };
    let loopback = NetPath::loopback();
    let across = Engine::start(&EngineSpec::Direct, "direct".into(), up.addr(), &s, path)?;
    let local = Engine::start(
        &EngineSpec::Direct,
        "direct".into(),
        lo.addr(),
        &s,
        &loopback,
    )?;
    let (mut path_gbps, mut loopback_gbps) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        path_gbps
            .push(direct_gbps(&across, up, &s).map_err(|e| format!("floor, over the path: {e}"))?);
        loopback_gbps
            .push(direct_gbps(&local, &lo, &s).map_err(|e| format!("floor, over loopback: {e}"))?);
    }
    across.stop();
    local.stop();
    let best = |v: &[f64]| Summary::of(v).map_or(0.0, |m| m.max);
    Ok(Floor {
        path_gbps: best(&path_gbps),
        loopback_gbps: best(&loopback_gbps),
        pairs: path.pairs(),
    })
}

/// The GB/s of one run of `direct` to `up`, one connection one way.
fn direct_gbps(e: &Engine, up: &Upstream, s: &Settings) -> Result<f64, String> {
    let f = workloads::bulk(e, up, (1, Way::Up, DEFAULT_WRITE), s)?;
    f.iter()
        .find(|(m, _)| *m == Metric::Gbps)
        .map(|(_, v)| *v)
        .ok_or_else(|| "no rate measured".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_a_quarter_of_loopback_per_pair() {
        let at = |p, l, pairs| Floor {
            path_gbps: p,
            loopback_gbps: l,
            pairs,
        };
        assert!(at(1.25, 5.0, 1).check("veth").is_ok());
        assert!(at(4.0, 5.0, 1).check("veth").is_ok());
        let err = at(0.056, 5.0, 1).check("veth").unwrap_err();
        assert!(
            err.contains(
                "direct over veth 0.06 GB/s = 1% of direct over loopback 5.00 GB/s (at least 25% needed)"
            ),
            "{err}"
        );
        assert!(err.contains("offloads") && err.contains("tc") && err.contains("loaded"));
        assert!(at(1.24, 5.0, 1).check("veth").is_err());
        // Two pairs: an eighth.
        assert!(at(0.63, 5.0, 2).check("veth2").is_ok());
        let err = at(0.62, 5.0, 2).check("veth2").unwrap_err();
        assert!(err.contains("(at least 12.5% needed)"), "{err}");
        assert!(at(f64::NAN, 5.0, 1).check("veth").is_err());
        assert!(at(1.0, 0.0, 1).check("veth").is_err());
    }
}
