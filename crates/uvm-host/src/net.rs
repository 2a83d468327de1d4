//! Network namespaces someone else made (the CNI model), and taps joined to their interfaces.
//!
//! A NIC of a VM in a namespace is a tap *inside* that namespace, joined to the namespace's
//! interface (a veth, usually) by two tc rules: an ingress qdisc on each with a u32 match-all
//! filter whose action is `mirred egress redirect` to the other — Kata's "tcfilter" model. The
//! namespace's own stack never sees the veth's traffic; the guest, with the veth's MAC and
//! addresses, does. The tap is not persistent: it lives while someone (QEMU, or us until we hand
//! it over) holds its fd, so a VM that dies takes its tap with it; the veth's ingress qdisc is
//! ours to remove ([`Namespace::detach`]).
//!
//! Every netlink call runs on a short-lived thread that has entered the namespace (`setns`),
//! with a current-thread runtime of its own: the caller's threads never change namespace.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::address::AddressScope;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteProtocol};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The prefix of our taps' names (`uvmtap0`, …): never offered as an endpoint.
pub const TAP_PREFIX: &str = "uvmtap";

/// `NSFS_MAGIC`: the filesystem of `/proc/PID/ns/*` and their bind mounts.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `ETH_P_ALL`, as tc's `protocol all`: the kernel reads the filter's protocol in network
/// byte order.
const ETH_P_ALL: u16 = 0x0003_u16.to_be();

/// Why a namespace or tap operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The path is missing or not a network namespace; the message says which.
    #[error("{path}: {reason}")]
    NotANamespace {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// The namespace has no interface a NIC can carry.
    #[error("{path} has no usable interface (an Ethernet interface other than lo and our taps)")]
    NoInterface {
        /// The namespace.
        path: PathBuf,
    },
    /// The interface has an ingress qdisc already: another NIC (of this VM or another) carries
    /// it, or someone's tc set-up uses it. Nothing was changed.
    #[error("link {index} is in use: it has an ingress qdisc already (another NIC carries it, or a tc set-up of someone else's)")]
    InUse {
        /// The interface's index.
        index: u32,
    },
    /// A system call failed.
    #[error("cannot {op}")]
    Io {
        /// What was attempted.
        op: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("cannot {op}: {reason}")]
    Netlink {
        /// What was attempted.
        op: String,
        /// What netlink said.
        reason: String,
    },
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Io { op, source }
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |e| NetError::Netlink {
        op,
        reason: e.to_string(),
    }
}

/// A route: its destination (`None` for the default route) and gateway (`None` on the link).
pub type RouteEntry = (Option<(IpAddr, u8)>, Option<IpAddr>);

/// An interface of a namespace, as a NIC would carry it into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its index in the namespace.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses (link-local ones left out: the guest makes its own).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Its routes in the main table other than those the kernel made for its addresses:
    /// `(destination, gateway)`, `None` destination for the default route.
    pub routes: Vec<RouteEntry>,
}

/// A tap joined to an interface of a namespace.
#[derive(Debug)]
pub struct Tap {
    /// The tap's fd (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), close-on-exec.
    pub fd: OwnedFd,
    /// Its name in the namespace.
    pub name: String,
    /// The interface it is joined to.
    pub peer_index: u32,
}

/// An open network namespace.
#[derive(Debug)]
pub struct Namespace {
    path: PathBuf,
    file: File,
}

impl Namespace {
    /// Open `path` and check that it is a network namespace.
    ///
    /// # Errors
    /// [`NetError::NotANamespace`] when it is missing or something else.
    pub fn open(path: &Path) -> Result<Namespace, NetError> {
        let not = |reason: String| NetError::NotANamespace {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(|e| not(format!("cannot open it: {e}")))?;
        // SAFETY: `statfs` is plain data; fstatfs fills it for an fd we own.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a pointer to a statfs that lives across the call.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(not(format!("fstatfs: {}", std::io::Error::last_os_error())));
        }
        if fs.f_type != NSFS_MAGIC {
            return Err(not("not a namespace file (nsfs)".into()));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(not("a namespace, but not a network namespace".into()));
        }
        Ok(Namespace {
            path: path.to_owned(),
            file,
        })
    }

