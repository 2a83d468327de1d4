//! Taps in a network namespace this test makes and removes itself (a veth pair, addresses in
//! 10.200.0.0/16 only inside it): the interfaces are read as a NIC would carry them, a tap is
//! joined both ways with tc, and detaching leaves the namespace as it was. Needs root.

use std::path::PathBuf;
use std::process::Command;

use uvm_host::net::{Namespace, VethNamespace, TAP_PREFIX};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with a veth `eth0` (10.200.77.2/24, default via .1, MTU 1400) whose peer stays
/// on the host; removed on drop.
fn test_ns() -> VethNamespace {
    let ns = VethNamespace::new("uvmtest-tap", "uvh", 77).expect("make the namespace");
    ip(&["-n", ns.name(), "link", "set", "eth0", "mtu", "1400"]);
    ns
}

fn tc(ns: &VethNamespace, what: &str, dev: &str) -> String {
    ns.run(&["tc", what, "show", "dev", dev, "ingress"])
}

fn root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn real_host_a_namespace_interface_is_read_joined_to_a_tap_and_detached_cleanly() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let t = test_ns();
    let ns = Namespace::open(&t.path()).expect("open");
    let ifaces = ns.interfaces().expect("interfaces");
    assert_eq!(ifaces.len(), 1, "{ifaces:?}");
    let eth0 = &ifaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(
        eth0.addresses,
        vec![("10.200.77.2".parse().expect("a test value"), 24)]
    );
    assert_eq!(
        eth0.routes,
        vec![(None, Some("10.200.77.1".parse().expect("a test value")))]
    );

    let tap = ns.attach(eth0).expect("attach");
    assert!(tap.name.starts_with(TAP_PREFIX), "{}", tap.name);
    let filter = tc(&t, "filter", "eth0");
    assert!(filter.contains("mirred"), "eth0 redirects: {filter}");
    assert!(
        filter.contains("protocol all"),
        "every packet, not one protocol: {filter}"
    );
    assert!(
        tc(&t, "filter", &tap.name).contains("mirred"),
        "the tap redirects"
    );
    // The tap is never offered as an endpoint.
    assert_eq!(ns.interfaces().expect("again").len(), 1);
    // A second NIC on the same interface is refused, and the first one's redirect stays.
    let err = ns.attach(eth0).expect_err("in use");
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(
        tc(&t, "filter", "eth0").contains("mirred"),
        "the first redirect is untouched"
    );
    let links = t.run(&["ip", "-o", "link"]);
    assert_eq!(
        links.matches(TAP_PREFIX).count(),
        1,
        "the refused tap went: {links}"
    );

    ns.detach(eth0.index).expect("detach");
    assert!(
        !tc(&t, "filter", "eth0").contains("mirred"),
        "eth0 is its own again"
    );
    ns.detach(eth0.index).expect("detach twice is harmless");
    drop(tap);
    assert!(
        !t.run(&["ip", "-o", "link"]).contains(TAP_PREFIX),
        "the tap went with its fd"
    );
}

#[test]
fn real_host_a_namespace_without_interfaces_is_refused() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let name = format!("uvmtest-empty-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let result = Namespace::open(&PathBuf::from(format!("/run/netns/{name}")))
        .and_then(|ns| ns.interfaces());
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    let err = result.expect_err("only lo");
    assert!(err.to_string().contains("no usable interface"), "{err}");
}
