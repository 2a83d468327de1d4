//! The network and vPCI fakes: [`FakeBackend`] knows the network namespaces and assignable PCI
//! devices a test made ([`FakeBackend::add_namespace`], [`FakeBackend::add_pci_device`]),
//! [`FakeVm`] keeps the NICs and PCI devices plugged now, [`FakeGuest`] the interfaces it has
//! configured, so tests can assert "nothing plugged, nothing configured" after any failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Call, FakeBackend, FakeGuest, FakeVm};
use crate::controller::lock;
use crate::devices::network::cold_nic_id;
use crate::error::{GuestError, HostError};
use crate::seams::{
    DnsConfig, Endpoint, GuestNetwork, GuestPci, HostNetwork, HostPci, IpNet, MacAddress,
    NetworkMode, Nic, NicBacking, PciAddress, PciLocation, Route, VmConfig,
};

/// What the fake host knows: namespaces and their interfaces, assignable PCI devices.
#[derive(Debug, Default)]
pub(super) struct FakeHostNet {
    namespaces: BTreeMap<PathBuf, Vec<Endpoint>>,
    pci: BTreeMap<PciAddress, PciLocation>,
}

/// The NICs and PCI devices one fake VM has plugged.
#[derive(Debug, Default)]
pub(super) struct FakeVmNet {
    host: Arc<Mutex<FakeHostNet>>,
    /// The machine cannot hot-plug NICs (as microvm).
    no_hotplug: bool,
    nics: BTreeMap<String, Nic>,
    pci: BTreeMap<String, PciAddress>,
}

/// What the fake guest has configured.
#[derive(Debug, Default)]
pub(super) struct FakeGuestNet {
    interfaces: BTreeMap<MacAddress, Endpoint>,
    dns: Option<DnsConfig>,
    pci_seen: Vec<PciLocation>,
}

/// An endpoint as a test's namespace holds it: `name`, MAC `52:54:00:00:00:<n>`, address
/// `10.200.<n>.2/24`, default route via `10.200.<n>.1`, MTU 1500.
pub fn fake_endpoint(name: &str, n: u8) -> Endpoint {
    Endpoint {
        name: name.to_owned(),
        mac: MacAddress::local([0, 0, n]),
        mtu: 1500,
        addresses: vec![IpNet::new([10, 200, n, 2].into(), 24).expect("a /24")],
        routes: vec![Route {
            destination: None,
            gateway: Some([10, 200, n, 1].into()),
        }],
    }
}

/// The endpoint of the fake user-mode NIC.
fn user_endpoint() -> Endpoint {
    Endpoint {
        name: "user".into(),
        mac: MacAddress::local([0, 0, 0xaa]),
        mtu: 1500,
        addresses: vec![IpNet::new([10, 0, 2, 15].into(), 24).expect("a /24")],
        routes: vec![Route {
            destination: None,
            gateway: Some([10, 0, 2, 2].into()),
        }],
    }
}

impl FakeHostNet {
    fn endpoints(&self, path: &Path) -> Result<Vec<Endpoint>, HostError> {
        match self.namespaces.get(path) {
            None => Err(HostError::InvalidInput {
                what: "network namespace",
                message: format!("{} does not exist", path.display()),
            }),
            Some(e) if e.is_empty() => Err(HostError::InvalidInput {
                what: "network namespace",
                message: format!("{} has no usable interface", path.display()),
            }),
            Some(e) => Ok(e.clone()),
        }
    }
}

impl FakeBackend {
    /// A network namespace at `path` holding `endpoints` (in the order the host lists them).
    pub fn add_namespace(&self, path: impl Into<PathBuf>, endpoints: Vec<Endpoint>) {
        lock(&self.net).namespaces.insert(path.into(), endpoints);
    }
    /// A PCI device the host can assign, found by the guest at `location`.
    pub fn add_pci_device(&self, address: PciAddress, location: PciLocation) {
        lock(&self.net).pci.insert(address, location);
    }
    pub(super) fn vm_net(&self, config: &VmConfig) -> Result<FakeVmNet, HostError> {
        let endpoints = match &config.network.mode {
            NetworkMode::None => Vec::new(),
            NetworkMode::User { publish } => vec![(
                user_endpoint(),
                NicBacking::User {
                    publish: publish.clone(),
                },
            )],
            NetworkMode::Namespace { path } => lock(&self.net)
                .endpoints(path)?
                .into_iter()
                .map(|e| (e, NicBacking::Namespace { path: path.clone() }))
                .collect(),
        };
        let nics = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, (endpoint, backing))| {
                let id = cold_nic_id(i);
                (
                    id.clone(),
                    Nic {
                        id,
                        endpoint,
                        backing,
                    },
                )
            })
            .collect();
        Ok(FakeVmNet {
            host: self.net.clone(),
            no_hotplug: false,
            nics,
            pci: BTreeMap::new(),
        })
    }
}