    /// The namespace's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread that has entered the namespace (sockets it makes are the
    /// namespace's); the caller joins it.
    ///
    /// # Errors
    /// The thread could not be made; entering the namespace fails inside it.
    pub fn spawn<T, F>(
        &self,
        f: F,
    ) -> Result<std::thread::JoinHandle<Result<T, NetError>>, NetError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, NetError> + Send + 'static,
    {
        let fd = self
            .file
            .try_clone()
            .map_err(io("duplicate the namespace fd"))?;
        std::thread::Builder::new()
            .name("uvm-netns".into())
            .spawn(move || {
                // SAFETY: setns on this thread only, with a network namespace fd we hold.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetError::Io {
                        op: "enter the network namespace".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                f()
            })
            .map_err(io("spawn the namespace thread"))
    }

    /// Runs `f` with a netlink handle inside the namespace, on a thread of its own.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, NetError>>,
    {
        let thread = self.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io("start a runtime in the namespace"))?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(io("open rtnetlink"))?;
                let task = tokio::spawn(conn);
                let out = f(handle).await;
                task.abort();
                out
            })
        })?;
        thread.join().unwrap_or_else(|_| {
            Err(NetError::Io {
                op: "run in the network namespace".into(),
                source: std::io::Error::other("the namespace thread panicked"),
            })
        })
    }

    /// The interfaces a NIC can carry — Ethernet links other than `lo` and our taps — with
    /// their addresses and routes, the primary one (`eth0`, else the first by name) first.
    ///
    /// # Errors
    /// [`NetError::NoInterface`] when there is none; a netlink failure.
    pub fn interfaces(&self) -> Result<Vec<Interface>, NetError> {
        let path = self.path.clone();
        let mut found = self.run(|handle| async move { read_interfaces(&handle).await })?;
        if found.is_empty() {
            return Err(NetError::NoInterface { path });
        }
        found.sort_by(|a, b| (a.name != "eth0", &a.name).cmp(&(b.name != "eth0", &b.name)));
        Ok(found)
    }

    /// Make a tap in the namespace, with `peer`'s MTU, and join it to `peer` both ways.
    /// Nothing is left on failure.
    ///
    /// # Errors
    /// `/dev/net/tun` or a netlink request failed.
    pub fn attach(&self, peer: &Interface) -> Result<Tap, NetError> {
        let (peer_index, mtu) = (peer.index, peer.mtu);
        self.run(move |handle| async move {
            let (fd, name) = open_tap()?;
            let mut made_peer = false;
            match join(&handle, &name, peer_index, mtu, &mut made_peer).await {
                Ok(()) => Ok(Tap {
                    fd,
                    name,
                    peer_index,
                }),
                Err(e) => {
                    if made_peer {
                        let _ = del_ingress(&handle, peer_index).await;
                    }
                    Err(e)
                }
            }
        })
    }

    /// Undo [`Namespace::attach`] on the namespace's side: the peer's ingress qdisc (and its
    /// redirect) goes. The tap goes when its last fd closes. Harmless when already gone.
    ///
    /// # Errors
    /// A netlink request failed.
    pub fn detach(&self, peer_index: u32) -> Result<(), NetError> {
        self.run(move |handle| async move { del_ingress(&handle, peer_index).await })
    }
}

