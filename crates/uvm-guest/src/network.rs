//! NICs and assigned PCI devices through the agent's `ConfigureInterface`,
//! `DeconfigureInterface`, `ConfigureDns` (capability `network`) and `WaitPciDevice`
//! (capability `pci`) requests.
//!
//! As for mounts, a hot-added interface or device may take a while to appear in the guest: the
//! agent waits three quarters of the call deadline for it, so that its own typed `NotFound`
//! arrives before the host gives up on the call.

use uvm::seams::{
    DnsConfig, Endpoint, GuestConnection as _, GuestNetwork, GuestPci, MacAddress, PciLocation,
};
use uvm::{GuestError, GuestRequest};
use uvm_agent_proto::agent::{
    ConfigureDnsRequest, ConfigureInterfaceRequest, DeconfigureInterfaceRequest, NetworkRoute,
    WaitPciDeviceRequest,
};
use uvm_agent_proto::{capabilities, MAX_DEVICE_WAIT_MS};

use crate::link::VsockGuest;

fn require(link: &VsockGuest, capability: &str, operation: &'static str) -> Result<(), GuestError> {
    if link.capabilities().has(capability) {
        Ok(())
    } else {
        Err(GuestError::Unsupported { operation })
    }
}

/// Three quarters of the call deadline, as the agent's own wait.
fn wait_ms(link: &VsockGuest) -> u32 {
    u32::try_from(link.shared.cfg.call_timeout.as_millis() * 3 / 4)
        .unwrap_or(u32::MAX)
        .min(MAX_DEVICE_WAIT_MS)
}

/// The agent's request for `endpoint`.
pub(crate) fn interface_request(endpoint: &Endpoint, wait_ms: u32) -> ConfigureInterfaceRequest {
    ConfigureInterfaceRequest {
        mac: endpoint.mac.to_string(),
        mtu: endpoint.mtu,
        addresses: endpoint.addresses.iter().map(ToString::to_string).collect(),
        routes: endpoint
            .routes
            .iter()
            .map(|r| NetworkRoute {
                destination: r.destination.map(|d| d.to_string()).unwrap_or_default(),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                ..NetworkRoute::default()
            })
            .collect(),
        wait_ms,
        ..ConfigureInterfaceRequest::default()
    }
}

#[async_trait::async_trait]
impl GuestNetwork for VsockGuest {
    async fn configure_interface(&self, endpoint: &Endpoint) -> Result<(), GuestError> {
        let client = self.client()?;
        require(
            self,
            capabilities::NETWORK,
            "configuring network interfaces",
        )?;
        let request = interface_request(endpoint, wait_ms(self));
        self.call(
            GuestRequest::ConfigureInterface,
            Some(self.shared.cfg.call_timeout),
            client.configure_interface(VsockGuest::ctx(), &request),
        )
        .await
        .map(drop)
    }

    async fn deconfigure_interface(&self, mac: MacAddress) -> Result<(), GuestError> {
        let client = self.client()?;
        require(
            self,
            capabilities::NETWORK,
            "deconfiguring network interfaces",
        )?;
        let request = DeconfigureInterfaceRequest {
            mac: mac.to_string(),
            ..DeconfigureInterfaceRequest::default()
        };
        self.call(
            GuestRequest::DeconfigureInterface,
            Some(self.shared.cfg.call_timeout),
            client.deconfigure_interface(VsockGuest::ctx(), &request),
        )
        .await
        .map(drop)
    }

    async fn configure_dns(&self, dns: &DnsConfig) -> Result<(), GuestError> {
        let client = self.client()?;
        require(
            self,
            capabilities::NETWORK,
            "configuring the guest's resolver",
        )?;
        let request = ConfigureDnsRequest {
            nameservers: dns.nameservers.iter().map(ToString::to_string).collect(),
            search: dns.search.clone(),
            hosts: dns
                .hosts
                .iter()
                .map(|(ip, names)| format!("{ip} {}", names.join(" ")))
                .collect(),
            ..ConfigureDnsRequest::default()
        };
        self.call(
            GuestRequest::ConfigureDns,
            Some(self.shared.cfg.call_timeout),
            client.configure_dns(VsockGuest::ctx(), &request),
        )
        .await
        .map(drop)
    }
}

#[async_trait::async_trait]
impl GuestPci for VsockGuest {
    async fn wait_pci_device(&self, location: &PciLocation) -> Result<(), GuestError> {
        let client = self.client()?;
        require(self, capabilities::PCI, "waiting for assigned PCI devices")?;
        let request = WaitPciDeviceRequest {
            vendor: u32::from(location.vendor),
            device: u32::from(location.device),
            wait_ms: wait_ms(self),
            ..WaitPciDeviceRequest::default()
        };
        self.call(
            GuestRequest::WaitPciDevice,
            Some(self.shared.cfg.call_timeout),
            client.wait_pci_device(VsockGuest::ctx(), &request),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm::seams::{IpNet, Route};

    #[test]
    fn an_endpoint_travels_as_text_the_agent_parses_and_the_default_route_has_no_destination() {
        let endpoint = Endpoint {
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".parse().expect("a test value"),
            mtu: 1400,
            addresses: vec!["10.200.1.2/24".parse::<IpNet>().expect("a test value")],
            routes: vec![Route {
                destination: None,
                gateway: Some([10, 200, 1, 1].into()),
            }],
        };
        let r = interface_request(&endpoint, 750);
        assert_eq!(r.mac, "52:54:00:00:00:01");
        assert_eq!(r.mtu, 1400);
        assert_eq!(r.addresses, ["10.200.1.2/24"]);
        assert_eq!(r.routes[0].destination, "");
        assert_eq!(r.routes[0].gateway, "10.200.1.1");
        assert_eq!(r.wait_ms, 750);
    }
}
