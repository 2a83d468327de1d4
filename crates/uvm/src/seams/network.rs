//! The network seams: NICs on the host ([`HostNetwork`]) and their configuration in the guest
//! ([`GuestNetwork`]). The network sub-controller (`crate::devices::network`) decides NIC ids,
//! order and unwinding; these traits only plug, unplug and configure.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use async_trait::async_trait;

use crate::error::{GuestError, HostError};

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts
                .next()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("{s:?} is not a MAC address (six hex pairs with ':')"))?;
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| format!("{s:?} is not a MAC address (six hex pairs with ':')"))?;
        }
        if parts.next().is_some() {
            return Err(format!(
                "{s:?} is not a MAC address (six hex pairs with ':')"
            ));
        }
        Ok(MacAddress(bytes))
    }
}

impl MacAddress {
    /// A locally administered unicast address in QEMU's `52:54:00` range with the last three
    /// bytes from `seed`.
    pub fn local(seed: [u8; 3]) -> MacAddress {
        MacAddress([0x52, 0x54, 0x00, seed[0], seed[1], seed[2]])
    }
}

/// An address with its prefix length (`10.200.0.2/24`, `fd00::2/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address.
    pub address: IpAddr,
    /// Its prefix length (≤ 32 for IPv4, ≤ 128 for IPv6).
    pub prefix: u8,
}

impl IpNet {
    /// `address/prefix`, if the prefix fits the address family.
    pub fn new(address: IpAddr, prefix: u8) -> Result<IpNet, String> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is too long for {address}"));
        }
        Ok(IpNet { address, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        IpNet::new(address, prefix)
    }
}

/// A route the guest interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    /// Where it leads; `None` is the default route.
    pub destination: Option<IpNet>,
    /// Through which gateway; `None` for a route on the link.
    pub gateway: Option<IpAddr>,
}

/// One network interface as the guest should see it: what a NIC carries from the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Its name on the host (the veth in the namespace, or `user`).
    pub name: String,
    /// The MAC the guest interface takes (the veth's, so the peer's neighbour entries hold).
    pub mac: MacAddress,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses.
    pub addresses: Vec<IpNet>,
    /// Its routes (the default route among them, if any).
    pub routes: Vec<Route>,
}

/// Where a NIC's traffic goes on the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NicBacking {
    /// User-mode networking inside the VM process (QEMU's slirp), with published ports.
    User {
        /// Host ports forwarded to the guest.
        publish: Vec<PortPublish>,
    },
    /// A tap inside a network namespace, joined to the endpoint's interface there with tc
    /// (ingress redirect both ways).
    Namespace {
        /// The namespace (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
        path: PathBuf,
    },
}

/// A NIC: its id in the VM, what it carries and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nic {
    /// Its id in the VM (`nic0`, `nic1`, …): never reused within a VM.
    pub id: String,
    /// The interface it carries into the guest.
    pub endpoint: Endpoint,
    /// Where its traffic goes.
    pub backing: NicBacking,
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A host port forwarded to a guest port (user-mode networking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortPublish {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The host address to listen on (127.0.0.1 unless told otherwise).
    pub host_ip: IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The guest port it reaches.
    pub guest_port: u16,
}

impl fmt::Display for PortPublish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_ip,
            self.host_port,
            self.guest_port,
            self.protocol.as_str()
        )
    }
}

impl FromStr for PortPublish {
    type Err = String;
    /// `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`; an IPv6 host address goes in brackets.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ports, protocol) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some((_, other)) => return Err(format!("protocol {other:?} is neither tcp nor udp")),
            None => (s, Protocol::Tcp),
        };
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
                Ok(n) => Ok(n),
            }
        };
        let (host, guest) = ports
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]"))?;
        let guest_port = port(guest)?;
        let (host_ip, host_port) = match host.rsplit_once(':') {
            Some((ip, p)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("{ip:?} is not an IP address"))?;
                (ip, port(p)?)
            }
            None => (IpAddr::from([127, 0, 0, 1]), port(host)?),
        };
        Ok(PortPublish {
            protocol,
            host_ip,
            host_port,
            guest_port,
        })
    }
}

/// The guest's resolver and hosts file; empty parts are left as the guest has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// `nameserver` lines of `/etc/resolv.conf`.
    pub nameservers: Vec<IpAddr>,
    /// Its `search` domains.
    pub search: Vec<String>,
    /// Lines added to `/etc/hosts`: an address and its names.
    pub hosts: Vec<(IpAddr, Vec<String>)>,
}

impl DnsConfig {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.search.is_empty() && self.hosts.is_empty()
    }
}

/// How a VM is networked from its start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// No NIC (NICs from a namespace may still be hot-added).
    #[default]
    None,
    /// One user-mode NIC with outbound connectivity and published ports.
    User {
        /// Host ports forwarded to the guest.
        publish: Vec<PortPublish>,
    },
    /// One NIC per interface of a network namespace someone else made (the CNI model).
    Namespace {
        /// The namespace's path.
        path: PathBuf,
    },
}

