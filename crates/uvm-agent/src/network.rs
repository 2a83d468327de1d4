//! Network interfaces, the resolver and assigned PCI devices: `ConfigureInterface`,
//! `DeconfigureInterface`, `ConfigureDns`, `WaitPciDevice`.
//!
//! Interfaces are found by MAC over rtnetlink (a hot-added NIC is waited for, up to the
//! request's `wait_ms`), then given their MTU, brought up, and given their addresses and routes
//! — each "replace" or "exists already is fine", so a retried request is harmless. Everything is
//! parsed and checked before the first change. Deconfiguring takes the addresses away and the
//! link down (its routes go with them); an interface that is gone is already deconfigured.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use uvm_agent_proto::agent::{
    ConfigureDnsRequest, ConfigureInterfaceRequest, DeconfigureInterfaceRequest,
    WaitPciDeviceRequest,
};
use uvm_agent_proto::{MAX_DEVICE_WAIT_MS, MAX_NETWORK_ITEMS};

use crate::error::ApiError;

/// How often a hot-added interface or device is looked for while it is awaited.
const POLL: Duration = Duration::from_millis(10);

/// A route as the request gives it, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    /// `None` is the default route of the gateway's family.
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
}

/// A `ConfigureInterface` request, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interface {
    mac: [u8; 6],
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
    routes: Vec<Route>,
    wait: Duration,
}

