//! Networking through the CLI binary: `create --net user --publish`, `--netns`, `nic
//! add|rm|ls`, `pci add|ls`, what `inspect` shows, and every bad input refused with nothing
//! left. The namespaces are the test's own (10.200.0.0/16 inside them only); no traffic goes
//! anywhere but loopback and those namespaces. VM tests are `real_vm_*` and end with
//! `common::Root::assert_clean`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

mod common;

use common::{require_prerequisites, stderr, Root};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn bad_network_options_are_refused_before_anything_starts() {
    let root = Root::new();
    let port = free_port().to_string();
    let publish = format!("{port}:80");
    let err = stderr(&root.run(&["create", "--publish", &publish]));
    assert!(err.contains("--publish needs --net user"), "{err}");
    for bad in ["80", "0:80", "8080:80/sctp", "x:1:2"] {
        let out = root.run(&["create", "--net", "user", "--publish", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
    let out = root.run(&["create", "--net", "user", "--netns", "/run/netns/x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    root.assert_clean();
}

#[test]
fn real_vm_a_published_port_that_is_taken_or_a_namespace_that_is_not_one_fails_the_create_cleanly()
{
    require_prerequisites();
    let root = Root::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = root.run(&[
        "create",
        "--net",
        "user",
        "--publish",
        &format!("{port}:80"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
    let out = root.run(&["create", "--netns", "/nonexistent/netns"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/netns"),
        "{}",
        stderr(&out)
    );
    root.assert_clean();
}

#[test]
fn real_vm_user_mode_publishes_a_guest_server_and_inspect_shows_the_nic() {
    require_prerequisites();
    let root = Root::new();
    let port = free_port();
    root.ok(&[
        "create",
        "--name",
        "web",
        "--net",
        "user",
        "--publish",
        &format!("{port}:8080"),
        "--start",
    ]);
    root.ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "mkdir -p /w && echo published > /w/index.html && httpd -p 8080 -h /w",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let got = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        match got {
            Ok(out) if out.contains("published") => break out,
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!("GET 127.0.0.1:{port}: {other:?}"),
        }
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let inspect = root.inspect("web");
    assert_eq!(inspect["network"], "Configured");
    assert_eq!(inspect["nics"][0]["id"], "nic0");
    assert_eq!(inspect["nics"][0]["state"], "Configured");
    assert_eq!(inspect["nics"][0]["addresses"][0], "10.0.2.15/24");
    assert_eq!(inspect["config"]["network"]["mode"], "user");
    let ls = root.ok(&["nic", "ls", "web"]);
    assert!(ls.contains("nic0") && ls.contains("10.0.2.15/24"), "{ls}");
    // A user-mode NIC cannot be hot-added, an unknown NIC is named, and no IOMMU here.
    let out = root.run(&["nic", "rm", "web", "nic7"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nic7"), "{}", stderr(&out));
    let out = root.run(&["pci", "add", "web", "0000:03:00"]);
    assert!(
        stderr(&out).contains("not a PCI address"),
        "{}",
        stderr(&out)
    );
    let out = root.run(&["pci", "add", "web", "0000:03:00.0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("IOMMU"), "{}", stderr(&out));
    assert_eq!(root.ok(&["pci", "ls", "web", "--json"]).trim(), "[]");
    root.ok(&["rm", "-f", "web"]);
    root.assert_clean();
}

#[test]
fn real_vm_nics_come_from_namespaces_at_create_and_hot() {
    require_prerequisites();
    if !is_root() {
        eprintln!("skipped: namespaces need root");
        return;
    }
    let ns = |n| uvm_host::net::VethNamespace::new("uvmcli", "uvc", n).expect("make the namespace");
    let (a, b) = (ns(211), ns(212));
    let root = Root::new();
    root.ok(&[
        "create",
        "--name",
        "ns",
        "--netns",
        a.path().to_str().expect("utf-8"),
        "--start",
    ]);
    let addrs = root.ok(&["exec", "ns", "--", "ip", "-o", "addr"]);
    assert!(addrs.contains("10.200.211.2/24"), "{addrs}");
    let added = root.ok(&[
        "nic",
        "add",
        "ns",
        "--netns",
        b.path().to_str().expect("utf-8"),
    ]);
    assert!(
        added.contains("nic1") && added.contains("10.200.212.2/24"),
        "{added}"
    );
    // The namespace it already carries is refused, and its NIC keeps working.
    let a_path = a.path();
    let out = root.run(&[
        "nic",
        "add",
        "ns",
        "--netns",
        a_path.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("carried by nic0"), "{}", stderr(&out));
    let addrs = root.ok(&["exec", "ns", "--", "ip", "-o", "addr"]);
    assert!(addrs.contains("10.200.212.2/24"), "{addrs}");
    let inspect = root.inspect("ns");
    assert_eq!(inspect["nics"].as_array().map(Vec::len), Some(2));
    assert_eq!(inspect["nics"][1]["netns"].as_str(), b.path().to_str());
    root.ok(&["nic", "rm", "ns", "nic1"]);
    let addrs = root.ok(&["exec", "ns", "--", "ip", "-o", "addr"]);
    assert!(!addrs.contains("10.200.212.2"), "{addrs}");
    let out = root.run(&["nic", "add", "ns", "--netns", "/proc/self/ns/mnt"]);
    assert!(
        stderr(&out).contains("not a network namespace"),
        "{}",
        stderr(&out)
    );
    root.ok(&["rm", "-f", "ns"]);
    root.assert_clean();
    for ns in [&a, &b] {
        let links = ns.run(&["ip", "-o", "link"]);
        assert!(!links.contains("uvmtap"), "a tap remains in {}", ns.name());
    }
}
