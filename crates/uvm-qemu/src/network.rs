//! NICs and assigned PCI devices on QEMU: [`uvm::seams::HostNetwork`] and
//! [`uvm::seams::HostPci`].
//!
//! - **User-mode** (`NetworkMode::User`): QEMU's own slirp (`-netdev user`), no host
//!   networking: the guest is `10.0.2.15/24`, its gateway `10.0.2.2` (which is the host's
//!   loopback, as slirp maps it), its resolver `10.0.2.3`; published ports are `hostfwd`
//!   rules, bound where the user said (127.0.0.1 unless told otherwise). Given at create only.
//! - **A namespace** (`NetworkMode::Namespace`, and hot-added NICs): one tap per interface in
//!   that namespace, joined to it with tc ([`uvm_host::net`]); QEMU gets the tap's fd — at
//!   create inherited on its command line (`-netdev tap,fd=N`), hot through QMP `getfd`
//!   (`SCM_RIGHTS`), then `netdev_add` + `device_add`.
//! - `virtio-net-pci` on q35, each behind a PCIe root port of its own (`uvm-devport<i>`): one
//!   per cold NIC plus [`crate::QemuConfig::device_hotplug_ports`] spares, shared with
//!   assigned PCI devices; `virtio-net-device` (virtio-mmio, cold only) on microvm.
//! - **Removal**: `device_del`, the wait for `DEVICE_DELETED`, `netdev_del`, then the
//!   namespace's side (the veth's ingress qdisc) and our copy of the tap's fd: the tap goes with
//!   the last fd. Once QEMU is gone only the host side is left to remove; `release` removes
//!   whatever is left.
//! - **vPCI**: `vfio-pci` by host address, behind a root port. The probe refuses up front what
//!   the host cannot do: no IOMMU groups (these machines), a device that is missing or not bound
//!   to `vfio-pci`, microvm.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Map, Value};
use uvm::devices::network::cold_nic_id;
use uvm::seams::{
    Endpoint, HostNetwork, HostPci, IpNet, MacAddress, NetworkMode, Nic, NicBacking, PciAddress,
    PciLocation, PortPublish, Protocol, Route, VmConfig,
};
use uvm::HostError;
use uvm_host::net::{Interface, Namespace, NetError};

use crate::hotplug::{refused, DeviceAdd, Qmp, Unplugged, UNPLUG_DEADLINE};
use crate::qmp::{Command, Empty};
use crate::vm::QemuVm;
use crate::Machine;

/// Chassis numbers of the device ports start here (the share ports count from 1).
const CHASSIS_BASE: usize = 64;

/// slirp's fixed addresses.
const USER_GUEST: [u8; 4] = [10, 0, 2, 15];
const USER_GATEWAY: [u8; 4] = [10, 0, 2, 2];
/// The resolver slirp offers the guest.
pub const USER_DNS: [u8; 4] = [10, 0, 2, 3];

fn invalid(what: &'static str, message: impl Into<String>) -> HostError {
    HostError::InvalidInput {
        what,
        message: message.into(),
    }
}

fn net_error(operation: &'static str, e: NetError) -> HostError {
    match e {
        NetError::NotANamespace { .. } | NetError::NoInterface { .. } | NetError::InUse { .. } => {
            invalid("network namespace", e.to_string())
        }
        NetError::Io { .. } | NetError::Netlink { .. } => HostError::Failed {
            operation,
            source: Box::new(e),
        },
    }
}

/// The root port id of device port `i`.
pub(crate) fn port_id(i: usize) -> String {
    format!("uvm-devport{i}")
}

/// What carries one NIC on the host.
#[derive(Debug)]
enum Carrier {
    /// A hot add under way: nothing made on the host yet (the namespace's side is filled in by
    /// the thread that makes it, even when the add is cancelled meanwhile).
    Pending,
    User,
    Tap {
        ns: Arc<Namespace>,
        peer_index: u32,
        /// Our copy of the tap's fd: the tap lives while it (or QEMU's) is open.
        fd: Option<OwnedFd>,
    },
}

#[derive(Debug)]
struct NicEntry {
    nic: Nic,
    carrier: Carrier,
    port: Option<usize>,
    /// Plugged into QEMU (cold: from its start).
    plugged: bool,
}

#[derive(Debug, Default)]
struct Book {
    nics: BTreeMap<String, NicEntry>,
    pci: BTreeMap<String, (PciAddress, usize)>,
    /// Device ports in use, with the NIC or PCI device on each.
    ports: BTreeMap<usize, String>,
}

