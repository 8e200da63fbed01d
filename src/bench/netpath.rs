//! The network path the load crosses: loopback, or veth pairs between
//! network namespaces the bench creates for itself.
//!
//! Loopback flatters both engines: its 64 KiB MTU hands the proxy a few huge
//! skbs end to end, and each sender's thread runs its receiver's TCP input.
//! The veth paths model a NIC, as far as a veth pair can:
//!
//! ```text
//! veth:   [NAME-px: load ─lo─ proxy] ─veth─ [NAME-up: upstream]
//! veth2:  [NAME-cl: load] ─veth─ [NAME-px: proxy] ─veth─ [NAME-up: upstream]
//! veth-nooffload: the veth layout, with every offload off
//! ```
//!
//! What is modelled on `veth` and `veth2` (each end of each pair):
//! - the wire: MTU 1500 (`--mtu`); no frame larger crosses the pair, which
//!   the frame counters of the upstream side confirm in the notes;
//! - the sending side: TCP builds 64 KiB GSO skbs, as it does for a NIC with
//!   TSO, and they are cut into MSS-sized frames as they leave (the pair's
//!   TSO is off, so the kernel's software GSO does the cut; a NIC would do it
//!   in hardware, so the sender pays a little more CPU than behind a NIC);
//! - the transmit queue: a pfifo_fast qdisc, as a NIC has, where a bare
//!   veth has none and drops what its peer's ring cannot take;
//! - the receiving side: GRO merges the frames back into large skbs before
//!   TCP sees them, as a NIC driver's NAPI poll does (`ethtool -K gro on`: on
//!   Linux 5.13 and later that alone gives a veth its NAPI and GRO; before,
//!   veth did GRO only with an XDP program attached).
//!
//! What is not modelled: the NIC's own latency and interrupts, its rings,
//! its hardware checksum and segmentation (done in software here, on the same
//! CPUs as everything else), RSS across queues, and a wire with a bandwidth
//! or a delay of its own: a veth frame reaches its peer namespace in the
//! sender's softirq, at memory speed.
//!
//! `veth-nooffload` is the explicitly named worst case: `gso_max_segs 1` and
//! no GRO, so every 1448-byte segment crosses both stacks as its own skb,
//! which no machine with a NIC does; the path check (`floor`) does not apply
//! to it.
//!
//! Every address lives inside these namespaces (10.201.0.0/30 towards the
//! upstream, 10.201.1.0/30 towards the clients), so nothing in the host's own
//! namespace changes and no packet can leave the machine; the proxy namespace
//! forwards between the legs for `direct` on veth2. The namespaces are named
//! after the bench's pid and removed when the [`NetPath`] is dropped, on
//! SIGINT/SIGTERM/SIGHUP, and at the next start if the bench died without
//! either (SIGKILL).
//!
//! A thread is moved into a namespace with setns(2); the threads it spawns
//! afterwards start there too, and a socket stays where it was created. So
//! the main thread (and with it every load thread) enters the client side,
//! and the upstream and the in-process proxy are started from short-lived
//! threads inside their own namespaces.

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use super::netcmd::{ip, ip_in_receives, link_json, nic_offloads, tc};

/// Where the load, the proxy and the upstream meet.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Everything on loopback in the bench's own namespace.
    #[default]
    Loopback,
    /// The upstream behind a veth pair; the load reaches the proxy on loopback.
    Veth,
    /// The upstream and the load each behind their own veth pair.
    Veth2,
    /// The `veth` layout without offloads: one segment per skb (the worst case).
    #[serde(rename = "veth-nooffload")]
    VethNooffload,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Loopback => "loopback",
            PathKind::Veth => "veth",
            PathKind::Veth2 => "veth2",
            PathKind::VethNooffload => "veth-nooffload",
        }
    }

    /// A veth path whose pairs have a NIC's offloads (GSO out, GRO in).
    pub fn models_nic(self) -> bool {
        matches!(self, PathKind::Veth | PathKind::Veth2)
    }
}

pub const DEFAULT_MTU: u32 = 1500;
const PREFIX: &str = "spliced-bench-";
const NETNS_DIR: &str = "/run/netns";
/// The proxy's and the upstream's ends of the upstream leg.
const UP_NEAR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const UP_FAR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// The proxy's and the clients' ends of the client leg (veth2).
const CL_NEAR: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
const CL_FAR: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
/// Interface names; they exist only inside the namespaces.
const DEV_TO_UP: &str = "vup";
const DEV_TO_CL: &str = "vcl";
const DEV_TO_PX: &str = "vpx";

/// The side of the path a thread or a socket belongs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Proxy,
    Upstream,
}