/// A VM's network at create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Its NICs from the start.
    pub mode: NetworkMode,
    /// The guest's resolver and hosts entries, written at start when not empty.
    pub dns: DnsConfig,
}

/// NICs of one VM on the host. Each call is one NIC; the controller orders and unwinds them.
#[async_trait]
pub trait HostNetwork: Send + Sync {
    /// Whether NICs can be hot-plugged and unplugged here, before anything is asked. No I/O.
    ///
    /// # Errors
    /// [`HostError::Unsupported`] where they cannot (a machine without hotplug).
    fn check_nic_hotplug(&self) -> Result<(), HostError>;
    /// The NICs the backend plugged cold at create, primary first. No I/O.
    fn cold_nics(&self) -> Vec<Nic>;
    /// The interfaces of the network namespace at `path` a NIC can carry, the primary one
    /// (`eth0`, else the first by name) first. Reads only.
    ///
    /// # Errors
    /// [`HostError::InvalidInput`] for a path that is missing or not a network namespace, or a
    /// namespace with no usable interface; [`HostError::Unsupported`] where the host cannot.
    async fn namespace_endpoints(&self, path: &std::path::Path)
        -> Result<Vec<Endpoint>, HostError>;
    /// Hot-plug `nic`. A failure leaves nothing of it on the host.
    ///
    /// # Errors
    /// [`HostError::Unsupported`] where the machine cannot hot-plug or the backing is not
    /// possible here; [`HostError::InvalidInput`] for a backing that does not hold; or the
    /// plug failed.
    async fn add_nic(&self, nic: &Nic) -> Result<(), HostError>;
    /// Unplug the NIC `id` (hot or cold) and remove what carried it on the host (tap, tc
    /// filters). Harmless on an unknown id; works once the VM process is gone too.
    ///
    /// # Errors
    /// [`HostError::Timeout`] when the guest did not let go in time (retryable), or a step
    /// failed (retryable).
    async fn remove_nic(&self, id: &str) -> Result<(), HostError>;
}

/// Network configuration inside the guest. Interfaces are found by MAC.
#[async_trait]
pub trait GuestNetwork: Send + Sync {
    /// Wait (under the link's deadline) for the interface with `endpoint.mac`, then give it the
    /// endpoint's MTU, addresses and routes and bring it up.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] not found (no such interface in time), invalid argument (an
    /// address or route the kernel refused); or the link failed.
    async fn configure_interface(&self, endpoint: &Endpoint) -> Result<(), GuestError>;
    /// Take the interface with `mac` down and remove its addresses and routes, before the host
    /// unplugs it. Harmless when it is gone.
    ///
    /// # Errors
    /// The guest refused, or the link failed.
    async fn deconfigure_interface(&self, mac: MacAddress) -> Result<(), GuestError>;
    /// Write the guest's `/etc/resolv.conf` and add to its `/etc/hosts`.
    ///
    /// # Errors
    /// The guest refused, or the link failed.
    async fn configure_dns(&self, dns: &DnsConfig) -> Result<(), GuestError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_spec_binds_loopback_and_tcp_unless_told_otherwise() {
        let p: PortPublish = "8080:80".parse().expect("a test value");
        assert_eq!(p.host_ip, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(
            (p.host_port, p.guest_port, p.protocol),
            (8080, 80, Protocol::Tcp)
        );
        let p: PortPublish = "0.0.0.0:53:5353/udp".parse().expect("a test value");
        assert_eq!(p.host_ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(
            (p.host_port, p.guest_port, p.protocol),
            (53, 5353, Protocol::Udp)
        );
        let p: PortPublish = "[::1]:8080:80".parse().expect("a test value");
        assert_eq!(p.host_ip, "::1".parse::<IpAddr>().expect("a test value"));
    }

    #[test]
    fn malformed_publish_specs_are_refused_with_the_reason() {
        for bad in [
            "80",
            "0:80",
            "8080:0",
            "x:80",
            "1.2.3:8080:80",
            "8080:80/sctp",
            "70000:80",
        ] {
            assert!(bad.parse::<PortPublish>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn mac_addresses_round_trip_and_malformed_ones_are_refused() {
        let mac: MacAddress = "52:54:00:ab:cd:ef".parse().expect("a test value");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "zz:54:00:ab:cd:ef",
            "525400abcdef",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn prefixes_longer_than_the_family_allows_are_refused() {
        assert!("10.0.0.1/33".parse::<IpNet>().is_err());
        assert!("fd00::1/129".parse::<IpNet>().is_err());
        assert_eq!(
            "10.200.0.2/24"
                .parse::<IpNet>()
                .expect("a test value")
                .to_string(),
            "10.200.0.2/24"
        );
    }
}