/// One VM's NICs and assigned PCI devices, and the root ports they sit behind.
#[derive(Debug)]
pub(crate) struct Network {
    machine: Machine,
    ports: usize,
    /// Shared with the threads that make taps, which record what they made here.
    book: Arc<Mutex<Book>>,
    sys: std::path::PathBuf,
}

/// The cold NICs of a VM, made at create: QEMU's arguments and the fds it inherits.
#[derive(Debug)]
pub(crate) struct ColdNetwork {
    pub network: Network,
    pub args: Vec<String>,
    pub fds: Vec<RawFd>,
}

fn random_mac() -> MacAddress {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    let b = h.finish().to_le_bytes();
    MacAddress::local([b[0], b[1], b[2]])
}

/// The endpoint of a user-mode NIC.
fn user_endpoint(mac: MacAddress) -> Endpoint {
    Endpoint {
        name: "user".into(),
        mac,
        mtu: 1500,
        addresses: vec![IpNet {
            address: USER_GUEST.into(),
            prefix: 24,
        }],
        routes: vec![Route {
            destination: None,
            gateway: Some(USER_GATEWAY.into()),
        }],
    }
}

/// The endpoint a namespace interface becomes in the guest.
pub(crate) fn endpoint_of(i: &Interface) -> Endpoint {
    Endpoint {
        name: i.name.clone(),
        mac: MacAddress(i.mac),
        mtu: i.mtu,
        addresses: i
            .addresses
            .iter()
            .map(|(address, prefix)| IpNet {
                address: *address,
                prefix: *prefix,
            })
            .collect(),
        routes: i
            .routes
            .iter()
            .map(|(d, g)| Route {
                destination: d.map(|(address, prefix)| IpNet { address, prefix }),
                gateway: *g,
            })
            .collect(),
    }
}

/// Refuses a published port the host has bound already (checked by binding it a moment).
pub(crate) fn check_publish(p: &PortPublish) -> Result<(), HostError> {
    let addr = std::net::SocketAddr::new(p.host_ip, p.host_port);
    let bound = match p.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
    };
    bound.map_err(|e| {
        invalid(
            "published port",
            format!(
                "cannot publish {p}: {addr}/{} on the host: {e}",
                p.protocol.as_str()
            ),
        )
    })
}

/// `hostfwd=` of a published port.
fn hostfwd(p: &PortPublish) -> String {
    let ip = match p.host_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!(
        "hostfwd={}:{ip}:{}-:{}",
        p.protocol.as_str(),
        p.host_port,
        p.guest_port
    )
}

/// QEMU's `-netdev`/`-device` for one cold NIC.
fn cold_nic_args(
    machine: Machine,
    nic: &Nic,
    fd: Option<RawFd>,
    port: Option<usize>,
) -> Vec<String> {
    let netdev = format!("net-{}", nic.id);
    let backend = match (&nic.backing, fd) {
        (NicBacking::User { publish }, _) => {
            let mut opts = format!("user,id={netdev},net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3");
            for p in publish {
                opts.push(',');
                opts.push_str(&hostfwd(p));
            }
            opts
        }
        (NicBacking::Namespace { .. }, Some(fd)) => format!("tap,id={netdev},fd={fd},vhost=off"),
        (NicBacking::Namespace { .. }, None) => format!("tap,id={netdev},vhost=off"),
    };
    let device = match machine {
        Machine::Q35 => format!(
            "virtio-net-pci,id={},netdev={netdev},mac={}{}",
            nic.id,
            nic.endpoint.mac,
            port.map(|p| format!(",bus={}", port_id(p)))
                .unwrap_or_default()
        ),
        Machine::Microvm => format!(
            "virtio-net-device,id={},netdev={netdev},mac={}",
            nic.id, nic.endpoint.mac
        ),
    };
    vec!["-netdev".into(), backend, "-device".into(), device]
}