/// What the output says about the path.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathInfo {
    pub path: PathKind,
    pub mtu: u32,
    /// The namespaces' common name prefix (veth paths).
    pub netns: Option<String>,
    /// Frames the upstream namespace received and their mean size in bytes
    /// (veth paths): a check that the MTU held.
    pub upstream_frames: Option<u64>,
    pub upstream_frame_bytes: Option<f64>,
    /// IP packets the upstream namespace's stack received (veth paths): fewer
    /// than the frames where GRO merged them.
    pub upstream_ip_packets: Option<u64>,
    /// `direct` over the path against `direct` over loopback (veth paths).
    pub check: Option<super::floor::Floor>,
}

impl PathInfo {
    /// The header line of the table.
    pub fn line(&self) -> String {
        match self.path {
            PathKind::Loopback => format!(
                "loopback, MTU {} (load, proxy and upstream in one network namespace)",
                self.mtu
            ),
            PathKind::Veth => format!(
                "veth, MTU {} (upstream behind a veth pair with GSO out and GRO in, as a NIC; load to proxy on loopback)",
                self.mtu
            ),
            PathKind::Veth2 => format!(
                "veth2, MTU {} (load and upstream each behind a veth pair with GSO out and GRO in, as a NIC)",
                self.mtu
            ),
            PathKind::VethNooffload => format!(
                "veth-nooffload, MTU {} (upstream behind a veth pair, no GSO, no GRO: one segment per skb, the worst case)",
                self.mtu
            ),
        }
    }
}

/// The path of one bench run; dropping an owned one removes its namespaces.
#[derive(Debug)]
pub struct NetPath {
    kind: PathKind,
    mtu: u32,
    /// The namespaces' common prefix (`spliced-bench-PID`), veth paths only.
    name: Option<String>,
    /// Created by this process (and so removed by it), not attached to.
    owned: bool,
}

