//! TCP between the host and a guest, against the same between two namespaces over a veth
//! alone, all in one run: round trips (one byte each way, `TCP_NODELAY`) and throughput (bytes
//! sent until the receiver confirmed them), with [`uvm_util::tcp_probe`] on both ends.
//!
//! - **veth** (the baseline): a namespace made here holding `eth0` = 10.200.90.2/24, its
//!   peer on the host 10.200.90.1/24; the server is a thread inside the namespace.
//! - **namespace NIC**: a VM created in that namespace (its `eth0` redirected to the VM's tap,
//!   so the same address is now the guest's); the server is `uvm-agent probe tcp-serve`.
//! - **user-mode**: a VM with `--net user` and the server's port published on 127.0.0.1.
//! - **hot-add**: a NIC hot-added to the user-mode VM from a second namespace (10.200.91.0/24)
//!   until configured in the guest, then removed; each round.
//!
//! Needs root (namespaces, taps); the namespaces, veths and VMs are removed after a failure
//! too. No traffic leaves loopback and these namespaces.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use uvm::seams::{ExecRequest, NetworkConfig, NetworkMode, PortPublish, Protocol};
use uvm_image::Image;
use uvm_vm::{Vm, VmOptions};

use super::stats::Summary;
use super::BenchError;

/// The guest port the probe server listens on.
const PORT: u16 = 9000;

/// How much to measure.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// Round trips per path.
    pub round_trips: usize,
    /// Throughput runs per path.
    pub transfers: usize,
    /// Bytes per throughput run.
    pub transfer_bytes: u64,
    /// NIC hot-adds.
    pub hot_adds: usize,
}

impl NetworkOptions {
    /// The counts of a normal run, or of `--quick`.
    pub fn new(quick: bool) -> NetworkOptions {
        NetworkOptions {
            round_trips: if quick { 200 } else { 1000 },
            transfers: if quick { 3 } else { 5 },
            transfer_bytes: if quick { 16 << 20 } else { 64 << 20 },
            hot_adds: if quick { 2 } else { 4 },
        }
    }
}

/// One path's samples.
#[derive(Debug, Clone, Default)]
pub struct PathSamples {
    pub rtt: Vec<Duration>,
    pub mib_s: Vec<f64>,
}

/// The samples of one run.
#[derive(Debug, Clone, Default)]
pub struct NetworkSamples {
    pub veth: PathSamples,
    pub netns: PathSamples,
    pub user: PathSamples,
    /// NIC hot-add → configured in the guest.
    pub hot_add: Vec<Duration>,
}

/// One path's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PathReport {
    pub rtt_ms: Summary,
    pub mib_s: Summary,
}

/// The figures.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkReport {
    pub veth: PathReport,
    pub netns: PathReport,
    pub user: PathReport,
    pub hot_add_ms: Summary,
}

impl NetworkReport {
    /// Round-trip p50 of the namespace NIC over the veth alone.
    pub fn netns_rtt_ratio(&self) -> f64 {
        self.netns.rtt_ms.median / self.veth.rtt_ms.median
    }
    /// Round-trip p50 of user-mode over the veth alone.
    pub fn user_rtt_ratio(&self) -> f64 {
        self.user.rtt_ms.median / self.veth.rtt_ms.median
    }
    /// Throughput p50 of the namespace NIC over the veth alone.
    pub fn netns_throughput_ratio(&self) -> f64 {
        self.netns.mib_s.median / self.veth.mib_s.median
    }
    /// Throughput p50 of user-mode over the veth alone.
    pub fn user_throughput_ratio(&self) -> f64 {
        self.user.mib_s.median / self.veth.mib_s.median
    }
}

impl NetworkReport {
    /// The JSON object under the report's `network` key.
    pub fn to_json(&self) -> serde_json::Value {
        let path = |p: &PathReport| serde_json::json!({ "rtt_ms": p.rtt_ms, "mib_s": p.mib_s });
        serde_json::json!({
            "veth": path(&self.veth),
            "netns_nic": path(&self.netns),
            "user_mode": path(&self.user),
            "netns_rtt_over_veth": self.netns_rtt_ratio(),
            "user_rtt_over_veth": self.user_rtt_ratio(),
            "netns_throughput_over_veth": self.netns_throughput_ratio(),
            "user_throughput_over_veth": self.user_throughput_ratio(),
            "nic_hot_add_ms": self.hot_add_ms,
        })
    }

    /// The table's section.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nnetwork, TCP guest ↔ host          rtt p50 ms  × veth   MiB/s p50  × veth"
        );
        for (name, p) in [
            ("two namespaces over a veth", &self.veth),
            ("namespace NIC (tap + tc)", &self.netns),
            ("user-mode (slirp, published)", &self.user),
        ] {
            let _ = writeln!(
                t,
                "{name:<34} {:>10.3} {:>7.2} {:>11.1} {:>7.2}",
                p.rtt_ms.median,
                p.rtt_ms.median / self.veth.rtt_ms.median,
                p.mib_s.median,
                p.mib_s.median / self.veth.mib_s.median
            );
        }
        let _ = writeln!(
            t,
            "{:<34} {:>10.1}  (n = {})",
            "NIC hot-add → configured, ms p50", self.hot_add_ms.median, self.hot_add_ms.n
        );
        t
    }
}

impl NetworkSamples {
    /// The figures; an error if a path has no samples.
    pub fn summarize(&self) -> Result<NetworkReport, BenchError> {
        let path = |p: &PathSamples, what: &'static str| -> Result<PathReport, BenchError> {
            Ok(PathReport {
                rtt_ms: Summary::of_durations(&p.rtt).ok_or(BenchError::NoSamples(what))?,
                mib_s: Summary::of(&p.mib_s).ok_or(BenchError::NoSamples(what))?,
            })
        };
        Ok(NetworkReport {
            veth: path(&self.veth, "veth")?,
            netns: path(&self.netns, "namespace NIC")?,
            user: path(&self.user, "user-mode NIC")?,
            hot_add_ms: Summary::of_durations(&self.hot_add)
                .ok_or(BenchError::NoSamples("NIC hot-add"))?,
        })
    }
}