impl Network {
    /// The cold NICs of `config`, made now (taps in the namespace, joined with tc; published
    /// ports checked), and QEMU's arguments for them and the device ports. Nothing is left on
    /// failure.
    ///
    /// # Errors
    /// [`HostError::InvalidInput`] for a namespace that is missing, not a network namespace or
    /// without a usable interface, or a published port that is bound already.
    pub(crate) fn cold(
        machine: Machine,
        spare_ports: u8,
        config: &VmConfig,
    ) -> Result<ColdNetwork, HostError> {
        let mut nics: Vec<(Nic, Carrier)> = Vec::new();
        match &config.network.mode {
            NetworkMode::None => {}
            NetworkMode::User { publish } => {
                for (i, p) in publish.iter().enumerate() {
                    let twice = publish[..i].iter().any(|q| {
                        (q.protocol, q.host_ip, q.host_port) == (p.protocol, p.host_ip, p.host_port)
                    });
                    if twice {
                        return Err(invalid(
                            "published port",
                            format!(
                                "{}:{}/{} is published twice",
                                p.host_ip,
                                p.host_port,
                                p.protocol.as_str()
                            ),
                        ));
                    }
                    check_publish(p)?;
                }
                nics.push((
                    Nic {
                        id: cold_nic_id(0),
                        endpoint: user_endpoint(random_mac()),
                        backing: NicBacking::User {
                            publish: publish.clone(),
                        },
                    },
                    Carrier::User,
                ));
            }
            NetworkMode::Namespace { path } => {
                let ns = Arc::new(
                    Namespace::open(path).map_err(|e| net_error("open the namespace", e))?,
                );
                let interfaces = ns
                    .interfaces()
                    .map_err(|e| net_error("read the namespace", e))?;
                for (i, iface) in interfaces.iter().enumerate() {
                    match ns.attach(iface) {
                        Ok(tap) => nics.push((
                            Nic {
                                id: cold_nic_id(i),
                                endpoint: endpoint_of(iface),
                                backing: NicBacking::Namespace { path: path.clone() },
                            },
                            Carrier::Tap {
                                ns: ns.clone(),
                                peer_index: tap.peer_index,
                                fd: Some(tap.fd),
                            },
                        )),
                        Err(e) => {
                            for (_, carrier) in &nics {
                                if let Carrier::Tap { ns, peer_index, .. } = carrier {
                                    let _ = ns.detach(*peer_index);
                                }
                            }
                            return Err(net_error("join a tap to the namespace", e));
                        }
                    }
                }
            }
        }
        let q35 = machine == Machine::Q35;
        let ports = if q35 {
            nics.len() + usize::from(spare_ports)
        } else {
            0
        };
        let mut args = Vec::new();
        for port in 0..ports {
            args.extend([
                "-device".to_owned(),
                format!(
                    "pcie-root-port,id={},chassis={}",
                    port_id(port),
                    CHASSIS_BASE + port
                ),
            ]);
        }
        let mut fds = Vec::new();
        let mut book = Book::default();
        for (i, (nic, carrier)) in nics.into_iter().enumerate() {
            let fd = match &carrier {
                Carrier::Tap { fd: Some(fd), .. } => Some(fd.as_raw_fd()),
                Carrier::Tap { fd: None, .. } | Carrier::User | Carrier::Pending => None,
            };
            fds.extend(fd);
            let port = q35.then_some(i);
            args.extend(cold_nic_args(machine, &nic, fd, port));
            if let Some(p) = port {
                book.ports.insert(p, nic.id.clone());
            }
            book.nics.insert(
                nic.id.clone(),
                NicEntry {
                    nic,
                    carrier,
                    port,
                    plugged: true,
                },
            );
        }
        Ok(ColdNetwork {
            network: Network {
                machine,
                ports,
                book: Arc::new(Mutex::new(book)),
                sys: "/sys".into(),
            },
            args,
            fds,
        })
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        uvm_util::lock(&self.book)
    }

    /// The device ports on the command line (q35), for the ACPI-hotplug switch.
    pub(crate) fn ports(&self) -> usize {
        self.ports
    }

    fn free_port(&self, book: &Book) -> Result<usize, HostError> {
        (0..self.ports)
            .find(|p| !book.ports.contains_key(p))
            .ok_or_else(|| HostError::Failed {
                operation: "find a free PCIe hotplug port",
                source: format!(
                    "all {} device ports are in use (QemuConfig::device_hotplug_ports)",
                    self.ports
                )
                .into(),
            })
    }

    /// Removes the host side of every NIC (namespace qdiscs, our tap fds): the VM is gone.
    /// Blocks for the namespace work; see [`Network::release_async`].
    pub(crate) fn release(&self) {
        let entries: Vec<NicEntry> = std::mem::take(&mut self.book().nics)
            .into_values()
            .collect();
        for e in entries {
            let _ = release_carrier(&e.nic.id, e.carrier);
        }
    }

