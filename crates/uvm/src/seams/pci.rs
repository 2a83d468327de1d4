//! The vPCI seams: host PCI devices assigned to the VM ([`HostPci`]) and the guest's wait for
//! them ([`GuestPci`]). The vPCI sub-controller (`crate::devices::vpci`) keeps reservations and
//! reference counts; these traits only probe, assign, wait and remove.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;

use crate::error::{GuestError, HostError};

/// A host PCI function by its address: `DOMAIN:BUS:DEVICE.FUNCTION` (`0000:03:00.0`; the
/// domain may be left out, as `03:00.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// The PCI domain (segment).
    pub domain: u16,
    /// The bus.
    pub bus: u8,
    /// The device (slot), below 32.
    pub device: u8,
    /// The function, below 8.
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || format!("{s:?} is not a PCI address (DOMAIN:BUS:DEVICE.FUNCTION, hex)");
        let (rest, function) = s.rsplit_once('.').ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, v] if d.len() == 4 => (*d, *b, *v),
            [b, v] => ("0000", *b, *v),
            _ => return Err(malformed()),
        };
        let hex = |p: &str, len: usize| -> Result<u32, String> {
            if p.len() != len || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(malformed());
            }
            u32::from_str_radix(p, 16).map_err(|_| malformed())
        };
        let device = hex(device, 2)?;
        let function = hex(function, 1)?;
        if device >= 32 || function >= 8 {
            return Err(malformed());
        }
        Ok(PciAddress {
            domain: u16::try_from(hex(domain, 4)?).map_err(|_| malformed())?,
            bus: u8::try_from(hex(bus, 2)?).map_err(|_| malformed())?,
            device: u8::try_from(device).map_err(|_| malformed())?,
            function: u8::try_from(function).map_err(|_| malformed())?,
        })
    }
}

/// Where the guest finds an assigned device: its vendor and device ids (the host's), and the
/// guest PCI slot of the root port it sits behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciLocation {
    /// The vendor id.
    pub vendor: u16,
    /// The device id.
    pub device: u16,
}

/// Host PCI devices of one VM (VFIO passthrough).
#[async_trait]
pub trait HostPci: Send + Sync {
    /// Whether `address` can be assigned to this VM, before anything changes: the host has
    /// IOMMU groups, the device exists and is bound to `vfio-pci`. Returns where the guest will
    /// find it.
    ///
    /// # Errors
    /// [`HostError::Unsupported`] naming the reason (no IOMMU groups, a machine without PCIe
    /// hotplug); [`HostError::InvalidInput`] for a device that is missing or not bound to
    /// `vfio-pci`.
    async fn probe_pci(&self, address: PciAddress) -> Result<PciLocation, HostError>;
    /// Assign `address` to the VM under `id`.
    ///
    /// # Errors
    /// The assignment failed; nothing of it is left.
    async fn add_pci(&self, id: &str, address: PciAddress) -> Result<(), HostError>;
    /// Take the device `id` out of the VM. Harmless on an unknown id.
    ///
    /// # Errors
    /// [`HostError::Timeout`] when the guest did not let go in time (retryable).
    async fn remove_pci(&self, id: &str) -> Result<(), HostError>;
}

/// The guest's side of an assigned device.
#[async_trait]
pub trait GuestPci: Send + Sync {
    /// Wait (under the link's deadline) until the guest has the device at `location` and its
    /// driver bound.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] not found when it did not appear in time; or the link failed.
    async fn wait_pci_device(&self, location: &PciLocation) -> Result<(), GuestError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_with_and_without_a_domain() {
        let a: PciAddress = "0000:03:00.1".parse().expect("a test value");
        assert_eq!((a.domain, a.bus, a.device, a.function), (0, 3, 0, 1));
        assert_eq!(a.to_string(), "0000:03:00.1");
        let b: PciAddress = "af:1f.7".parse().expect("a test value");
        assert_eq!((b.domain, b.bus, b.device, b.function), (0, 0xaf, 0x1f, 7));
    }

    #[test]
    fn malformed_pci_addresses_are_refused() {
        for bad in [
            "",
            "03:00",
            "0000:03:00.8",
            "0000:03:20.0",
            "000:03:00.0",
            "g0:00.0",
            "0000:03:00.0.1",
            "1:2:3:4.0",
            "0000:3:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} was accepted");
        }
    }
}