/// Names of the namespaces this process created and has not removed yet: what
/// the signal handler removes.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl NetPath {
    pub fn loopback() -> NetPath {
        let mtu = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65536);
        NetPath {
            kind: PathKind::Loopback,
            mtu,
            name: None,
            owned: false,
        }
    }

    /// Creates the namespaces and veth pairs of `kind` (not loopback).
    pub fn create(kind: PathKind, mtu: u32) -> Result<NetPath, String> {
        check_privileges(kind)?;
        remove_stale();
        let name = format!("{PREFIX}{}", std::process::id());
        install_signal_cleanup()?;
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        let path = NetPath {
            kind,
            mtu,
            name: Some(name),
            owned: true,
        };
        // On failure `path` is dropped here, which removes what was made.
        path.build()?;
        Ok(path)
    }

    /// Uses the namespaces a running `spliced bench --hold` made under `name`.
    pub fn attach(kind: PathKind, name: &str) -> Result<NetPath, String> {
        check_privileges(kind)?;
        let exists = |side: &str| ns_file(name, side).exists();
        if !exists("px") || !exists("up") {
            return Err(format!(
                "--netns {name}: no such namespaces ({NETNS_DIR}/{name}-px and -up); start `spliced bench --path {} --hold` first",
                kind.as_str()
            ));
        }
        let nooffload = link_json(&format!("{name}-px"), DEV_TO_UP)
            .and_then(|v| v["gso_max_segs"].as_u64())
            == Some(1);
        let found = match (exists("cl"), nooffload) {
            (true, _) => PathKind::Veth2,
            (false, true) => PathKind::VethNooffload,
            (false, false) => PathKind::Veth,
        };
        if found != kind {
            return Err(format!(
                "--netns {name} is a {} path, not --path {}",
                found.as_str(),
                kind.as_str()
            ));
        }
        let mtu = link_json(&format!("{name}-px"), DEV_TO_UP)
            .and_then(|v| v["mtu"].as_u64())
            .ok_or_else(|| format!("--netns {name}: cannot read the MTU of {DEV_TO_UP}"))?;
        Ok(NetPath {
            kind,
            mtu: mtu as u32,
            name: Some(name.to_string()),
            owned: false,
        })
    }

    pub fn kind(&self) -> PathKind {
        self.kind
    }

    /// Veth pairs between the load and the upstream.
    pub fn pairs(&self) -> u32 {
        match self.kind {
            PathKind::Loopback => 0,
            PathKind::Veth | PathKind::VethNooffload => 1,
            PathKind::Veth2 => 2,
        }
    }

    /// The namespace file of a side, or None where it stays in this process's
    /// namespace (loopback).
    pub fn netns(&self, side: Side) -> Option<PathBuf> {
        let name = self.name.as_deref()?;
        let short = match (side, self.kind) {
            (Side::Upstream, _) => "up",
            (Side::Client, PathKind::Veth2) => "cl",
            _ => "px",
        };
        Some(ns_file(name, short))
    }

    /// The address the proxy listens on, seen from the clients.
    pub fn listen_ip(&self) -> IpAddr {
        match self.kind {
            PathKind::Veth2 => CL_NEAR.into(),
            _ => Ipv4Addr::LOCALHOST.into(),
        }
    }

    /// The address the embedded upstream binds: `--upstream` if given (on a veth
    /// path its IP must be the upstream's end of the pair, or 0.0.0.0).
    pub fn upstream_addr(&self, asked: Option<SocketAddr>) -> Result<SocketAddr, String> {
        let ip: IpAddr = match self.kind {
            PathKind::Loopback => Ipv4Addr::LOCALHOST.into(),
            _ => UP_FAR.into(),
        };
        match asked {
            None => Ok(SocketAddr::new(ip, 0)),
            Some(a) if self.kind == PathKind::Loopback => Ok(a),
            Some(a) if a.ip() == ip || a.ip().is_unspecified() => Ok(SocketAddr::new(ip, a.port())),
            Some(a) => Err(format!(
                "--upstream {a}: with --path {} the upstream listens on {ip} (its end of the veth pair); give {ip}:PORT",
                self.kind.as_str()
            )),
        }
    }

    /// Moves the calling thread (and the threads it spawns from now on) to
    /// the client side.
    pub fn enter_client(&self) -> Result<(), String> {
        match self.netns(Side::Client) {
            Some(ns) => enter(&ns),
            None => Ok(()),
        }
    }

    /// Runs `f` on a thread in `side`'s namespace (here, on loopback); the
    /// threads `f` spawns stay there.
    pub fn run_in<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let Some(ns) = self.netns(side) else {
            return Ok(f());
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&ns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| "a thread starting a bench side panicked".to_string())?
        })
    }

    /// The path as the output states it, with the frame counters read now.
    pub fn info(&self) -> PathInfo {
        let frames = self.name.as_deref().and_then(|n| {
            let v = link_json(&format!("{n}-up"), DEV_TO_PX)?;
            let rx = &v["stats64"]["rx"];
            Some((rx["packets"].as_u64()?, rx["bytes"].as_u64()?))
        });
        let ip_packets = self
            .name
            .as_ref()
            .and_then(|_| self.run_in(Side::Upstream, ip_in_receives).ok().flatten());
        PathInfo {
            path: self.kind,
            mtu: self.mtu,
            netns: self.name.clone(),
            upstream_frames: frames.map(|f| f.0),
            upstream_frame_bytes: frames.filter(|f| f.0 > 0).map(|(p, b)| b as f64 / p as f64),
            upstream_ip_packets: ip_packets,
            check: None,
        }
    }

    /// `--hold`: prints where everything is, keeps the path until stdin
    /// closes (or a signal), then removes it.
    pub fn hold(self) -> ExitCode {
        let name = self.name.clone().unwrap_or_default();
        let line = format!(
            "path={} mtu={} netns={name} proxy_netns={name}-px listen={} upstream={}",
            self.kind.as_str(),
            self.mtu,
            self.listen_ip(),
            UP_FAR
        );
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
        drop(out);
        for l in std::io::stdin().lock().lines() {
            if l.is_err() {
                break;
            }
        }
        drop(self);
        ExitCode::SUCCESS
    }

    fn build(&self) -> Result<(), String> {
        let Some(name) = self.name.as_deref() else {
            return Ok(());
        };
        let (px, up) = (format!("{name}-px"), format!("{name}-up"));
        self.add_ns(&px)?;
        self.add_ns(&up)?;
        self.leg((&px, DEV_TO_UP, UP_NEAR), (&up, DEV_TO_PX, UP_FAR))?;
        if self.kind == PathKind::Veth2 {
            let cl = format!("{name}-cl");
            self.add_ns(&cl)?;
            self.leg((&px, DEV_TO_CL, CL_NEAR), (&cl, DEV_TO_PX, CL_FAR))?;
            // Forwarding between the legs, for `direct`.
            self.sysctl(Side::Proxy, "ipv4/ip_forward", "1")?;
        }
        // The side that closes first keeps the port in TIME_WAIT for 60 s;
        // thousands of idle relays a run would use up the ephemeral ports of
        // the one (proxy, upstream) address pair. The kernel's default reuses
        // them on loopback only (tcp_tw_reuse 2); these namespaces do it too.
        self.sysctl(Side::Proxy, "ipv4/tcp_tw_reuse", "1")?;
        self.sysctl(Side::Client, "ipv4/tcp_tw_reuse", "1")
    }

    /// Writes /proc/sys/net/KEY in `side`'s namespace: a sysctl under
    /// /proc/sys/net belongs to the namespace of the thread that opens it.
    fn sysctl(&self, side: Side, key: &str, value: &str) -> Result<(), String> {
        let file = format!("/proc/sys/net/{key}");
        self.run_in(side, || std::fs::write(&file, value))?
            .map_err(|e| format!("cannot set {file} in the {side:?} namespace: {e}"))
    }

    fn add_ns(&self, ns: &str) -> Result<(), String> {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "dev", "lo", "up"])
    }

    /// One veth pair from `near` (the proxy's namespace) to `far`, a /30 on
    /// it, and the far side's default route through the near one.
    fn leg(&self, near: (&str, &str, Ipv4Addr), far: (&str, &str, Ipv4Addr)) -> Result<(), String> {
        let mtu = self.mtu.to_string();
        ip(&[
            "-n", near.0, "link", "add", near.1, "type", "veth", "peer", "name", far.1, "netns",
            far.0,
        ])?;
        for (ns, dev, addr) in [near, far] {
            if self.kind.models_nic() {
                ip(&["-n", ns, "link", "set", "dev", dev, "mtu", &mtu])?;
                nic_offloads(ns, dev)?;
                // A NIC's transmit queue: a veth has none (noqueue), so a
                // burst that fills the peer's 256-frame ring is dropped and
                // retransmitted; behind a qdisc the ring pushes back.
                tc(&[
                    "-n",
                    ns,
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "pfifo_fast",
                ])?;
                ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
            } else {
                // One MSS per skb: no GSO super-packet crosses the pair, and
                // veth does no GRO without NAPI.
                ip(&[
                    "-n",
                    ns,
                    "link",
                    "set",
                    "dev",
                    dev,
                    "mtu",
                    &mtu,
                    "gso_max_segs",
                    "1",
                    "up",
                ])?;
            }
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
        }
        ip(&[
            "-n",
            far.0,
            "route",
            "add",
            "default",
            "via",
            &near.2.to_string(),
        ])
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        if let (true, Some(name)) = (self.owned, &self.name) {
            remove(name);
            LIVE.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|n| n != name);
        }
    }
}