    /// [`Network::release`] off the async threads.
    pub(crate) async fn release_async(&self) {
        let entries: Vec<NicEntry> = std::mem::take(&mut self.book().nics)
            .into_values()
            .collect();
        if entries.is_empty() {
            return;
        }
        let done = tokio::task::spawn_blocking(move || {
            for e in entries {
                let _ = release_carrier(&e.nic.id, e.carrier);
            }
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "removing the NICs' host side failed");
        }
    }
}

/// Removes what carries a NIC on the host: the namespace's redirect, then our copy of the
/// tap's fd (the tap goes with its last fd). On failure the carrier comes back, for a retry.
fn release_carrier(id: &str, carrier: Carrier) -> Result<(), (Carrier, NetError)> {
    match carrier {
        Carrier::Tap { ns, peer_index, fd } => match ns.detach(peer_index) {
            Ok(()) => {
                drop(fd);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(nic = id, error = %uvm_util::error_chain(&e), "removing the namespace's redirect failed");
                Err((Carrier::Tap { ns, peer_index, fd }, e))
            }
        },
        Carrier::User | Carrier::Pending => Ok(()),
    }
}

#[derive(Serialize)]
struct GetFd {
    fdname: String,
}
impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Output = Empty;
}

#[derive(Serialize)]
struct CloseFd {
    fdname: String,
}
impl Command for CloseFd {
    const NAME: &'static str = "closefd";
    type Output = Empty;
}

#[derive(Serialize)]
struct NetdevAdd {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    fd: String,
    vhost: bool,
}
impl Command for NetdevAdd {
    const NAME: &'static str = "netdev_add";
    type Output = Empty;
}

#[derive(Serialize)]
struct NetdevDel {
    id: String,
}
impl Command for NetdevDel {
    const NAME: &'static str = "netdev_del";
    type Output = Empty;
}

impl QemuVm {
    async fn blocking<T: Send + 'static>(
        operation: &'static str,
        f: impl FnOnce() -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, HostError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| HostError::Failed {
                operation,
                source: Box::new(e),
            })?
    }

    /// `getfd` + `netdev_add` + `device_add` of a tap NIC; on failure what was made goes.
    async fn plug_tap(&self, nic: &Nic, fd: &OwnedFd, port: usize) -> Result<(), HostError> {
        const OP: &str = "add NIC";
        let fdname = format!("fd-{}", nic.id);
        let netdev = format!("net-{}", nic.id);
        let qmp = self.qmp().await?;
        let get = GetFd {
            fdname: fdname.clone(),
        };
        match tokio::time::timeout(
            crate::vm::QMP_TIMEOUT,
            qmp.execute_with_fd(&get, fd.as_fd()),
        )
        .await
        {
            Ok(Ok(Empty {})) => {}
            Ok(Err(e)) => {
                return Err(crate::error::QemuError::Qmp {
                    command: "getfd",
                    source: e,
                }
                .into_host(OP))
            }
            Err(_) => {
                return Err(HostError::Timeout {
                    operation: OP,
                    after: crate::vm::QMP_TIMEOUT,
                })
            }
        }
        let add = NetdevAdd {
            kind: "tap",
            id: netdev.clone(),
            fd: fdname.clone(),
            vhost: false,
        };
        // A failure leaves the rest to `add_nic`'s undo (`remove_nic`: netdev_del, closefd).
        if let Qmp::Refused { class, desc } = self.qmp_run(OP, &add).await? {
            return Err(refused(OP, "netdev_add", &class, &desc));
        }
        let mut props = Map::new();
        props.insert("netdev".into(), Value::String(netdev.clone()));
        props.insert("mac".into(), Value::String(nic.endpoint.mac.to_string()));
        props.insert("bus".into(), Value::String(port_id(port)));
        let device = DeviceAdd {
            driver: "virtio-net-pci",
            id: nic.id.clone(),
            props,
        };
        if let Qmp::Refused { class, desc } = self.qmp_run(OP, &device).await? {
            return Err(refused(OP, "device_add", &class, &desc));
        }
        Ok(())
    }
}

#[async_trait]
impl HostNetwork for QemuVm {
    fn check_nic_hotplug(&self) -> Result<(), HostError> {
        self.nic_hotplug()
    }

    fn cold_nics(&self) -> Vec<Nic> {
        let book = self.network.book();
        let mut nics: Vec<Nic> = book.nics.values().map(|e| e.nic.clone()).collect();
        nics.sort_by_key(|n| n.id[3..].parse::<usize>().unwrap_or(usize::MAX));
        nics
    }

