//! The commands that build and read a bench path: `ip`, `tc` and `ethtool`
//! run as child processes, and the counters of /proc/net/snmp. Each failure
//! is one line naming the command.

use std::process::{Command, Stdio};

/// A NIC's offloads on one veth end: TSO off, so the 64 KiB GSO skbs TCP
/// builds are cut into MTU-sized frames (software GSO) before they cross the
/// pair; GRO on, so the receiving end merges them back (on Linux 5.13 and
/// later this gives the veth its NAPI context, without XDP). Checked after
/// setting: an offload the kernel refuses fails the path rather than
/// measuring another one.
pub fn nic_offloads(ns: &str, dev: &str) -> Result<(), String> {
    ethtool(ns, &["-K", dev, "tso", "off", "gso", "on", "gro", "on"])?;
    let shown = ethtool(ns, &["-k", dev])?;
    let want = [
        ("tcp-segmentation-offload", "off"),
        ("generic-segmentation-offload", "on"),
        ("generic-receive-offload", "on"),
    ];
    for (feature, value) in want {
        let now = offload_state(&shown, feature);
        if now != Some(value) {
            return Err(format!(
                "{dev} in {ns}: {feature} is {} after `ethtool -K`, not {value}; this kernel's veth cannot model a NIC (use --path veth-nooffload for the offload-free worst case)",
                now.unwrap_or("missing")
            ));
        }
    }
    Ok(())
}

/// `on` or `off` of one feature in `ethtool -k` output (`[fixed]` ignored).
fn offload_state<'a>(shown: &'a str, feature: &str) -> Option<&'a str> {
    shown.lines().find_map(|l| {
        let (name, rest) = l.trim().split_once(':')?;
        (name == feature).then(|| rest.split_whitespace().next())?
    })
}

/// Runs `ethtool ARGS` inside namespace `ns`; returns its stdout.
fn ethtool(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip netns exec: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("exec of") {
        return Err(
            "the veth paths need the `ethtool` command (to give the pairs a NIC's offloads), which is not installed; `make deps` installs it"
                .into(),
        );
    }
    Err(format!(
        "`ethtool {}` in {ns} failed: {}",
        args.join(" "),
        err.trim()
    ))
}

/// `Ip: InReceives` of the calling thread's network namespace.
pub fn ip_in_receives() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").ok()?;
    snmp_field(&snmp, "Ip:", "InReceives")
}

/// One counter of /proc/net/snmp: a header line and a value line per prefix.
fn snmp_field(snmp: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Runs `ip ARGS`; its stderr becomes the error.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "the veth paths need the `ip` command (iproute2), which is not installed".into()
            }
            _ => format!("cannot run ip: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Runs `tc ARGS`; its stderr becomes the error.
pub fn tc(args: &[&str]) -> Result<(), String> {
    let out = Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("the veth paths need the `tc` command (iproute2): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`tc {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// `ip -s -j -n NS link show dev DEV`, the one interface's object.
pub fn link_json(ns: &str, dev: &str) -> Option<serde_json::Value> {
    let out = Command::new("ip")
        .args(["-s", "-d", "-j", "-n", ns, "link", "show", "dev", dev])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_states_and_snmp_counters() {
        let shown = "Features for vup:\nrx-checksumming: on\ntcp-segmentation-offload: off\n\ttx-tcp-segmentation: off\ngeneric-segmentation-offload: on\ngeneric-receive-offload: on\nrx-gro-hw: off [fixed]\n";
        assert_eq!(
            offload_state(shown, "tcp-segmentation-offload"),
            Some("off")
        );
        assert_eq!(offload_state(shown, "generic-receive-offload"), Some("on"));
        assert_eq!(offload_state(shown, "rx-gro-hw"), Some("off"));
        assert_eq!(offload_state(shown, "large-receive-offload"), None);
        let snmp = "Ip: Forwarding DefaultTTL InReceives InHdrErrors\nIp: 1 64 54880 0\nIcmp: InMsgs\nIcmp: 3\n";
        assert_eq!(snmp_field(snmp, "Ip:", "InReceives"), Some(54880));
        assert_eq!(snmp_field(snmp, "Icmp:", "InMsgs"), Some(3));
        assert_eq!(snmp_field(snmp, "Tcp:", "InSegs"), None);
    }
}
