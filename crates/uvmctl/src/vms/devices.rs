//! `uvmctl disk add|rm|ls` and `uvmctl share add|rm|ls`: a running VM's disks and shared
//! directories over the API (AddDisk, RemoveDisk, AddShare, RemoveShare, ListDevices), and the
//! device lines `inspect` prints.

use std::path::Path;

use serde_json::{json, Value};
use uvm_api::v1;
use uvmctl::mount_spec::absolute_host_path;

use super::{status_error, Target};

/// `uvmctl disk`.
#[derive(clap::Subcommand, Debug)]
pub enum DiskCommand {
    /// Attach a disk image to a running VM and mount it at GUEST_PATH (q35 only: microvm takes
    /// disks at create, `create --disk`).
    #[command(
        after_help = "Examples:\n  uvmctl disk add web ./data.img /data\n  uvmctl disk add web /images/base.img /base --ro"
    )]
    Add(DiskAddArgs),
    /// Unmount the disk at GUEST_PATH and detach it. A mount something in the guest still uses
    /// is refused as busy and stays; retry once it is free.
    #[command(after_help = "Example:\n  uvmctl disk rm web /data")]
    Rm(RemoveArgs),
    /// List a VM's disks with their states and mounts.
    #[command(after_help = "Example:\n  uvmctl disk ls web --json")]
    Ls(ListArgs),
}

/// `uvmctl share`.
#[derive(clap::Subcommand, Debug)]
pub enum ShareCommand {
    /// Share a host directory into a running VM and mount it at GUEST_PATH.
    #[command(
        after_help = "Examples:\n  uvmctl share add web ./site /srv/www\n  uvmctl share add web /etc/ssl/certs /certs --ro"
    )]
    Add(ShareAddArgs),
    /// Unmount the share at GUEST_PATH and stop sharing it. A mount something in the guest still
    /// uses is refused as busy and stays; retry once it is free.
    #[command(after_help = "Example:\n  uvmctl share rm web /srv/www")]
    Rm(RemoveArgs),
    /// List a VM's shares with their states and mounts.
    #[command(after_help = "Example:\n  uvmctl share ls web --json")]
    Ls(ListArgs),
}

/// `uvmctl disk add`.
#[derive(clap::Args, Debug)]
pub struct DiskAddArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The disk image (raw; ext4, xfs or vfat, probed) or block device on the host.
    host_path: String,
    /// Where to mount it in the guest (absolute; made if missing).
    guest_path: String,
    /// Attach it read-only and mount it read-only.
    #[arg(long)]
    ro: bool,
    /// The image's format.
    #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
    format: FormatArg,
    /// The filesystem, instead of letting the guest probe it (ext4, xfs, vfat).
    #[arg(long = "type", value_name = "FS")]
    fs_type: Option<String>,
    /// The partition to mount (1 for the first); default the whole disk.
    #[arg(long, value_name = "N", default_value_t = 0)]
    partition: u32,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FormatArg {
    Raw,
    Qcow2,
}

/// `uvmctl share add`.
#[derive(clap::Args, Debug)]
pub struct ShareAddArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The directory on the host.
    host_dir: String,
    /// Where to mount it in the guest (absolute; made if missing).
    guest_path: String,
    /// Share it read-only (enforced on the host and in the guest).
    #[arg(long)]
    ro: bool,
}

/// `uvmctl disk rm` and `uvmctl share rm`.
#[derive(clap::Args, Debug)]
pub struct RemoveArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// The guest path it is mounted at.
    guest_path: String,
}

/// `uvmctl disk ls` and `uvmctl share ls`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

pub async fn disk(command: DiskCommand, root: &Path) -> anyhow::Result<u8> {
    match command {
        DiskCommand::Add(args) => disk_add(args, root).await,
        DiskCommand::Rm(args) => {
            let target = Target::find(root, &args.id)?;
            target
                .client()
                .await?
                .remove_disk(target.request(v1::RemoveDiskRequest {
                    guest_path: args.guest_path.clone(),
                }))
                .await
                .map_err(status_error)?;
            println!("{}", args.guest_path);
            Ok(0)
        }
        DiskCommand::Ls(args) => list(args, root, Kind::Disk).await,
    }
}