fn ns_file(name: &str, side: &str) -> PathBuf {
    PathBuf::from(format!("{NETNS_DIR}/{name}-{side}"))
}

fn enter(ns: &std::path::Path) -> Result<(), String> {
    crate::os::netns::enter(ns)
        .map_err(|e| format!("cannot enter network namespace {}: {e}", ns.display()))
}

/// Removes the namespaces of one path (the veth pairs inside go with them).
fn remove(name: &str) {
    for side in ["cl", "px", "up"] {
        if ns_file(name, side).exists() {
            let _ = ip(&["netns", "del", &format!("{name}-{side}")]);
        }
    }
}

/// Creating and entering namespaces takes CAP_SYS_ADMIN, configuring them
/// CAP_NET_ADMIN: in practice, root.
fn check_privileges(kind: PathKind) -> Result<(), String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| caps & (1 << bit) != 0;
    if has(CAP_NET_ADMIN) && has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    Err(format!(
        "--path {} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, to create network namespaces and enter them); run it as root, or use --path loopback",
        kind.as_str()
    ))
}

/// The pid in a namespace name of ours, `spliced-bench-PID-SIDE`.
fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(PREFIX)?;
    let (pid, side) = rest.split_once('-')?;
    matches!(side, "px" | "up" | "cl")
        .then(|| pid.parse().ok())
        .flatten()
}

/// Removes namespaces left by benches that died without cleaning up (SIGKILL):
/// those whose pid no longer runs. A pid taken by another process since only
/// keeps them until that one ends; a live bench's are never touched.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let mut stale = Vec::new();
    for e in dir.flatten() {
        let ns = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&ns) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            stale.push(ns);
        }
    }
    for ns in stale {
        if ip(&["netns", "del", &ns]).is_ok() {
            eprintln!("spliced bench: removed network namespace {ns} of a bench that is gone");
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remove the live namespaces, then exit
/// (128 + the signal, as the shell reports a death by signal).
fn install_signal_cleanup() -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let names = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
                for n in &names {
                    remove(n);
                    eprintln!(
                        "spliced bench: stopped by signal {sig}; removed network namespaces {n}-*"
                    );
                }
                std::process::exit(128 + sig);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    *installed = true;
    Ok(())
}

#[cfg(test)]
mod tests;