impl FakeVm {
    /// The NICs plugged now, by id.
    pub fn nics(&self) -> BTreeMap<String, Nic> {
        lock(&self.net).nics.clone()
    }
    /// NICs cannot be hot-plugged from now on (as on microvm).
    pub fn refuse_nic_hotplug(&self) {
        lock(&self.net).no_hotplug = true;
    }
    /// The PCI devices assigned now, by id.
    pub fn pci_devices(&self) -> BTreeMap<String, PciAddress> {
        lock(&self.net).pci.clone()
    }
    pub(super) fn forget_network(&self) {
        let mut n = lock(&self.net);
        n.nics.clear();
        n.pci.clear();
    }
}

impl FakeGuest {
    /// The interfaces configured now, by MAC.
    pub fn interfaces(&self) -> BTreeMap<MacAddress, Endpoint> {
        lock(&self.net).interfaces.clone()
    }
    /// The resolver configuration written last.
    pub fn dns(&self) -> Option<DnsConfig> {
        lock(&self.net).dns.clone()
    }
    /// The PCI devices the guest waited for, in order.
    pub fn pci_seen(&self) -> Vec<PciLocation> {
        lock(&self.net).pci_seen.clone()
    }
}

#[async_trait]
impl HostNetwork for FakeVm {
    fn check_nic_hotplug(&self) -> Result<(), HostError> {
        if lock(&self.net).no_hotplug {
            return Err(HostError::Unsupported {
                backend: "fake",
                operation: "hot-plugging NICs",
            });
        }
        Ok(())
    }
    fn cold_nics(&self) -> Vec<Nic> {
        lock(&self.net).nics.values().cloned().collect()
    }
    async fn namespace_endpoints(&self, path: &Path) -> Result<Vec<Endpoint>, HostError> {
        self.script.host(Call::NamespaceEndpoints).await?;
        let host = lock(&self.net).host.clone();
        let endpoints = lock(&host).endpoints(path);
        endpoints
    }
    async fn add_nic(&self, nic: &Nic) -> Result<(), HostError> {
        self.script.host(Call::AddNic).await?;
        self.alive()?;
        let mut n = lock(&self.net);
        if n.nics.contains_key(&nic.id) {
            return Err(HostError::InvalidInput {
                what: "NIC",
                message: format!("{} is plugged already", nic.id),
            });
        }
        n.nics.insert(nic.id.clone(), nic.clone());
        Ok(())
    }
    async fn remove_nic(&self, id: &str) -> Result<(), HostError> {
        self.script.host(Call::RemoveNic).await?;
        lock(&self.net).nics.remove(id);
        Ok(())
    }
}

#[async_trait]
impl HostPci for FakeVm {
    async fn probe_pci(&self, address: PciAddress) -> Result<PciLocation, HostError> {
        self.script.host(Call::ProbePci).await?;
        let host = lock(&self.net).host.clone();
        let location = lock(&host).pci.get(&address).copied();
        location.ok_or(HostError::Unsupported {
            backend: "fake",
            operation: "PCI passthrough of a device the test did not make",
        })
    }
    async fn add_pci(&self, id: &str, address: PciAddress) -> Result<(), HostError> {
        self.script.host(Call::AddPci).await?;
        self.alive()?;
        lock(&self.net).pci.insert(id.to_owned(), address);
        Ok(())
    }
    async fn remove_pci(&self, id: &str) -> Result<(), HostError> {
        self.script.host(Call::RemovePci).await?;
        self.alive()?;
        lock(&self.net).pci.remove(id);
        Ok(())
    }
}

#[async_trait]
impl GuestNetwork for FakeGuest {
    async fn configure_interface(&self, endpoint: &Endpoint) -> Result<(), GuestError> {
        self.script.guest(Call::ConfigureInterface).await?;
        self.connected()?;
        lock(&self.net)
            .interfaces
            .insert(endpoint.mac, endpoint.clone());
        Ok(())
    }
    async fn deconfigure_interface(&self, mac: MacAddress) -> Result<(), GuestError> {
        self.script.guest(Call::DeconfigureInterface).await?;
        self.connected()?;
        lock(&self.net).interfaces.remove(&mac);
        Ok(())
    }
    async fn configure_dns(&self, dns: &DnsConfig) -> Result<(), GuestError> {
        self.script.guest(Call::ConfigureDns).await?;
        self.connected()?;
        lock(&self.net).dns = Some(dns.clone());
        Ok(())
    }
}

#[async_trait]
impl GuestPci for FakeGuest {
    async fn wait_pci_device(&self, location: &PciLocation) -> Result<(), GuestError> {
        self.script.guest(Call::WaitPciDevice).await?;
        self.connected()?;
        lock(&self.net).pci_seen.push(*location);
        Ok(())
    }
}
