//! The network and vPCI books as the API shows them, and the requests that change them.

use uvm::devices::network::{NetworkInfo, NetworkState, NicInfo, NicState};
use uvm::devices::vpci::{PciInfo, PciState};
use uvm::seams::{NicBacking, PciAddress, Route};

use crate::v1;

impl From<NetworkState> for v1::NetworkState {
    fn from(s: NetworkState) -> v1::NetworkState {
        match s {
            NetworkState::NotConfigured => v1::NetworkState::NotConfigured,
            NetworkState::Configured => v1::NetworkState::Configured,
            NetworkState::Invalid => v1::NetworkState::Invalid,
            NetworkState::TornDown => v1::NetworkState::TornDown,
        }
    }
}

impl From<NicState> for v1::NicState {
    fn from(s: NicState) -> v1::NicState {
        match s {
            NicState::Reserved => v1::NicState::Reserved,
            NicState::Added => v1::NicState::Added,
            NicState::Configured => v1::NicState::Configured,
            NicState::Invalid => v1::NicState::Invalid,
            NicState::Removed => v1::NicState::Removed,
        }
    }
}

impl From<PciState> for v1::PciState {
    fn from(s: PciState) -> v1::PciState {
        match s {
            PciState::Reserved => v1::PciState::Reserved,
            PciState::HostAssigned => v1::PciState::HostAssigned,
            PciState::Assigned => v1::PciState::Assigned,
            PciState::AssignedInvalid => v1::PciState::AssignedInvalid,
            PciState::Removed => v1::PciState::Removed,
        }
    }
}

/// A route as people read it: `default via 10.0.2.2`, `10.0.0.0/8 via …`, `10.1.0.0/16`.
pub fn route_text(r: &Route) -> String {
    let dest = r
        .destination
        .map_or_else(|| "default".to_owned(), |d| d.to_string());
    match r.gateway {
        Some(g) => format!("{dest} via {g}"),
        None => dest,
    }
}

impl From<&NicInfo> for v1::Nic {
    fn from(n: &NicInfo) -> v1::Nic {
        let e = &n.nic.endpoint;
        let (backing, netns, publish) = match &n.nic.backing {
            NicBacking::User { publish } => (
                "user",
                String::new(),
                publish.iter().map(ToString::to_string).collect(),
            ),
            NicBacking::Namespace { path } => ("netns", path.display().to_string(), Vec::new()),
        };
        let mut out = v1::Nic {
            id: n.nic.id.clone(),
            name: e.name.clone(),
            mac: e.mac.to_string(),
            mtu: e.mtu,
            addresses: e.addresses.iter().map(ToString::to_string).collect(),
            routes: e.routes.iter().map(route_text).collect(),
            backing: backing.to_owned(),
            netns,
            publish,
            cold: n.cold,
            ..v1::Nic::default()
        };
        out.set_state(n.state.into());
        out
    }
}

impl From<&NetworkInfo> for v1::Network {
    fn from(n: &NetworkInfo) -> v1::Network {
        let mut out = v1::Network {
            nics: n.nics.iter().map(Into::into).collect(),
            ..v1::Network::default()
        };
        out.set_state(n.state.into());
        out
    }
}

impl From<&PciInfo> for v1::PciDevice {
    fn from(d: &PciInfo) -> v1::PciDevice {
        let mut out = v1::PciDevice {
            id: d.id.clone(),
            address: d.address.to_string(),
            vendor: d.location.vendor.into(),
            device: d.location.device.into(),
            references: d.references,
            ..v1::PciDevice::default()
        };
        out.set_state(d.state.into());
        out
    }
}

/// The host PCI address of an AddPciDevice request.
///
/// # Errors
/// INVALID_ARGUMENT for a malformed address.
pub fn pci_address(req: &v1::AddPciDeviceRequest) -> Result<PciAddress, tonic::Status> {
    req.address
        .parse()
        .map_err(|e: String| tonic::Status::invalid_argument(format!("address: {e}")))
}

/// The namespace of an AddNic request.
///
/// # Errors
/// INVALID_ARGUMENT for an empty or relative path.
pub fn nic_netns(req: &v1::AddNicRequest) -> Result<std::path::PathBuf, tonic::Status> {
    let path = std::path::PathBuf::from(&req.netns);
    if req.netns.is_empty() || !path.is_absolute() {
        return Err(tonic::Status::invalid_argument(format!(
            "netns: {:?} is not an absolute path",
            req.netns
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm::seams::{Endpoint, IpNet, MacAddress, Nic};

    #[test]
    fn a_nic_shows_its_addresses_routes_and_backing_as_text() {
        let info = NicInfo {
            nic: Nic {
                id: "nic0".into(),
                endpoint: Endpoint {
                    name: "eth0".into(),
                    mac: MacAddress::local([0, 0, 1]),
                    mtu: 1500,
                    addresses: vec!["10.200.0.2/24".parse::<IpNet>().expect("a test value")],
                    routes: vec![Route {
                        destination: None,
                        gateway: Some([10, 200, 0, 1].into()),
                    }],
                },
                backing: NicBacking::Namespace {
                    path: "/run/netns/a".into(),
                },
            },
            state: NicState::Configured,
            cold: true,
        };
        let v = v1::Nic::from(&info);
        assert_eq!(v.state(), v1::NicState::Configured);
        assert_eq!(v.routes, ["default via 10.200.0.1"]);
        assert_eq!(
            (v.backing.as_str(), v.netns.as_str()),
            ("netns", "/run/netns/a")
        );
    }

    #[test]
    fn malformed_pci_addresses_and_relative_namespaces_are_invalid_arguments() {
        let bad = v1::AddPciDeviceRequest {
            address: "03:00".into(),
        };
        assert_eq!(
            pci_address(&bad).expect_err("refused").code(),
            tonic::Code::InvalidArgument
        );
        let rel = v1::AddNicRequest {
            netns: "netns/a".into(),
        };
        assert_eq!(
            nic_netns(&rel).expect_err("refused").code(),
            tonic::Code::InvalidArgument
        );
    }
}
