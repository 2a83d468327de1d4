//! Networking on real VMs: NICs from network namespaces this test makes and removes itself (a
//! veth pair, addresses in 10.200.0.0/16 only inside it), hot-added and removed, and user-mode
//! networking with a published port on 127.0.0.1. No traffic goes anywhere but loopback and
//! the namespaces made here.
//!
//! Every test is named `real_vm_*` (nextest's `real-vm` group), needs root (namespaces, taps)
//! and the default image (`make setup`, `make agent`). A failing test still cleans up: the
//! namespace and the host end of its veth go on drop, QEMU and its taps with the VM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use uvm::devices::network::{NetworkState, NicState};
use uvm::seams::{ExecRequest, NetworkConfig, NetworkMode, PortPublish, Protocol};
use uvm::testing::Capture;
use uvm::{State, Timeouts};
use uvm_host::net::VethNamespace;
use uvm_host::processes_mentioning;
use uvm_vm::{default_image, Machine, Vm, VmOptions};

/// A namespace of this test's: `eth0` = 10.200.<n>.2/24 inside, its host end .1.
fn test_ns(n: u8) -> VethNamespace {
    VethNamespace::new("uvmtest", "uvh", n).expect("make the namespace")
}

/// Neither a tap of ours nor a tc filter is left in the namespace.
fn assert_clean(ns: &VethNamespace) {
    let links = ns.run(&["ip", "-o", "link"]);
    assert!(!links.contains("uvmtap"), "a tap remains: {links}");
    let filters = ns.run(&["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.trim().is_empty(), "a tc filter remains: {filters}");
}

/// A one-request HTTP server on `addr` answering `body`, on a thread.
fn serve_once(addr: &str, body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).expect("bind the test server");
    let at = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    at
}

/// GET / from `addr`, retried for a few seconds (a server just started); the response.
fn http_get(addr: SocketAddr) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            });
        match attempt {
            Ok(out) if !out.is_empty() => return out,
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(out) => return out,
            Err(e) => panic!("GET {addr}: {e}"),
        }
    }
}

/// A guest script that GETs `/` from `ip:port` with busybox nc (busybox's static wget crashes
/// in its name-service lookups) and prints the response.
fn fetch(ip: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {ip} {port}")
}

struct TestVm {
    vm: Vm,
    root: tempfile::TempDir,
}

async fn booted(machine: Machine, network: NetworkConfig) -> TestVm {
    let image = default_image().expect("build the guest image");
    let root = tempfile::Builder::new()
        .prefix("uvmn")
        .tempdir_in("/tmp")
        .expect("runtime root");
    let options = VmOptions {
        machine,
        runtime_root: Some(root.path().to_path_buf()),
        timeouts: Timeouts {
            guest_connect: Duration::from_secs(90),
            ..Timeouts::default()
        },
        network,
        ..VmOptions::default()
    };
    let t = TestVm {
        vm: Vm::new(&image, options),
        root,
    };
    t.vm.boot().await.expect("boot");
    assert_eq!(t.vm.controller.state(), State::Running);
    t
}

impl TestVm {
    async fn ok(&self, script: &str) -> String {
        let (out, err) = (Capture::default(), Capture::default());
        let mut req = ExecRequest::new(["sh", "-c", script]);
        req.stdout = Some(Box::new(out.clone()));
        req.stderr = Some(Box::new(err.clone()));
        let code = self.vm.controller.exec_into_host(req).await.expect("exec");
        assert_eq!(code, 0, "{script}: {}", err.text());
        out.text()
    }

    /// A web server in the guest on port 8080 answering `body`.
    async fn serve(&self, body: &str) {
        self.ok(&format!(
            "mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && \
             httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1"
        ))
        .await;
    }

    async fn finish(self) {
        self.vm.controller.terminate_vm().await.expect("terminate");
        assert_eq!(self.vm.controller.state(), State::Terminated);
        let left = processes_mentioning(self.root.path());
        assert!(left.is_empty(), "processes of the VM remain: {left:?}");
    }
}

fn root_or_skip() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("skipped: namespaces and taps need root");
    }
    root
}

