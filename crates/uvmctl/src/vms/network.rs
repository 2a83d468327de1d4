//! `uvmctl nic add|rm|ls` and `uvmctl pci add|rm|ls`: a running VM's NICs and assigned PCI
//! devices over the API (AddNic, RemoveNic, ListNics, AddPciDevice, RemovePciDevice,
//! ListPciDevices), and the lines `inspect` prints for them.

use std::path::Path;

use serde_json::{json, Value};
use uvm_api::v1;
use uvmctl::mount_spec::absolute_host_path;

use super::{status_error, Target};

/// `uvmctl nic`.
#[derive(clap::Subcommand, Debug)]
pub enum NicCommand {
    /// Add a NIC for every interface of a network namespace someone else made (a CNI plugin,
    /// `ip netns add` + a veth): the guest gets each interface's MAC, addresses, routes and MTU
    /// (q35 only: microvm takes them at create, `create --netns`).
    #[command(after_help = "Example:\n  uvmctl nic add web --netns /var/run/netns/web")]
    Add(NicAddArgs),
    /// Deconfigure a NIC in the guest and unplug it; its tap and tc filters go.
    #[command(after_help = "Example:\n  uvmctl nic rm web nic1")]
    Rm(NicRmArgs),
    /// List a VM's NICs with their states, MACs and addresses.
    #[command(after_help = "Example:\n  uvmctl nic ls web --json")]
    Ls(ListArgs),
}

/// `uvmctl pci`.
#[derive(clap::Subcommand, Debug)]
pub enum PciCommand {
    /// Assign a host PCI device (VFIO) to a running VM by its address. Needs an IOMMU and the
    /// device bound to vfio-pci; a host without is refused before anything changes.
    #[command(after_help = "Example:\n  uvmctl pci add web 0000:03:00.0")]
    Add(PciAddArgs),
    /// Drop one assignment of a device (by its id, `pci0`); the last takes it out of the VM.
    #[command(after_help = "Example:\n  uvmctl pci rm web pci0")]
    Rm(PciRmArgs),
    /// List a VM's assigned PCI devices.
    #[command(after_help = "Example:\n  uvmctl pci ls web")]
    Ls(ListArgs),
}

/// `uvmctl nic add`.
#[derive(clap::Args, Debug)]
pub struct NicAddArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The network namespace (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    #[arg(long, value_name = "PATH")]
    netns: String,
}

/// `uvmctl nic rm`.
#[derive(clap::Args, Debug)]
pub struct NicRmArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The NIC (`nic0`, as `nic ls` shows).
    nic: String,
}

/// `uvmctl pci add`.
#[derive(clap::Args, Debug)]
pub struct PciAddArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The host PCI address (`0000:03:00.0`).
    address: String,
}

/// `uvmctl pci rm`.
#[derive(clap::Args, Debug)]
pub struct PciRmArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The device's id in the VM (`pci0`, as `pci ls` shows).
    device: String,
}

/// `uvmctl nic ls` and `uvmctl pci ls`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

/// A proto enum value's name as the controller spells it: `NIC_STATE_CONFIGURED` →
/// `Configured`, `PCI_STATE_ASSIGNED_INVALID` → `AssignedInvalid`.
pub(crate) fn camel(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix)
        .split('_')
        .map(|w| {
            let lower = w.to_lowercase();
            let mut chars = lower.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// The NICs as `nic ls --json` and `inspect` show them.
pub(crate) fn nics_json(network: &v1::Network) -> Vec<Value> {
    network
        .nics
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "state": camel(n.state().as_str_name(), "NIC_STATE_"),
                "name": n.name,
                "mac": n.mac,
                "mtu": n.mtu,
                "addresses": n.addresses,
                "routes": n.routes,
                "backing": n.backing,
                "netns": (!n.netns.is_empty()).then_some(&n.netns),
                "publish": n.publish,
                "cold": n.cold,
            })
        })
        .collect()
}

/// The PCI devices as `pci ls --json` and `inspect` show them.
pub(crate) fn pci_json(devices: &[v1::PciDevice]) -> Vec<Value> {
    devices
        .iter()
        .map(|d| {
            json!({
                "id": d.id,
                "address": d.address,
                "vendor": format!("{:04x}", d.vendor),
                "device": format!("{:04x}", d.device),
                "state": camel(d.state().as_str_name(), "PCI_STATE_"),
                "references": d.references,
            })
        })
        .collect()
}

