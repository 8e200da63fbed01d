use super::*;

#[test]
fn namespace_names() {
    assert_eq!(owner_pid("spliced-bench-1234-px"), Some(1234));
    assert_eq!(owner_pid("spliced-bench-1234-cl"), Some(1234));
    assert_eq!(owner_pid("spliced-bench-1234-xx"), None);
    assert_eq!(owner_pid("spliced-bench-x-up"), None);
    assert_eq!(owner_pid("other-1234-up"), None);
}

#[test]
fn which_paths_model_a_nic() {
    assert!(PathKind::Veth.models_nic() && PathKind::Veth2.models_nic());
    assert!(!PathKind::VethNooffload.models_nic() && !PathKind::Loopback.models_nic());
}

#[test]
fn sides_and_addresses() {
    let lo = NetPath::loopback();
    assert_eq!(lo.netns(Side::Client), None);
    assert_eq!(
        lo.upstream_addr(None).unwrap(),
        "127.0.0.1:0".parse().unwrap()
    );
    // Not owned: nothing is created or removed.
    let v2 = NetPath {
        kind: PathKind::Veth2,
        mtu: 1500,
        name: Some("spliced-bench-7".into()),
        owned: false,
    };
    assert_eq!(
        v2.netns(Side::Client),
        Some(PathBuf::from("/run/netns/spliced-bench-7-cl"))
    );
    assert_eq!(
        v2.netns(Side::Proxy),
        Some(PathBuf::from("/run/netns/spliced-bench-7-px"))
    );
    assert_eq!(v2.listen_ip(), IpAddr::from(CL_NEAR));
    assert_eq!(
        v2.upstream_addr(Some("0.0.0.0:19000".parse().unwrap()))
            .unwrap(),
        "10.201.0.2:19000".parse().unwrap()
    );
    assert!(v2
        .upstream_addr(Some("127.0.0.1:19000".parse().unwrap()))
        .is_err());
    let v1 = NetPath {
        kind: PathKind::Veth,
        mtu: 1500,
        name: Some("spliced-bench-7".into()),
        owned: false,
    };
    assert_eq!(v1.netns(Side::Client), v1.netns(Side::Proxy));
    assert_eq!(v1.listen_ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
}