    async fn namespace_endpoints(&self, path: &Path) -> Result<Vec<Endpoint>, HostError> {
        let path = path.to_owned();
        Self::blocking("read the namespace", move || {
            let ns = Namespace::open(&path).map_err(|e| net_error("open the namespace", e))?;
            let interfaces = ns
                .interfaces()
                .map_err(|e| net_error("read the namespace", e))?;
            Ok(interfaces.iter().map(endpoint_of).collect())
        })
        .await
    }

    /// Record first, then act: the NIC is in the book (with its port) before the first await,
    /// and each step records what it made, so an add that fails, times out or is dropped
    /// half-way leaves nothing `remove_nic` and `release` do not find.
    async fn add_nic(&self, nic: &Nic) -> Result<(), HostError> {
        let NicBacking::Namespace { path } = &nic.backing else {
            return Err(HostError::Unsupported {
                backend: "qemu",
                operation: "hot-adding a user-mode NIC (give --net user at create)",
            });
        };
        self.nic_hotplug()?;
        {
            let mut book = self.network.book();
            if book.nics.contains_key(&nic.id) {
                return Err(invalid("NIC", format!("{} is plugged already", nic.id)));
            }
            let carried = book.nics.values().find(|e| {
                e.nic.endpoint.mac == nic.endpoint.mac
                    && matches!(&e.nic.backing, NicBacking::Namespace { path: p } if p == path)
            });
            if let Some(other) = carried {
                return Err(invalid(
                    "network namespace",
                    format!(
                        "{} of {} is carried by {} already",
                        nic.endpoint.name,
                        path.display(),
                        other.nic.id
                    ),
                ));
            }
            let port = self.network.free_port(&book)?;
            book.ports.insert(port, nic.id.clone());
            book.nics.insert(
                nic.id.clone(),
                NicEntry {
                    nic: nic.clone(),
                    carrier: Carrier::Pending,
                    port: Some(port),
                    plugged: false,
                },
            );
        }
        let result = self.plug_nic(nic, path).await;
        if let Err(e) = &result {
            // The host add failed: nothing of it may stay (the seam's promise).
            if let Err(undo) = self.remove_nic(&nic.id).await {
                tracing::warn!(nic = %nic.id, error = %uvm_util::error_chain(&undo), "undoing a failed NIC add failed; the VM's release removes the rest");
            }
            tracing::warn!(nic = %nic.id, error = %uvm_util::error_chain(e), "NIC add failed");
        }
        result
    }

    async fn remove_nic(&self, id: &str) -> Result<(), HostError> {
        const OP: &str = "remove NIC";
        let (plugged, port) = match self.network.book().nics.get(id) {
            None => return Ok(()),
            Some(e) => (e.plugged, e.port),
        };
        if plugged {
            if self.qemu_running() {
                self.nic_hotplug()?;
            }
            if self.unplug(OP, id, UNPLUG_DEADLINE).await? == Unplugged::Removed {
                // What a half-done add may have left: the netdev, the fd QEMU keeps by name.
                let del = NetdevDel {
                    id: format!("net-{id}"),
                };
                match self.qmp_run(OP, &del).await {
                    Ok(Qmp::Done(Empty {})) | Err(HostError::Gone) => {}
                    Ok(Qmp::Refused { class, desc })
                        if class == "DeviceNotFound" || desc.contains("not found") =>
                    {
                        tracing::debug!(nic = id, desc, "netdev already gone");
                    }
                    Ok(Qmp::Refused { class, desc }) => {
                        return Err(refused(OP, "netdev_del", &class, &desc))
                    }
                    Err(e) => return Err(e),
                }
                let close = CloseFd {
                    fdname: format!("fd-{id}"),
                };
                let _ = self.qmp_run(OP, &close).await;
            }
            if let Some(e) = self.network.book().nics.get_mut(id) {
                e.plugged = false;
            }
        }
        let carrier = match self.network.book().nics.get_mut(id) {
            Some(e) => std::mem::replace(&mut e.carrier, Carrier::Pending),
            None => return Ok(()),
        };
        let (id_owned, book) = (id.to_owned(), self.network.book.clone());
        Self::blocking("remove the tap", move || {
            match release_carrier(&id_owned, carrier) {
                Ok(()) => {
                    let mut b = uvm_util::lock(&book);
                    b.nics.remove(&id_owned);
                    if let Some(p) = port {
                        b.ports.remove(&p);
                    }
                    Ok(())
                }
                Err((carrier, e)) => {
                    // Kept for a retry: the redirect is still on the namespace's interface.
                    if let Some(entry) = uvm_util::lock(&book).nics.get_mut(&id_owned) {
                        entry.carrier = carrier;
                    }
                    Err(net_error("remove the namespace's redirect", e))
                }
            }
        })
        .await
    }
}