/// One line per NIC: `ID STATE MAC ADDRESSES BACKING`.
pub(crate) fn nic_lines(nics: &[Value]) -> Vec<String> {
    nics.iter()
        .map(|n| {
            let addresses: Vec<&str> = n["addresses"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let backing = match n["netns"].as_str() {
                Some(ns) => format!("netns {ns} ({})", n["name"].as_str().unwrap_or("-")),
                None => n["backing"].as_str().unwrap_or("-").to_owned(),
            };
            format!(
                "{:<6}  {:<12}  {:<17}  {:<24}  {backing}",
                n["id"].as_str().unwrap_or("-"),
                n["state"].as_str().unwrap_or("-"),
                n["mac"].as_str().unwrap_or("-"),
                if addresses.is_empty() {
                    "-".to_owned()
                } else {
                    addresses.join(",")
                },
            )
        })
        .collect()
}

pub async fn nic(command: NicCommand, root: &Path) -> anyhow::Result<u8> {
    match command {
        NicCommand::Add(args) => {
            let netns = absolute_host_path(&args.netns).map_err(anyhow::Error::msg)?;
            let target = Target::find(root, &args.id)?;
            let added = target
                .client()
                .await?
                .add_nic(target.request(v1::AddNicRequest {
                    netns: netns.to_string_lossy().into_owned(),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            let network = v1::Network {
                nics: added.nics,
                ..v1::Network::default()
            };
            for line in nic_lines(&nics_json(&network)) {
                println!("{line}");
            }
            Ok(0)
        }
        NicCommand::Rm(args) => {
            let target = Target::find(root, &args.id)?;
            target
                .client()
                .await?
                .remove_nic(target.request(v1::RemoveNicRequest {
                    nic: args.nic.clone(),
                }))
                .await
                .map_err(status_error)?;
            println!("{}", args.nic);
            Ok(0)
        }
        NicCommand::Ls(args) => {
            let target = Target::find(root, &args.id)?;
            let network = target
                .client()
                .await?
                .list_nics(target.request(v1::ListNicsRequest {}))
                .await
                .map_err(status_error)?
                .into_inner()
                .network
                .unwrap_or_default();
            let rows = nics_json(&network);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<6}  {:<12}  {:<17}  {:<24}  BACKING",
                    "NIC", "STATE", "MAC", "ADDRESSES"
                );
                for line in nic_lines(&rows) {
                    println!("{line}");
                }
            }
            Ok(0)
        }
    }
}

pub async fn pci(command: PciCommand, root: &Path) -> anyhow::Result<u8> {
    match command {
        PciCommand::Add(args) => {
            // Checked here too, so a typo never reaches a supervisor.
            let address: uvm::seams::PciAddress =
                args.address.parse().map_err(anyhow::Error::msg)?;
            let target = Target::find(root, &args.id)?;
            let added = target
                .client()
                .await?
                .add_pci_device(target.request(v1::AddPciDeviceRequest {
                    address: address.to_string(),
                }))
                .await
                .map_err(status_error)?
                .into_inner();
            let id = added.device.map(|d| d.id).unwrap_or_default();
            println!("{address} {id}");
            Ok(0)
        }
        PciCommand::Rm(args) => {
            let target = Target::find(root, &args.id)?;
            target
                .client()
                .await?
                .remove_pci_device(target.request(v1::RemovePciDeviceRequest {
                    id: args.device.clone(),
                }))
                .await
                .map_err(status_error)?;
            println!("{}", args.device);
            Ok(0)
        }
        PciCommand::Ls(args) => {
            let target = Target::find(root, &args.id)?;
            let devices = target
                .client()
                .await?
                .list_pci_devices(target.request(v1::ListPciDevicesRequest {}))
                .await
                .map_err(status_error)?
                .into_inner()
                .devices;
            let rows = pci_json(&devices);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<6}  {:<14}  {:<10}  {:<16}  REFS",
                    "ID", "ADDRESS", "IDS", "STATE"
                );
                for d in &rows {
                    println!(
                        "{:<6}  {:<14}  {:<10}  {:<16}  {}",
                        d["id"].as_str().unwrap_or("-"),
                        d["address"].as_str().unwrap_or("-"),
                        format!(
                            "{}:{}",
                            d["vendor"].as_str().unwrap_or("-"),
                            d["device"].as_str().unwrap_or("-")
                        ),
                        d["state"].as_str().unwrap_or("-"),
                        d["references"]
                    );
                }
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_word_states_read_as_the_controller_spells_them() {
        assert_eq!(
            camel("PCI_STATE_ASSIGNED_INVALID", "PCI_STATE_"),
            "AssignedInvalid"
        );
        assert_eq!(camel("NIC_STATE_CONFIGURED", "NIC_STATE_"), "Configured");
    }

    #[test]
    fn a_nic_line_names_its_namespace_and_interface() {
        let mut nic = v1::Nic {
            id: "nic0".into(),
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            addresses: vec!["10.200.0.2/24".into()],
            backing: "netns".into(),
            netns: "/run/netns/a".into(),
            ..v1::Nic::default()
        };
        nic.set_state(v1::NicState::Configured);
        let network = v1::Network {
            nics: vec![nic],
            ..v1::Network::default()
        };
        let lines = nic_lines(&nics_json(&network));
        assert!(lines[0].starts_with("nic0    Configured"), "{}", lines[0]);
        assert!(
            lines[0].ends_with("netns /run/netns/a (eth0)"),
            "{}",
            lines[0]
        );
    }
}