pub async fn share(command: ShareCommand, root: &Path) -> anyhow::Result<u8> {
    match command {
        ShareCommand::Add(args) => share_add(args, root).await,
        ShareCommand::Rm(args) => {
            let target = Target::find(root, &args.id)?;
            target
                .client()
                .await?
                .remove_share(target.request(v1::RemoveShareRequest {
                    guest_path: args.guest_path.clone(),
                }))
                .await
                .map_err(status_error)?;
            println!("{}", args.guest_path);
            Ok(0)
        }
        ShareCommand::Ls(args) => list(args, root, Kind::Share).await,
    }
}

async fn disk_add(args: DiskAddArgs, root: &Path) -> anyhow::Result<u8> {
    let host_path = absolute_host_path(&args.host_path).map_err(anyhow::Error::msg)?;
    let target = Target::find(root, &args.id)?;
    let mut disk = v1::DiskConfig {
        host_path: host_path.to_string_lossy().into_owned(),
        read_only: args.ro,
        ..v1::DiskConfig::default()
    };
    disk.set_format(match args.format {
        FormatArg::Raw => v1::DiskFormat::Raw,
        FormatArg::Qcow2 => v1::DiskFormat::Qcow2,
    });
    let mount = v1::DiskMount {
        guest_path: args.guest_path.clone(),
        partition: args.partition,
        read_only: args.ro,
        fs_type: args.fs_type.unwrap_or_default(),
        options: Vec::new(),
    };
    let added = target
        .client()
        .await?
        .add_disk(target.request(v1::AddDiskRequest {
            disk: Some(disk),
            mount: Some(mount),
        }))
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{} slot {}", args.guest_path, added.slot);
    Ok(0)
}