impl QemuVm {
    /// Unsupported where NICs cannot be hot-plugged (microvm: virtio-mmio).
    fn nic_hotplug(&self) -> Result<(), HostError> {
        if self.network.machine == Machine::Microvm {
            return Err(HostError::Unsupported {
                backend: "qemu",
                operation:
                    "hot-plugging NICs on microvm (virtio-mmio cannot; give --netns at create)",
            });
        }
        Ok(())
    }

    /// The steps of a hot add after its booking: the tap in the namespace (recorded by the
    /// thread that makes it), then QEMU's side.
    async fn plug_nic(&self, nic: &Nic, path: &Path) -> Result<(), HostError> {
        let (path, mac, name) = (path.to_owned(), nic.endpoint.mac, nic.endpoint.name.clone());
        let (id, book) = (nic.id.clone(), self.network.book.clone());
        let tap_fd = Self::blocking("join a tap to the namespace", move || {
            let ns = Namespace::open(&path).map_err(|e| net_error("open the namespace", e))?;
            let interfaces = ns
                .interfaces()
                .map_err(|e| net_error("read the namespace", e))?;
            let iface = interfaces
                .iter()
                .find(|i| MacAddress(i.mac) == mac && i.name == name)
                .ok_or_else(|| {
                    invalid(
                        "network namespace",
                        format!(
                            "{} has no interface {name} with MAC {mac} any more",
                            path.display()
                        ),
                    )
                })?;
            let tap = ns
                .attach(iface)
                .map_err(|e| net_error("join a tap to the namespace", e))?;
            let fd = tap.fd.try_clone().map_err(|source| HostError::Io {
                operation: "duplicate the tap's fd",
                source,
            })?;
            let mut b = uvm_util::lock(&book);
            match b.nics.get_mut(&id) {
                Some(entry) => {
                    entry.carrier = Carrier::Tap {
                        ns: Arc::new(ns),
                        peer_index: tap.peer_index,
                        fd: Some(tap.fd),
                    };
                    Ok(fd)
                }
                // Released meanwhile (the VM is going): undo at once.
                None => {
                    drop(b);
                    let _ = ns.detach(tap.peer_index);
                    Err(HostError::Gone)
                }
            }
        })
        .await?;
        let port = self
            .network
            .book()
            .nics
            .get(&nic.id)
            .and_then(|e| e.port)
            .ok_or(HostError::Gone)?;
        if let Some(e) = self.network.book().nics.get_mut(&nic.id) {
            e.plugged = true;
        }
        self.plug_tap(nic, &tap_fd, port).await?;
        tracing::info!(nic = %nic.id, "NIC added");
        Ok(())
    }
}

/// Where `address` is on the host, checked for passthrough (under `sys`, `/sys` on the host).
pub(crate) fn probe_pci_in(
    sys: &Path,
    machine: Machine,
    address: PciAddress,
) -> Result<PciLocation, HostError> {
    if machine == Machine::Microvm {
        return Err(HostError::Unsupported {
            backend: "qemu",
            operation: "PCI passthrough on microvm (it has no PCIe hotplug)",
        });
    }
    let groups = std::fs::read_dir(sys.join("kernel/iommu_groups"))
        .map(|d| d.count())
        .unwrap_or(0);
    if groups == 0 {
        return Err(HostError::Unsupported {
            backend: "qemu",
            operation: "PCI passthrough: this host has no IOMMU groups (no IOMMU, or it is off: \
                        VT-d/AMD-Vi in the firmware and intel_iommu=on or amd_iommu=on)",
        });
    }
    let dev = sys.join("bus/pci/devices").join(address.to_string());
    if !dev.exists() {
        return Err(invalid(
            "PCI device",
            format!("the host has no PCI device {address}"),
        ));
    }
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(invalid(
            "PCI device",
            format!(
                "{address} is bound to {}, not vfio-pci (bind it to vfio-pci first)",
                driver.as_deref().unwrap_or("no driver")
            ),
        ));
    }
    let id = |file: &str| -> Result<u16, HostError> {
        let s = std::fs::read_to_string(dev.join(file)).map_err(|source| HostError::Io {
            operation: "read the PCI device's ids",
            source,
        })?;
        u16::from_str_radix(s.trim().trim_start_matches("0x"), 16)
            .map_err(|_| invalid("PCI device", format!("{address}'s {file} is {s:?}")))
    };
    Ok(PciLocation {
        vendor: id("vendor")?,
        device: id("device")?,
    })
}