fn netns(path: PathBuf) -> NetworkConfig {
    NetworkConfig {
        mode: NetworkMode::Namespace { path },
        ..NetworkConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_namespace_nic_carries_traffic_both_ways_and_leaves_nothing() {
    if !root_or_skip() {
        return;
    }
    let ns = test_ns(201);
    let t = booted(Machine::Q35, netns(ns.path())).await;
    let net = t.vm.controller.network();
    assert_eq!(net.state, NetworkState::Configured);
    assert_eq!(net.nics.len(), 1);
    assert_eq!(net.nics[0].state, NicState::Configured);
    let addrs = t.ok("ip -o addr show").await;
    assert!(addrs.contains(&format!("{}/24", ns.guest_ip())), "{addrs}");
    let routes = t.ok("ip route").await;
    assert!(
        routes.contains(&format!("default via {}", ns.host_ip())),
        "{routes}"
    );

    // The host end of the veth reaches a server in the guest at the namespace's address.
    t.serve("from-the-guest").await;
    let got = http_get(format!("{}:8080", ns.guest_ip()).parse().expect("addr"));
    assert!(got.contains("from-the-guest"), "{got}");
    // And the guest reaches a server on the host end.
    let at = serve_once(&format!("{}:0", ns.host_ip()), "from-the-host");
    let got = t.ok(&fetch(&at.ip().to_string(), at.port())).await;
    assert!(got.ends_with("from-the-host"), "{got}");

    t.finish().await;
    assert_clean(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_nic_is_hot_added_from_a_namespace_and_hot_removed_without_a_trace() {
    if !root_or_skip() {
        return;
    }
    let t = booted(Machine::Q35, NetworkConfig::default()).await;
    let ns = test_ns(202);
    let ids = t.vm.controller.add_nics(&ns.path()).await.expect("nic add");
    assert_eq!(ids, ["nic0"]);
    let addrs = t.ok("ip -o addr show").await;
    assert!(addrs.contains(&format!("{}/24", ns.guest_ip())), "{addrs}");
    t.serve("hot").await;
    let got = http_get(format!("{}:8080", ns.guest_ip()).parse().expect("addr"));
    assert!(got.contains("hot"), "{got}");

    t.vm.controller.remove_nic("nic0").await.expect("nic rm");
    assert!(t.vm.controller.network().nics.is_empty());
    let addrs = t.ok("ip -o addr show").await;
    assert!(!addrs.contains(&ns.guest_ip()), "{addrs}");
    assert_clean(&ns);

    // A namespace that is not one, and one without interfaces, change nothing.
    let err =
        t.vm.controller
            .add_nics(std::path::Path::new("/proc/self/ns/mnt"))
            .await
            .expect_err("not a network namespace");
    assert!(
        format!("{err:?}").contains("not a network namespace"),
        "{err:?}"
    );
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_user_mode_publishes_a_guest_port_on_loopback_and_reaches_the_host() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let publish = PortPublish {
        protocol: Protocol::Tcp,
        host_ip: [127, 0, 0, 1].into(),
        host_port: port,
        guest_port: 8080,
    };
    let t = booted(
        Machine::Q35,
        NetworkConfig {
            mode: NetworkMode::User {
                publish: vec![publish],
            },
            ..NetworkConfig::default()
        },
    )
    .await;
    let resolv = t.ok("cat /etc/resolv.conf").await;
    assert!(resolv.contains("nameserver 10.0.2.3"), "{resolv}");
    t.serve("published").await;
    let got = http_get(format!("127.0.0.1:{port}").parse().expect("addr"));
    assert!(got.contains("published"), "{got}");
    // The user-mode gateway is the host's loopback.
    let at = serve_once("127.0.0.1:0", "through-slirp");
    let got = t.ok(&fetch("10.0.2.2", at.port())).await;
    assert!(got.ends_with("through-slirp"), "{got}");
    t.finish().await;
    // The published port is free again.
    TcpListener::bind(("127.0.0.1", port)).expect("the port is released with the VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_microvm_takes_a_cold_user_mode_nic() {
    let t = booted(
        Machine::Microvm,
        NetworkConfig {
            mode: NetworkMode::User { publish: vec![] },
            ..NetworkConfig::default()
        },
    )
    .await;
    let addrs = t.ok("ip -o addr show").await;
    assert!(addrs.contains("10.0.2.15/24"), "{addrs}");
    let at = serve_once("127.0.0.1:0", "micro");
    let got = t.ok(&fetch("10.0.2.2", at.port())).await;
    assert!(got.ends_with("micro"), "{got}");
    t.finish().await;
}