async fn read_interfaces(handle: &Handle) -> Result<Vec<Interface>, NetError> {
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(nl("list links"))? {
        if link.header.link_layer_type != LinkLayerType::Ether {
            continue;
        }
        let mut name = String::new();
        let mut mac = None;
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name.clone_from(n),
                LinkAttribute::Address(m) => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let Some(mac) = mac else { continue };
        if name == "lo" || name.starts_with(TAP_PREFIX) {
            continue;
        }
        out.push(Interface {
            index: link.header.index,
            name,
            mac,
            mtu,
            addresses: Vec::new(),
            routes: Vec::new(),
        });
    }
    let mut addresses = handle.address().get().execute();
    while let Some(a) = addresses.try_next().await.map_err(nl("list addresses"))? {
        if a.header.scope == AddressScope::Link {
            continue;
        }
        let Some(iface) = out.iter_mut().find(|i| i.index == a.header.index) else {
            continue;
        };
        let addr = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = addr {
            iface.addresses.push((ip, a.header.prefix_len));
        }
    }
    for family in [false, true] {
        let query = if family {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let mut routes = handle.route().get(query).execute();
        while let Some(r) = routes.try_next().await.map_err(nl("list routes"))? {
            if r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.protocol == RouteProtocol::Kernel
            {
                continue;
            }
            let mut oif = None;
            let mut dest = None;
            let mut gateway = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(d) => dest = route_ip(d),
                    RouteAttribute::Gateway(g) => gateway = route_ip(g),
                    _ => {}
                }
            }
            let Some(iface) = out.iter_mut().find(|i| Some(i.index) == oif) else {
                continue;
            };
            let destination = dest.map(|d| (d, r.header.destination_prefix_length));
            // An IPv6 route to fe80::/64 is the kernel's even when its protocol says otherwise.
            let link_local =
                matches!(destination, Some((IpAddr::V6(v6), _)) if v6.segments()[0] == 0xfe80);
            if !link_local {
                iface.routes.push((destination, gateway));
            }
        }
    }
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A new tap (`uvmtapN`, the kernel picks N) in the calling thread's namespace.
fn open_tap() -> Result<(OwnedFd, String), NetError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io("open /dev/net/tun"))?;
    // SAFETY: `ifreq` is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let template = format!("{TAP_PREFIX}%d");
    for (dst, src) in req.ifr_name.iter_mut().zip(template.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(NetError::Io {
            op: "create a tap (TUNSETIFF)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let name: String = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    Ok((tun.into(), name))
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await.map_err(nl(format!("find {name}")))? {
        Some(l) => Ok(l.header.index),
        None => Err(NetError::Netlink {
            op: format!("find {name}"),
            reason: "no such link".into(),
        }),
    }
}

/// Joins `tap` and `peer` both ways. The peer's ingress qdisc is made here, and an existing one
/// (another NIC's redirect, someone's tc set-up) is refused as [`NetError::InUse`], never
/// touched. On failure the caller removes the peer's qdisc only if `made_peer` says it was
/// made here.
async fn join(
    handle: &Handle,
    tap: &str,
    peer: u32,
    mtu: u32,
    made_peer: &mut bool,
) -> Result<(), NetError> {
    let tap_index = link_index(handle, tap).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("bring {tap} up")))?;
    for (from, to) in [(peer, tap_index), (tap_index, peer)] {
        let from_i32 = i32::try_from(from).unwrap_or(i32::MAX);
        match handle.qdisc().add(from_i32).ingress().execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m))
                if from == peer && m.raw_code().abs() == libc::EEXIST =>
            {
                return Err(NetError::InUse { index: peer });
            }
            Err(e) => return Err(nl(format!("add an ingress qdisc to link {from}"))(e)),
        }
        if from == peer {
            *made_peer = true;
        }
        handle
            .traffic_filter(from_i32)
            .add()
            .parent(0xffff_0000)
            .protocol(ETH_P_ALL)
            .redirect(to)
            .map_err(nl("build the redirect"))?
            .execute()
            .await
            .map_err(nl(format!("redirect link {from} to link {to}")))?;
    }
    Ok(())
}