#[async_trait]
impl HostPci for QemuVm {
    async fn probe_pci(&self, address: PciAddress) -> Result<PciLocation, HostError> {
        probe_pci_in(&self.network.sys, self.network.machine, address)
    }

    /// Record first (the device and its port in the book before QEMU is asked), so an add
    /// that fails or is dropped half-way is found by `remove_pci`.
    async fn add_pci(&self, id: &str, address: PciAddress) -> Result<(), HostError> {
        const OP: &str = "add PCI device";
        let port = {
            let mut book = self.network.book();
            let port = self.network.free_port(&book)?;
            book.ports.insert(port, id.to_owned());
            book.pci.insert(id.to_owned(), (address, port));
            port
        };
        let device = DeviceAdd {
            driver: "vfio-pci",
            id: id.to_owned(),
            props: pci_props(address, port),
        };
        match self.qmp_run(OP, &device).await {
            Ok(Qmp::Done(Empty {})) => Ok(()),
            Ok(Qmp::Refused { class, desc }) => {
                let mut book = self.network.book();
                book.pci.remove(id);
                book.ports.remove(&port);
                Err(refused(OP, "device_add", &class, &desc))
            }
            // Unknown whether QEMU took it: removed as if it had.
            Err(e) => {
                if let Err(undo) = self.remove_pci(id).await {
                    tracing::warn!(id, error = %uvm_util::error_chain(&undo), "undoing a failed PCI add failed");
                }
                Err(e)
            }
        }
    }

    async fn remove_pci(&self, id: &str) -> Result<(), HostError> {
        let Some((_, port)) = self.network.book().pci.get(id).copied() else {
            return Ok(());
        };
        self.unplug("remove PCI device", id, UNPLUG_DEADLINE)
            .await?;
        let mut book = self.network.book();
        book.pci.remove(id);
        book.ports.remove(&port);
        Ok(())
    }
}