async fn share_add(args: ShareAddArgs, root: &Path) -> anyhow::Result<u8> {
    let host_path = absolute_host_path(&args.host_dir).map_err(anyhow::Error::msg)?;
    let target = Target::find(root, &args.id)?;
    let added = target
        .client()
        .await?
        .add_share(target.request(v1::AddShareRequest {
            share: Some(v1::ShareConfig {
                host_path: host_path.to_string_lossy().into_owned(),
                read_only: args.ro,
            }),
            mount: Some(v1::ShareMount {
                guest_path: args.guest_path.clone(),
                read_only: args.ro,
            }),
        }))
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{} tag {}", args.guest_path, added.tag);
    Ok(0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Disk,
    Share,
}

async fn list(args: ListArgs, root: &Path, kind: Kind) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let devices = target
        .client()
        .await?
        .list_devices(target.request(v1::ListDevicesRequest {}))
        .await
        .map_err(status_error)?
        .into_inner()
        .devices
        .unwrap_or_default();
    let rows: Vec<Value> = devices_json(&devices)
        .into_iter()
        .filter(|d| {
            d["kind"]
                == match kind {
                    Kind::Disk => "disk",
                    Kind::Share => "share",
                }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(0)
}

/// A proto enum value's name as the controller spells it: `DISK_STATE_ATTACHED` → `Attached`.
fn state_name(name: &str, prefix: &str) -> String {
    let rest = name.trim_start_matches(prefix).to_lowercase();
    let mut chars = rest.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The devices as the record's `devices` shows them (the same shape: `kind`, `slot` or `tag`,
/// `host_path`, `read_only`, `state`, `cold`, `mounts`).
pub(crate) fn devices_json(devices: &v1::Devices) -> Vec<Value> {
    let mount = |guest_path: &str, read_only: bool, state: v1::MountState| {
        json!({
            "guest_path": guest_path,
            "read_only": read_only,
            "state": state_name(state.as_str_name(), "MOUNT_STATE_"),
        })
    };
    let disks = devices.disks.iter().map(|d| {
        let config = d.config.clone().unwrap_or_default();
        json!({
            "kind": "disk",
            "slot": d.slot,
            "host_path": config.host_path,
            "read_only": config.read_only,
            "state": state_name(d.state().as_str_name(), "DISK_STATE_"),
            "cold": d.cold,
            "mounts": d.mounts.iter().map(|m| {
                let at = m.mount.clone().unwrap_or_default();
                mount(&at.guest_path, at.read_only, m.state())
            }).collect::<Vec<_>>(),
        })
    });
    let shares = devices.shares.iter().map(|s| {
        let config = s.config.clone().unwrap_or_default();
        json!({
            "kind": "share",
            "tag": s.tag,
            "host_path": config.host_path,
            "read_only": config.read_only,
            "state": state_name(s.state().as_str_name(), "SHARE_STATE_"),
            "cold": s.cold,
            "mounts": s.mounts.iter().map(|m| {
                let at = m.mount.clone().unwrap_or_default();
                mount(&at.guest_path, at.read_only, m.state())
            }).collect::<Vec<_>>(),
        })
    });
    disks.chain(shares).collect()
}

/// One line per mount of each device (a device without mounts gets one line too).
fn device_lines(devices: &[Value]) -> Vec<[String; 6]> {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let mut lines = Vec::new();
    for d in devices {
        let at = if d["kind"] == "disk" {
            format!("slot {}", d["slot"])
        } else {
            text(&d["tag"])
        };
        let mode = |ro: &Value| {
            if ro.as_bool() == Some(true) {
                "ro"
            } else {
                "rw"
            }
        };
        let device = format!(
            "{} {}{}",
            text(&d["state"]),
            mode(&d["read_only"]),
            if d["cold"].as_bool() == Some(true) {
                " cold"
            } else {
                ""
            }
        );
        let mounts = d["mounts"].as_array().cloned().unwrap_or_default();
        if mounts.is_empty() {
            lines.push([
                text(&d["kind"]),
                at.clone(),
                device.clone(),
                text(&d["host_path"]),
                "-".into(),
                "-".into(),
            ]);
        }
        for m in mounts {
            lines.push([
                text(&d["kind"]),
                at.clone(),
                device.clone(),
                text(&d["host_path"]),
                text(&m["guest_path"]),
                format!("{} {}", text(&m["state"]), mode(&m["read_only"])),
            ]);
        }
    }
    lines
}

fn print_table(devices: &[Value]) {
    println!(
        "{:<6}  {:<14}  {:<18}  {:<36}  {:<20}  MOUNT",
        "KIND", "AT", "STATE", "HOST PATH", "GUEST PATH"
    );
    for [kind, at, state, host, guest, mount] in device_lines(devices) {
        println!("{kind:<6}  {at:<14}  {state:<18}  {host:<36}  {guest:<20}  {mount}");
    }
}

/// `inspect`'s device lines: `devices: KIND AT STATE HOST -> GUEST (MOUNT)`.
pub(crate) fn print_inspect_lines(devices: &[Value]) {
    let lines = device_lines(devices);
    if lines.is_empty() {
        println!("devices: -");
    }
    for [kind, at, state, host, guest, mount] in lines {
        println!("devices: {kind} {at} {state} {host} -> {guest} ({mount})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_read_as_the_controller_spells_them() {
        assert_eq!(state_name("DISK_STATE_ATTACHED", "DISK_STATE_"), "Attached");
        assert_eq!(
            state_name("MOUNT_STATE_UNMOUNTED", "MOUNT_STATE_"),
            "Unmounted"
        );
        assert_eq!(state_name("SHARE_STATE_", "SHARE_STATE_"), "");
    }

    #[test]
    fn each_mount_is_a_line_and_a_device_without_mounts_one_too() {
        let mut disk = v1::Disk {
            slot: 65,
            controller: 1,
            lun: 1,
            config: Some(v1::DiskConfig {
                host_path: "/i.img".into(),
                read_only: true,
                ..v1::DiskConfig::default()
            }),
            cold: true,
            mounts: vec![v1::DiskMountInfo {
                mount: Some(v1::DiskMount {
                    guest_path: "/data".into(),
                    read_only: true,
                    ..v1::DiskMount::default()
                }),
                state: v1::MountState::Mounted.into(),
                references: 1,
            }],
            ..v1::Disk::default()
        };
        disk.set_state(v1::DiskState::Attached);
        let mut share = v1::Share {
            tag: "uvm-share-1".into(),
            config: Some(v1::ShareConfig {
                host_path: "/srv".into(),
                read_only: false,
            }),
            ..v1::Share::default()
        };
        share.set_state(v1::ShareState::Invalid);
        let json = devices_json(&v1::Devices {
            disks: vec![disk],
            shares: vec![share],
        });
        assert_eq!(json[0]["state"], "Attached");
        assert_eq!(json[0]["mounts"][0]["state"], "Mounted");
        assert_eq!(json[1]["tag"], "uvm-share-1");
        let lines = device_lines(&json);
        assert_eq!(
            lines,
            [
                [
                    "disk".to_string(),
                    "slot 65".into(),
                    "Attached ro cold".into(),
                    "/i.img".into(),
                    "/data".into(),
                    "Mounted ro".into(),
                ],
                [
                    "share".into(),
                    "uvm-share-1".into(),
                    "Invalid rw".into(),
                    "/srv".into(),
                    "-".into(),
                    "-".into(),
                ],
            ]
        );
    }
}