async fn del_ingress(handle: &Handle, index: u32) -> Result<(), NetError> {
    let mut req = handle.qdisc().del(i32::try_from(index).unwrap_or(i32::MAX));
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    match req.execute().await {
        Ok(()) => Ok(()),
        // No such qdisc (EINVAL/ENOENT) or no such link (ENODEV): already gone.
        Err(rtnetlink::Error::NetlinkError(m))
            if matches!(
                m.raw_code().abs(),
                libc::EINVAL | libc::ENOENT | libc::ENODEV
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(nl(format!("remove the ingress qdisc of link {index}"))(e)),
    }
}

/// A network namespace with one veth pair, made with iproute2 for the tests and the benchmark
/// (the CNI model's stand-in): `eth0` = `10.200.<n>.2/24` inside, with a default route via
/// `10.200.<n>.1`, which is the host end's address. Both ends go on drop.
#[derive(Debug)]
pub struct VethNamespace {
    name: String,
    host_end: String,
    n: u8,
}

impl VethNamespace {
    /// Makes `<prefix>-<n>-<pid>` and its veth (host end `<short>-<n>-<pid>`, at most 15 bytes).
    ///
    /// # Errors
    /// An `ip` command failed (not root, a name taken): its message. Whatever was made goes.
    pub fn new(prefix: &str, short: &str, n: u8) -> Result<VethNamespace, NetError> {
        let pid = std::process::id() % 10_000;
        let ns = VethNamespace {
            name: format!("{prefix}-{n}-{pid}"),
            host_end: format!("{short}{n}-{pid}"),
            n,
        };
        let inside = format!("{}/24", ns.guest_ip());
        let outside = format!("{}/24", ns.host_ip());
        let steps: [&[&str]; 8] = [
            &["netns", "add", &ns.name],
            &[
                "link",
                "add",
                &ns.host_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ],
            &["-n", &ns.name, "link", "set", "lo", "up"],
            &["-n", &ns.name, "link", "set", "eth0", "up"],
            &["-n", &ns.name, "addr", "add", &inside, "dev", "eth0"],
            &[
                "-n",
                &ns.name,
                "route",
                "add",
                "default",
                "via",
                &ns.host_ip(),
            ],
            &["addr", "add", &outside, "dev", &ns.host_end],
            &["link", "set", &ns.host_end, "up"],
        ];
        for args in steps {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(io("run ip"))?;
            if !out.status.success() {
                return Err(NetError::Io {
                    op: format!("ip {}", args.join(" ")),
                    source: std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    ),
                });
            }
        }
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its path, `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    /// `eth0`'s address inside (the guest's, once a VM carries it).
    pub fn guest_ip(&self) -> String {
        format!("10.200.{}.2", self.n)
    }
    /// The host end's address.
    pub fn host_ip(&self) -> String {
        format!("10.200.{}.1", self.n)
    }
    /// What `cmd` prints on stdout run inside the namespace (`ip netns exec`).
    pub fn run(&self, cmd: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for VethNamespace {
    fn drop(&mut self) {
        for args in [
            ["link", "del", self.host_end.as_str()],
            ["netns", "del", self.name.as_str()],
        ] {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Clears close-on-exec on `fd` in a child between fork and exec, so the program inherits it at
/// the same number. Async-signal-safe.
///
/// # Errors
/// The `fcntl` failed.
pub fn inherit_in_child(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd number; no memory is touched.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_is_not_a_namespace_is_refused_with_what_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").expect("write");
        for (path, says) in [
            (file.as_path(), "nsfs"),
            (Path::new("/nonexistent/netns/x"), "cannot open"),
        ] {
            let err = Namespace::open(path).expect_err("refused");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn a_namespace_of_another_kind_is_refused() {
        let err = Namespace::open(Path::new("/proc/self/ns/mnt")).expect_err("a mount namespace");
        assert!(err.to_string().contains("not a network namespace"), "{err}");
    }
}