/// `device_add vfio-pci`'s properties for `address` behind device port `port`.
pub(crate) fn pci_props(address: PciAddress, port: usize) -> Map<String, Value> {
    let Value::Object(props) = json!({ "host": address.to_string(), "bus": port_id(port) }) else {
        unreachable!("a JSON object literal is an object")
    };
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm::seams::{NetworkConfig, Protocol};

    fn user_config(publish: Vec<PortPublish>) -> VmConfig {
        VmConfig {
            network: NetworkConfig {
                mode: NetworkMode::User { publish },
                ..NetworkConfig::default()
            },
            ..VmConfig::default()
        }
    }

    #[test]
    fn user_mode_is_slirp_with_each_published_port_bound_where_asked() {
        let publish = vec![
            PortPublish {
                protocol: Protocol::Tcp,
                host_ip: [127, 0, 0, 1].into(),
                host_port: free_port(),
                guest_port: 80,
            },
            PortPublish {
                protocol: Protocol::Udp,
                host_ip: "::1".parse().expect("a test value"),
                host_port: free_port(),
                guest_port: 53,
            },
        ];
        let cold =
            Network::cold(Machine::Q35, 1, &user_config(publish.clone())).expect("a test value");
        let netdev = cold
            .args
            .iter()
            .find(|a| a.starts_with("user,"))
            .expect("a test value");
        assert!(netdev.starts_with("user,id=net-nic0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3"));
        assert!(netdev.contains(&format!(
            "hostfwd=tcp:127.0.0.1:{}-:80",
            publish[0].host_port
        )));
        assert!(netdev.contains(&format!("hostfwd=udp:[::1]:{}-:53", publish[1].host_port)));
        let device = cold
            .args
            .iter()
            .find(|a| a.starts_with("virtio-net-pci"))
            .expect("a test value");
        assert!(device.contains("netdev=net-nic0") && device.contains(",bus=uvm-devport0"));
        assert_eq!(cold.network.ports(), 2, "one for the NIC, one spare");
        assert!(cold.fds.is_empty());
        let nics = cold.network.book().nics.len();
        assert_eq!(nics, 1);
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a test value")
    }

    #[test]
    fn a_published_port_the_host_has_bound_is_refused_before_anything_starts() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a test value");
        let port = taken.local_addr().expect("a test value").port();
        let p = PortPublish {
            protocol: Protocol::Tcp,
            host_ip: [127, 0, 0, 1].into(),
            host_port: port,
            guest_port: 80,
        };
        let err = Network::cold(Machine::Q35, 1, &user_config(vec![p])).expect_err("refused");
        assert!(
            matches!(&err, HostError::InvalidInput { what: "published port", message } if message.contains(&port.to_string())),
            "{err:?}"
        );
    }

    #[test]
    fn microvm_nics_are_virtio_mmio_without_ports() {
        let cold = Network::cold(Machine::Microvm, 1, &user_config(vec![])).expect("a test value");
        assert!(cold
            .args
            .iter()
            .any(|a| a.starts_with("virtio-net-device,id=nic0")));
        assert!(!cold.args.iter().any(|a| a.contains("pcie-root-port")));
    }

    #[test]
    fn a_namespace_path_that_is_not_one_is_invalid_input() {
        let config = VmConfig {
            network: NetworkConfig {
                mode: NetworkMode::Namespace {
                    path: "/proc/self/ns/mnt".into(),
                },
                ..NetworkConfig::default()
            },
            ..VmConfig::default()
        };
        let err = Network::cold(Machine::Q35, 1, &config).expect_err("refused");
        assert!(
            matches!(
                err,
                HostError::InvalidInput {
                    what: "network namespace",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    fn sysfs(groups: usize, driver: Option<&str>) -> tempfile::TempDir {
        let sys = tempfile::tempdir().expect("a test value");
        std::fs::create_dir_all(sys.path().join("kernel/iommu_groups")).expect("a test value");
        for g in 0..groups {
            std::fs::create_dir(sys.path().join(format!("kernel/iommu_groups/{g}")))
                .expect("a test value");
        }
        let dev = sys.path().join("bus/pci/devices/0000:03:00.0");
        std::fs::create_dir_all(&dev).expect("a test value");
        std::fs::write(dev.join("vendor"), "0x8086\n").expect("a test value");
        std::fs::write(dev.join("device"), "0x10fb\n").expect("a test value");
        if let Some(d) = driver {
            let drv = sys.path().join("bus/pci/drivers").join(d);
            std::fs::create_dir_all(&drv).expect("a test value");
            std::os::unix::fs::symlink(&drv, dev.join("driver")).expect("a test value");
        }
        sys
    }

    #[test]
    fn pci_passthrough_without_iommu_groups_is_unsupported_naming_why() {
        let sys = sysfs(0, Some("vfio-pci"));
        let err = probe_pci_in(
            sys.path(),
            Machine::Q35,
            "0000:03:00.0".parse().expect("a test value"),
        )
        .expect_err("refused");
        assert!(
            matches!(err, HostError::Unsupported { operation, .. } if operation.contains("no IOMMU groups"))
        );
        // And on this machine, which has none.
        let err = probe_pci_in(
            Path::new("/sys"),
            Machine::Q35,
            "0000:00:00.0".parse().expect("a test value"),
        )
        .expect_err("refused");
        assert!(matches!(err, HostError::Unsupported { .. }), "{err:?}");
    }

    #[test]
    fn pci_passthrough_needs_the_device_bound_to_vfio_pci() {
        let sys = sysfs(1, Some("ixgbe"));
        let err = probe_pci_in(
            sys.path(),
            Machine::Q35,
            "0000:03:00.0".parse().expect("a test value"),
        )
        .expect_err("refused");
        assert!(
            matches!(&err, HostError::InvalidInput { message, .. } if message.contains("ixgbe")),
            "{err:?}"
        );
        let err = probe_pci_in(
            sys.path(),
            Machine::Q35,
            "0000:04:00.0".parse().expect("a test value"),
        )
        .expect_err("refused");
        assert!(matches!(err, HostError::InvalidInput { .. }));
        let sys = sysfs(1, Some("vfio-pci"));
        let loc = probe_pci_in(
            sys.path(),
            Machine::Q35,
            "0000:03:00.0".parse().expect("a test value"),
        )
        .expect("a test value");
        assert_eq!((loc.vendor, loc.device), (0x8086, 0x10fb));
        let err = probe_pci_in(
            sys.path(),
            Machine::Microvm,
            "0000:03:00.0".parse().expect("a test value"),
        )
        .expect_err("refused");
        assert!(matches!(err, HostError::Unsupported { .. }));
    }

    #[test]
    fn a_vfio_device_is_added_by_host_address_behind_its_port() {
        let props = pci_props("0000:03:00.1".parse().expect("a test value"), 2);
        assert_eq!(props["host"], "0000:03:00.1");
        assert_eq!(props["bus"], "uvm-devport2");
    }
}