fn failed(what: &'static str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Io {
        operation: what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Round trips and transfers to `addr`, off the async threads.
async fn measure(addr: SocketAddr, opts: &NetworkOptions) -> Result<PathSamples, BenchError> {
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || {
        // The first connection may race the server's start: retry it a little.
        let deadline = Instant::now() + Duration::from_secs(20);
        let rtt = loop {
            match uvm_util::tcp_probe::round_trips(addr, opts.round_trips) {
                Ok(r) => break r,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(failed("measure round trips", e)),
            }
        };
        let mut mib_s = Vec::new();
        for _ in 0..opts.transfers {
            mib_s.push(
                uvm_util::tcp_probe::throughput(addr, opts.transfer_bytes)
                    .map_err(|e| failed("measure throughput", e))?,
            );
        }
        Ok(PathSamples { rtt, mib_s })
    })
    .await
    .map_err(|e| failed("join the measuring thread", e))?
}

/// Starts the probe server in the guest, in the background.
async fn serve_in(vm: &Vm) -> Result<(), BenchError> {
    let script = format!("/init probe tcp-serve {PORT} </dev/null >/dev/null 2>&1 &");
    let code = vm
        .controller
        .exec_into_host(ExecRequest::new(["sh", "-c", &script]))
        .await
        .map_err(|source| BenchError::Controller {
            what: "start the guest's probe server",
            source,
        })?;
    if code != 0 {
        return Err(failed(
            "start the guest's probe server",
            format!("exit {code}"),
        ));
    }
    Ok(())
}

async fn boot(
    image: &Image,
    options: &VmOptions,
    network: NetworkConfig,
) -> Result<Vm, BenchError> {
    let vm = Vm::new(
        image,
        VmOptions {
            network,
            ..options.clone()
        },
    );
    vm.boot().await.map_err(|source| BenchError::Controller {
        what: "start a networked VM",
        source,
    })?;
    Ok(vm)
}

/// Measures every path; tears everything down (also after a failure).
pub async fn run(
    image: &Image,
    options: &VmOptions,
    opts: &NetworkOptions,
) -> Result<NetworkSamples, BenchError> {
    let make = |n| {
        uvm_host::net::VethNamespace::new("uvmbench", "uvb", n)
            .map_err(|e| failed("set up a benchmark namespace", e))
    };
    let (ns, hot) = (make(90)?, make(91)?);
    let mut samples = NetworkSamples::default();

    // The baseline: a server inside the namespace, the client on the host end.
    let namespace =
        uvm_host::net::Namespace::open(&ns.path()).map_err(|e| failed("open the namespace", e))?;
    let listener = namespace
        .spawn(|| {
            std::net::TcpListener::bind(("10.200.90.2", PORT)).map_err(|source| {
                uvm_host::net::NetError::Io {
                    op: "bind the baseline server".into(),
                    source,
                }
            })
        })
        .map_err(|e| failed("start the baseline server", e))?
        .join()
        .map_err(|_| failed("start the baseline server", "its thread panicked"))?
        .map_err(|e| failed("start the baseline server", e))?;
    let at: SocketAddr = ([10, 200, 90, 2], PORT).into();
    let connections = 1 + opts.transfers;
    let server = std::thread::spawn(move || {
        // One connection per measurement, then the listener goes with the thread.
        for _ in 0..connections {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = uvm_util::tcp_probe::serve_one(s);
                }
                Err(_) => return,
            }
        }
    });
    samples.veth = measure(at, opts).await?;
    let _ = tokio::task::spawn_blocking(move || server.join()).await;

    // The same namespace, now the VM's.
    let netns_vm = boot(
        image,
        options,
        NetworkConfig {
            mode: NetworkMode::Namespace { path: ns.path() },
            ..NetworkConfig::default()
        },
    )
    .await?;
    let result = async {
        serve_in(&netns_vm).await?;
        measure(at, opts).await
    }
    .await;
    let _ = netns_vm.controller.terminate_vm().await;
    samples.netns = result?;

    // User-mode, the port published on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| failed("find a free port", e))?
        .port();
    let user_vm = boot(
        image,
        options,
        NetworkConfig {
            mode: NetworkMode::User {
                publish: vec![PortPublish {
                    protocol: Protocol::Tcp,
                    host_ip: [127, 0, 0, 1].into(),
                    host_port: port,
                    guest_port: PORT,
                }],
            },
            ..NetworkConfig::default()
        },
    )
    .await?;
    let result = async {
        serve_in(&user_vm).await?;
        let user = measure(([127, 0, 0, 1], port).into(), opts).await?;
        let mut hot_add = Vec::new();
        for _ in 0..opts.hot_adds {
            let t = Instant::now();
            let ids = user_vm
                .controller
                .add_nics(&hot.path())
                .await
                .map_err(|source| BenchError::Controller {
                    what: "hot-add a NIC",
                    source,
                })?;
            hot_add.push(t.elapsed());
            for id in ids {
                user_vm.controller.remove_nic(&id).await.map_err(|source| {
                    BenchError::Controller {
                        what: "remove a NIC",
                        source,
                    }
                })?;
            }
        }
        Ok::<_, BenchError>((user, hot_add))
    }
    .await;
    let _ = user_vm.controller.terminate_vm().await;
    let (user, hot_add) = result?;
    samples.user = user;
    samples.hot_add = hot_add;
    Ok(samples)
}