fn parse_mac(s: &str) -> Result<[u8; 6], ApiError> {
    let bad = || ApiError::invalid("mac", format!("{s:?} is not a MAC address"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn parse_net(field: &'static str, s: &str) -> Result<(IpAddr, u8), ApiError> {
    let bad = || ApiError::invalid(field, format!("{s:?} is not ADDRESS/PREFIX"));
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn check_count(field: &'static str, n: usize) -> Result<(), ApiError> {
    if n > MAX_NETWORK_ITEMS {
        return Err(ApiError::invalid(
            field,
            format!("{n} given, at most {MAX_NETWORK_ITEMS}"),
        ));
    }
    Ok(())
}

fn parse_interface(req: &ConfigureInterfaceRequest) -> Result<Interface, ApiError> {
    let mac = parse_mac(&req.mac)?;
    if !(68..=65535).contains(&req.mtu) {
        return Err(ApiError::invalid(
            "mtu",
            format!("{} is outside 68-65535", req.mtu),
        ));
    }
    check_count("addresses", req.addresses.len())?;
    check_count("routes", req.routes.len())?;
    let addresses = req
        .addresses
        .iter()
        .map(|a| parse_net("address", a))
        .collect::<Result<Vec<_>, _>>()?;
    let routes = req
        .routes
        .iter()
        .map(|r| {
            let destination = match r.destination.as_str() {
                "" => None,
                d => Some(parse_net("route destination", d)?),
            };
            let gateway = match r.gateway.as_str() {
                "" => None,
                g => Some(g.parse::<IpAddr>().map_err(|_| {
                    ApiError::invalid("route gateway", format!("{g:?} is not an IP address"))
                })?),
            };
            if destination.is_none() && gateway.is_none() {
                return Err(ApiError::invalid(
                    "route",
                    "a default route needs a gateway",
                ));
            }
            Ok(Route {
                destination,
                gateway,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Interface {
        mac,
        mtu: req.mtu,
        addresses,
        routes,
        wait: Duration::from_millis(u64::from(req.wait_ms.min(MAX_DEVICE_WAIT_MS))),
    })
}

fn netlink_err(
    op: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> ApiError {
    let target = target.into();
    move |e| ApiError::Network {
        op,
        target,
        errno: match &e {
            rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
            _ => 0,
        },
        reason: e.to_string(),
    }
}

/// A netlink connection for one request (its task ends with the handle).
fn connect() -> Result<Handle, ApiError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| ApiError::Network {
        op: "open",
        target: "rtnetlink".into(),
        errno: e.raw_os_error().unwrap_or(0),
        reason: e.to_string(),
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn mac_of(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

/// The index of the interface with `mac`, if there is one now.
async fn find_link(handle: &Handle, mac: &[u8; 6]) -> Result<Option<u32>, ApiError> {
    let mut links = handle.link().get().execute();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(netlink_err("list", "links"))?
    {
        if mac_of(&link) == Some(mac.as_slice()) {
            return Ok(Some(link.header.index));
        }
    }
    Ok(None)
}

fn show_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `ConfigureInterface`.
pub async fn configure_interface(req: &ConfigureInterfaceRequest) -> Result<(), ApiError> {
    let iface = parse_interface(req)?;
    let handle = connect()?;
    let shown = show_mac(&iface.mac);
    let deadline = Instant::now() + iface.wait;
    let index = loop {
        if let Some(index) = find_link(&handle, &iface.mac).await? {
            break index;
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NoDevice {
                what: format!(
                    "no network interface has MAC {shown} (waited {} ms)",
                    iface.wait.as_millis()
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    };
    bring_up_loopback(&handle).await?;
    let link = LinkUnspec::new_with_index(index)
        .mtu(iface.mtu)
        .up()
        .build();
    handle
        .link()
        .set(link)
        .execute()
        .await
        .map_err(netlink_err("set up", shown.clone()))?;
    for (addr, prefix) in &iface.addresses {
        handle
            .address()
            .add(index, *addr, *prefix)
            .replace()
            .execute()
            .await
            .map_err(netlink_err("add address to", shown.clone()))?;
    }
    // Routes on the link first: a gateway outside the interface's subnets (Calico's
    // 169.254.1.1) is reachable only once its own link route is there.
    let (on_link, via): (Vec<&Route>, Vec<&Route>) =
        iface.routes.iter().partition(|r| r.gateway.is_none());
    for route in on_link.into_iter().chain(via) {
        add_route(&handle, index, route, &shown).await?;
    }
    Ok(())
}

async fn bring_up_loopback(handle: &Handle) -> Result<(), ApiError> {
    let lo = LinkUnspec::new_with_name("lo").up().build();
    handle
        .link()
        .set(lo)
        .execute()
        .await
        .map_err(netlink_err("set up", "lo"))
}

fn bad_route(e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid("route", e.to_string())
}

async fn add_route(
    handle: &Handle,
    index: u32,
    route: &Route,
    shown: &str,
) -> Result<(), ApiError> {
    let (dest, prefix) = match (route.destination, route.gateway) {
        (Some(d), _) => d,
        (None, Some(IpAddr::V4(_))) => (IpAddr::from([0u8; 4]), 0),
        (None, Some(IpAddr::V6(_))) => (IpAddr::from([0u16; 8]), 0),
        (None, None) => {
            return Err(ApiError::invalid(
                "route",
                "a default route needs a gateway",
            ))
        }
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, prefix)
        .map_err(bad_route)?
        .output_interface(index);
    builder = match route.gateway {
        Some(gw) => builder.gateway(gw).map_err(bad_route)?,
        None => builder.scope(RouteScope::Link),
    };
    match handle
        .route()
        .add(builder.build())
        .replace()
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) => Err(netlink_err("add route via", shown.to_owned())(e)),
    }
}

/// `DeconfigureInterface`.
pub async fn deconfigure_interface(req: &DeconfigureInterfaceRequest) -> Result<(), ApiError> {
    let mac = parse_mac(&req.mac)?;
    let handle = connect()?;
    let shown = show_mac(&mac);
    let Some(index) = find_link(&handle, &mac).await? else {
        return Ok(());
    };
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut found = Vec::new();
    while let Some(a) = addresses
        .try_next()
        .await
        .map_err(netlink_err("list addresses of", shown.clone()))?
    {
        found.push(a);
    }
    for a in found {
        handle
            .address()
            .del(a)
            .execute()
            .await
            .map_err(netlink_err("remove an address from", shown.clone()))?;
    }
    let down = LinkUnspec::new_with_index(index).down().build();
    match handle.link().set(down).execute().await {
        Ok(()) => Ok(()),
        // Gone meanwhile (unplugged): deconfigured.
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENODEV => Ok(()),
        Err(e) => Err(netlink_err("set down", shown)(e)),
    }
}

/// The `/etc/resolv.conf` for `req`, or `None` to leave it as it is.
fn resolv_conf(req: &ConfigureDnsRequest) -> Result<Option<String>, ApiError> {
    check_count("nameservers", req.nameservers.len())?;
    check_count("search", req.search.len())?;
    if req.nameservers.is_empty() && req.search.is_empty() {
        return Ok(None);
    }
    let mut out = String::from("# written by uvm-agent\n");
    for ns in &req.nameservers {
        let ip: IpAddr = ns
            .parse()
            .map_err(|_| ApiError::invalid("nameserver", format!("{ns:?} is not an IP address")))?;
        out.push_str(&format!("nameserver {ip}\n"));
    }
    if !req.search.is_empty() {
        for d in &req.search {
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
            if !ok {
                return Err(ApiError::invalid(
                    "search",
                    format!("{d:?} is not a domain"),
                ));
            }
        }
        out.push_str(&format!("search {}\n", req.search.join(" ")));
    }
    Ok(Some(out))
}

/// The lines `req` adds to `/etc/hosts`.
fn hosts_lines(req: &ConfigureDnsRequest) -> Result<String, ApiError> {
    check_count("hosts", req.hosts.len())?;
    let mut out = String::new();
    for line in &req.hosts {
        let mut words = line.split_whitespace();
        let ip = words.next().unwrap_or_default();
        ip.parse::<IpAddr>().map_err(|_| {
            ApiError::invalid(
                "hosts",
                format!("{line:?} does not start with an IP address"),
            )
        })?;
        let names: Vec<&str> = words.collect();
        let names_ok = !names.is_empty()
            && names.iter().all(|n| {
                n.len() <= 253
                    && n.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
            });
        if !names_ok {
            return Err(ApiError::invalid(
                "hosts",
                format!("{line:?} names no valid host"),
            ));
        }
        out.push_str(&format!("{ip} {}\n", names.join(" ")));
    }
    Ok(out)
}

fn write_replacing(path: &Path, content: &str) -> Result<(), ApiError> {
    let err = |op: &'static str| {
        let path = path.display().to_string();
        move |source| ApiError::File { op, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("create the directory of"))?;
    }
    let temp = path.with_extension("uvm-tmp");
    std::fs::write(&temp, content).map_err(err("write"))?;
    std::fs::rename(&temp, path).map_err(err("replace"))
}

/// `ConfigureDns`: checks everything, then replaces `/etc/resolv.conf` and adds to
/// `/etc/hosts` (under `root`, `/` in the guest).
pub fn configure_dns(root: &Path, req: &ConfigureDnsRequest) -> Result<(), ApiError> {
    let resolv = resolv_conf(req)?;
    let hosts = hosts_lines(req)?;
    if let Some(resolv) = resolv {
        write_replacing(&root.join("etc/resolv.conf"), &resolv)?;
    }
    if !hosts.is_empty() {
        let path = root.join("etc/hosts");
        let mut current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.is_empty() {
            current.push_str("127.0.0.1 localhost\n::1 localhost\n");
        }
        if !current.ends_with('\n') {
            current.push('\n');
        }
        for line in hosts.lines() {
            if !current.lines().any(|l| l == line) {
                current.push_str(line);
                current.push('\n');
            }
        }
        write_replacing(&path, &current)?;
    }
    Ok(())
}

/// Whether `/sys/bus/pci/devices` (under `sys`) has a device `vendor:device` with a driver bound.
fn pci_device_present(sys: &Path, vendor: u16, device: u16) -> bool {
    let Ok(entries) = std::fs::read_dir(sys.join("bus/pci/devices")) else {
        return false;
    };
    let hex = |p: &Path| -> Option<u16> {
        let s = std::fs::read_to_string(p).ok()?;
        u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
    };
    entries.flatten().any(|e| {
        let dir = e.path();
        hex(&dir.join("vendor")) == Some(vendor)
            && hex(&dir.join("device")) == Some(device)
            && dir.join("driver").exists()
    })
}

/// `WaitPciDevice`: until a device with the ids has a driver, up to `wait_ms`.
pub async fn wait_pci_device(sys: &Path, req: &WaitPciDeviceRequest) -> Result<(), ApiError> {
    let vendor = u16::try_from(req.vendor)
        .map_err(|_| ApiError::invalid("vendor", format!("{:#x} is not a PCI id", req.vendor)))?;
    let device = u16::try_from(req.device)
        .map_err(|_| ApiError::invalid("device", format!("{:#x} is not a PCI id", req.device)))?;
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_DEVICE_WAIT_MS)));
    let deadline = Instant::now() + wait;
    loop {
        if pci_device_present(sys, vendor, device) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NoDevice {
                what: format!(
                    "no PCI device {vendor:04x}:{device:04x} with a driver appeared (waited {} ms)",
                    wait.as_millis()
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm_agent_proto::agent::NetworkRoute;

    fn request() -> ConfigureInterfaceRequest {
        ConfigureInterfaceRequest {
            mac: "52:54:00:00:00:01".into(),
            mtu: 1500,
            addresses: vec!["10.200.1.2/24".into(), "fd00::2/64".into()],
            routes: vec![NetworkRoute {
                gateway: "10.200.1.1".into(),
                ..NetworkRoute::default()
            }],
            wait_ms: 100,
            ..ConfigureInterfaceRequest::default()
        }
    }

    #[test]
    fn a_well_formed_interface_request_parses() {
        let i = parse_interface(&request()).expect("a test value");
        assert_eq!(i.mac, [0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(i.addresses.len(), 2);
        assert_eq!(i.routes[0].destination, None);
        assert_eq!(i.wait, Duration::from_millis(100));
    }

    #[test]
    fn malformed_interface_requests_are_refused_before_anything_changes() {
        let cases: Vec<fn(&mut ConfigureInterfaceRequest)> = vec![
            |r| r.mac = "52:54:00:00:01".into(),
            |r| r.mtu = 10,
            |r| r.addresses.push("10.0.0.1".into()),
            |r| r.addresses.push("10.0.0.1/33".into()),
            |r| r.routes.push(NetworkRoute::default()),
            |r| {
                r.routes.push(NetworkRoute {
                    gateway: "nope".into(),
                    ..NetworkRoute::default()
                })
            },
            |r| r.addresses = vec!["10.0.0.1/8".into(); MAX_NETWORK_ITEMS + 1],
        ];
        for (i, change) in cases.into_iter().enumerate() {
            let mut r = request();
            change(&mut r);
            let err = parse_interface(&r).expect_err("refused");
            assert!(
                matches!(err, ApiError::InvalidArgument { .. }),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn dns_replaces_resolv_conf_and_adds_each_hosts_line_once() {
        let root = tempfile::tempdir().expect("a test value");
        std::fs::create_dir(root.path().join("etc")).expect("a test value");
        std::fs::write(root.path().join("etc/hosts"), "127.0.0.1 localhost\n")
            .expect("a test value");
        let req = ConfigureDnsRequest {
            nameservers: vec!["10.0.2.3".into()],
            search: vec!["example.internal".into()],
            hosts: vec!["10.200.0.1 gateway gw".into()],
            ..ConfigureDnsRequest::default()
        };
        configure_dns(root.path(), &req).expect("a test value");
        configure_dns(root.path(), &req).expect("a test value");
        let resolv =
            std::fs::read_to_string(root.path().join("etc/resolv.conf")).expect("a test value");
        assert!(resolv.contains("nameserver 10.0.2.3\n"));
        assert!(resolv.contains("search example.internal\n"));
        let hosts = std::fs::read_to_string(root.path().join("etc/hosts")).expect("a test value");
        assert_eq!(hosts, "127.0.0.1 localhost\n10.200.0.1 gateway gw\n");
    }

    #[test]
    fn a_bad_dns_request_writes_nothing() {
        let root = tempfile::tempdir().expect("a test value");
        let req = ConfigureDnsRequest {
            nameservers: vec!["10.0.2.3".into()],
            hosts: vec!["not-an-ip name".into()],
            ..ConfigureDnsRequest::default()
        };
        assert!(configure_dns(root.path(), &req).is_err());
        assert!(!root.path().join("etc/resolv.conf").exists());
    }

    #[test]
    fn a_pci_device_counts_once_its_driver_is_bound() {
        let sys = tempfile::tempdir().expect("a test value");
        let dev = sys.path().join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dev).expect("a test value");
        std::fs::write(dev.join("vendor"), "0x1af4\n").expect("a test value");
        std::fs::write(dev.join("device"), "0x1041\n").expect("a test value");
        assert!(!pci_device_present(sys.path(), 0x1af4, 0x1041));
        std::fs::create_dir(dev.join("driver")).expect("a test value");
        assert!(pci_device_present(sys.path(), 0x1af4, 0x1041));
        assert!(!pci_device_present(sys.path(), 0x1af4, 0x1042));
    }
}
