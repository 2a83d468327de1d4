//! Disks and shares between the controller (`uvm::seams`, `uvm::devices`) and the API
//! (`uvm.v1`). Towards the API `From`; from a client `TryFrom`, refusing what is missing or out
//! of range with [`ApiError::InvalidRequest`] (the controller checks paths itself: absolute host
//! paths, guest paths off `/proc`, `/sys`, `/dev`).

use std::path::PathBuf;

use uvm::devices::scsi::{DiskInfo, DiskState};
use uvm::devices::shares::{ShareInfo, ShareState};
use uvm::devices::{MountInfo, MountState};
use uvm::seams::{
    DiskCache, DiskConfig, DiskFormat, DiskMount, DiskSpec, ShareConfig, ShareMount, ShareSpec,
};
use uvm::Devices;

use crate::status::ApiError;
use crate::v1;

fn invalid(what: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest {
        what,
        message: message.into(),
    }
}

fn path_string(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

impl From<DiskFormat> for v1::DiskFormat {
    fn from(format: DiskFormat) -> v1::DiskFormat {
        match format {
            DiskFormat::Raw => v1::DiskFormat::Raw,
            DiskFormat::Qcow2 => v1::DiskFormat::Qcow2,
        }
    }
}

impl From<DiskCache> for v1::DiskCache {
    fn from(cache: DiskCache) -> v1::DiskCache {
        match cache {
            DiskCache::None => v1::DiskCache::None,
            DiskCache::Writeback => v1::DiskCache::Writeback,
            DiskCache::Writethrough => v1::DiskCache::Writethrough,
            DiskCache::Unsafe => v1::DiskCache::Unsafe,
        }
    }
}

impl From<DiskState> for v1::DiskState {
    fn from(state: DiskState) -> v1::DiskState {
        match state {
            DiskState::Reserved => v1::DiskState::Reserved,
            DiskState::Attached => v1::DiskState::Attached,
            DiskState::Ejected => v1::DiskState::Ejected,
            DiskState::Detached => v1::DiskState::Detached,
        }
    }
}

impl From<ShareState> for v1::ShareState {
    fn from(state: ShareState) -> v1::ShareState {
        match state {
            ShareState::Reserved => v1::ShareState::Reserved,
            ShareState::Added => v1::ShareState::Added,
            ShareState::Invalid => v1::ShareState::Invalid,
            ShareState::Removed => v1::ShareState::Removed,
        }
    }
}

impl From<MountState> for v1::MountState {
    fn from(state: MountState) -> v1::MountState {
        match state {
            MountState::Reserved => v1::MountState::Reserved,
            MountState::Mounted => v1::MountState::Mounted,
            MountState::Unmounted => v1::MountState::Unmounted,
        }
    }
}

impl From<&DiskConfig> for v1::DiskConfig {
    fn from(disk: &DiskConfig) -> v1::DiskConfig {
        let mut out = v1::DiskConfig {
            host_path: path_string(&disk.host_path),
            read_only: disk.read_only,
            discard: disk.discard,
            ..v1::DiskConfig::default()
        };
        out.set_format(disk.format.into());
        out.set_cache(disk.cache.into());
        out
    }
}

/// A client's disk: a host path is required; an unset format is raw, an unset cache writeback.
impl TryFrom<v1::DiskConfig> for DiskConfig {
    type Error = ApiError;

    fn try_from(disk: v1::DiskConfig) -> Result<DiskConfig, ApiError> {
        if disk.host_path.is_empty() {
            return Err(invalid("disk", "the host path is missing"));
        }
        let format = match v1::DiskFormat::try_from(disk.format) {
            Ok(v1::DiskFormat::Unspecified | v1::DiskFormat::Raw) => DiskFormat::Raw,
            Ok(v1::DiskFormat::Qcow2) => DiskFormat::Qcow2,
            Err(_) => {
                return Err(invalid(
                    "disk format",
                    format!("{} is not a DiskFormat", disk.format),
                ))
            }
        };
        let cache = match v1::DiskCache::try_from(disk.cache) {
            Ok(v1::DiskCache::Unspecified | v1::DiskCache::Writeback) => DiskCache::Writeback,
            Ok(v1::DiskCache::None) => DiskCache::None,
            Ok(v1::DiskCache::Writethrough) => DiskCache::Writethrough,
            Ok(v1::DiskCache::Unsafe) => DiskCache::Unsafe,
            Err(_) => {
                return Err(invalid(
                    "disk cache",
                    format!("{} is not a DiskCache", disk.cache),
                ))
            }
        };
        Ok(DiskConfig {
            host_path: PathBuf::from(disk.host_path),
            format,
            read_only: disk.read_only,
            cache,
            discard: disk.discard,
        })
    }
}

impl From<&DiskMount> for v1::DiskMount {
    fn from(mount: &DiskMount) -> v1::DiskMount {
        v1::DiskMount {
            guest_path: mount.guest_path.clone(),
            partition: mount.partition,
            read_only: mount.read_only,
            fs_type: mount.fs_type.clone().unwrap_or_default(),
            options: mount.options.clone(),
        }
    }
}

/// A client's disk mount: a guest path is required; an empty filesystem type is probed.
impl TryFrom<v1::DiskMount> for DiskMount {
    type Error = ApiError;

    fn try_from(mount: v1::DiskMount) -> Result<DiskMount, ApiError> {
        if mount.guest_path.is_empty() {
            return Err(invalid("disk mount", "the guest path is missing"));
        }
        Ok(DiskMount {
            guest_path: mount.guest_path,
            partition: mount.partition,
            read_only: mount.read_only,
            fs_type: Some(mount.fs_type).filter(|t| !t.is_empty()),
            options: mount.options,
        })
    }
}

impl From<&ShareConfig> for v1::ShareConfig {
    fn from(share: &ShareConfig) -> v1::ShareConfig {
        v1::ShareConfig {
            host_path: path_string(&share.host_path),
            read_only: share.read_only,
        }
    }
}

/// A client's share: a host path is required.
impl TryFrom<v1::ShareConfig> for ShareConfig {
    type Error = ApiError;

    fn try_from(share: v1::ShareConfig) -> Result<ShareConfig, ApiError> {
        if share.host_path.is_empty() {
            return Err(invalid("share", "the host path is missing"));
        }
        Ok(ShareConfig {
            host_path: PathBuf::from(share.host_path),
            read_only: share.read_only,
        })
    }
}

impl From<&ShareMount> for v1::ShareMount {
    fn from(mount: &ShareMount) -> v1::ShareMount {
        v1::ShareMount {
            guest_path: mount.guest_path.clone(),
            read_only: mount.read_only,
        }
    }
}

/// A client's share mount: a guest path is required.
impl TryFrom<v1::ShareMount> for ShareMount {
    type Error = ApiError;

    fn try_from(mount: v1::ShareMount) -> Result<ShareMount, ApiError> {
        if mount.guest_path.is_empty() {
            return Err(invalid("share mount", "the guest path is missing"));
        }
        Ok(ShareMount {
            guest_path: mount.guest_path,
            read_only: mount.read_only,
        })
    }
}

impl From<&DiskSpec> for v1::DiskSpec {
    fn from(spec: &DiskSpec) -> v1::DiskSpec {
        v1::DiskSpec {
            disk: Some((&spec.disk).into()),
            mount: Some((&spec.mount).into()),
        }
    }
}

impl From<&ShareSpec> for v1::ShareSpec {
    fn from(spec: &ShareSpec) -> v1::ShareSpec {
        v1::ShareSpec {
            share: Some((&spec.share).into()),
            mount: Some((&spec.mount).into()),
        }
    }
}

/// What an AddDisk asks for. Both parts are required; a read-only disk is mounted read-only.
pub fn disk_request(request: v1::AddDiskRequest) -> Result<DiskSpec, ApiError> {
    let disk = DiskConfig::try_from(
        request
            .disk
            .ok_or_else(|| invalid("add disk request", "the disk is missing"))?,
    )?;
    let mut mount = DiskMount::try_from(
        request
            .mount
            .ok_or_else(|| invalid("add disk request", "the mount is missing"))?,
    )?;
    mount.read_only |= disk.read_only;
    Ok(DiskSpec { disk, mount })
}

/// What an AddShare asks for. Both parts are required; a read-only share is mounted read-only.
pub fn share_request(request: v1::AddShareRequest) -> Result<ShareSpec, ApiError> {
    let share = ShareConfig::try_from(
        request
            .share
            .ok_or_else(|| invalid("add share request", "the share is missing"))?,
    )?;
    let mut mount = ShareMount::try_from(
        request
            .mount
            .ok_or_else(|| invalid("add share request", "the mount is missing"))?,
    )?;
    mount.read_only |= share.read_only;
    Ok(ShareSpec { share, mount })
}

fn references(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl From<&MountInfo<DiskMount>> for v1::DiskMountInfo {
    fn from(m: &MountInfo<DiskMount>) -> v1::DiskMountInfo {
        let mut out = v1::DiskMountInfo {
            mount: Some((&m.config).into()),
            references: references(m.references),
            ..v1::DiskMountInfo::default()
        };
        out.set_state(m.state.into());
        out
    }
}

impl From<&MountInfo<ShareMount>> for v1::ShareMountInfo {
    fn from(m: &MountInfo<ShareMount>) -> v1::ShareMountInfo {
        let mut out = v1::ShareMountInfo {
            mount: Some((&m.config).into()),
            references: references(m.references),
            ..v1::ShareMountInfo::default()
        };
        out.set_state(m.state.into());
        out
    }
}

impl From<&DiskInfo> for v1::Disk {
    fn from(d: &DiskInfo) -> v1::Disk {
        let mut out = v1::Disk {
            slot: d.slot.index(),
            controller: d.slot.controller.into(),
            lun: d.slot.lun.into(),
            config: Some((&d.config).into()),
            cold: d.cold,
            mounts: d.mounts.iter().map(Into::into).collect(),
            ..v1::Disk::default()
        };
        out.set_state(d.state.into());
        out
    }
}

impl From<&ShareInfo> for v1::Share {
    fn from(s: &ShareInfo) -> v1::Share {
        let mut out = v1::Share {
            tag: s.tag.clone(),
            config: Some((&s.config).into()),
            cold: s.cold,
            mounts: s.mounts.iter().map(Into::into).collect(),
            ..v1::Share::default()
        };
        out.set_state(s.state.into());
        out
    }
}

impl From<&Devices> for v1::Devices {
    fn from(devices: &Devices) -> v1::Devices {
        v1::Devices {
            disks: devices.disks.iter().map(Into::into).collect(),
            shares: devices.shares.iter().map(Into::into).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use uvm::seams::ScsiSlot;

    use super::*;

    fn disk() -> DiskConfig {
        DiskConfig {
            host_path: "/images/data.img".into(),
            format: DiskFormat::Qcow2,
            read_only: true,
            cache: DiskCache::Unsafe,
            discard: true,
        }
    }

    fn mount() -> DiskMount {
        DiskMount {
            guest_path: "/data".into(),
            partition: 2,
            read_only: true,
            fs_type: Some("xfs".into()),
            options: vec!["noatime".into()],
        }
    }

    #[test]
    fn a_request_without_its_parts_or_paths_is_refused() {
        let missing_disk = disk_request(v1::AddDiskRequest {
            disk: None,
            mount: Some((&mount()).into()),
        });
        assert!(
            matches!(&missing_disk, Err(ApiError::InvalidRequest { message, .. }) if message.contains("disk is missing")),
            "{missing_disk:?}"
        );
        let no_host_path = disk_request(v1::AddDiskRequest {
            disk: Some(v1::DiskConfig::default()),
            mount: Some((&mount()).into()),
        });
        assert!(
            matches!(&no_host_path, Err(ApiError::InvalidRequest { message, .. }) if message.contains("host path")),
            "{no_host_path:?}"
        );
        let no_guest_path = disk_request(v1::AddDiskRequest {
            disk: Some((&disk()).into()),
            mount: Some(v1::DiskMount::default()),
        });
        assert!(
            matches!(&no_guest_path, Err(ApiError::InvalidRequest { message, .. }) if message.contains("guest path")),
            "{no_guest_path:?}"
        );
        let missing_mount = share_request(v1::AddShareRequest {
            share: Some(v1::ShareConfig {
                host_path: "/srv".into(),
                read_only: false,
            }),
            mount: None,
        });
        assert!(
            matches!(&missing_mount, Err(ApiError::InvalidRequest { message, .. }) if message.contains("mount is missing")),
            "{missing_mount:?}"
        );
        let no_share_path = share_request(v1::AddShareRequest {
            share: Some(v1::ShareConfig::default()),
            mount: Some(v1::ShareMount {
                guest_path: "/srv".into(),
                read_only: false,
            }),
        });
        assert!(
            matches!(no_share_path, Err(ApiError::InvalidRequest { .. })),
            "{no_share_path:?}"
        );
    }

    #[test]
    fn an_unknown_format_or_cache_value_is_refused() {
        let mut format = v1::DiskConfig::from(&disk());
        format.format = 99;
        let e = DiskConfig::try_from(format).expect_err("format 99");
        assert!(e.to_string().contains("99"), "{e}");
        let mut cache = v1::DiskConfig::from(&disk());
        cache.cache = -1;
        let e = DiskConfig::try_from(cache).expect_err("cache -1");
        assert!(
            matches!(
                e,
                ApiError::InvalidRequest {
                    what: "disk cache",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn disks_and_mounts_round_trip_and_unset_values_take_the_defaults() {
        assert_eq!(
            DiskConfig::try_from(v1::DiskConfig::from(&disk())).ok(),
            Some(disk())
        );
        assert_eq!(
            DiskMount::try_from(v1::DiskMount::from(&mount())).ok(),
            Some(mount())
        );
        for cache in [
            DiskCache::None,
            DiskCache::Writeback,
            DiskCache::Writethrough,
        ] {
            let d = DiskConfig { cache, ..disk() };
            assert_eq!(DiskConfig::try_from(v1::DiskConfig::from(&d)).ok(), Some(d));
        }
        let bare = DiskConfig::try_from(v1::DiskConfig {
            host_path: "/d.img".into(),
            ..v1::DiskConfig::default()
        })
        .expect("bare disk");
        assert_eq!(bare, DiskConfig::raw("/d.img"));
        let probed = DiskMount::try_from(v1::DiskMount {
            guest_path: "/d".into(),
            ..v1::DiskMount::default()
        })
        .expect("bare mount");
        assert_eq!(probed, DiskMount::at("/d"));
        let share = ShareConfig {
            host_path: "/srv/www".into(),
            read_only: true,
        };
        assert_eq!(
            ShareConfig::try_from(v1::ShareConfig::from(&share)).ok(),
            Some(share)
        );
        let at = ShareMount {
            guest_path: "/www".into(),
            read_only: false,
        };
        assert_eq!(
            ShareMount::try_from(v1::ShareMount::from(&at)).ok(),
            Some(at)
        );
    }

    #[test]
    fn a_read_only_disk_or_share_is_mounted_read_only() {
        let spec = disk_request(v1::AddDiskRequest {
            disk: Some((&disk()).into()),
            mount: Some(v1::DiskMount {
                guest_path: "/data".into(),
                read_only: false,
                ..v1::DiskMount::default()
            }),
        })
        .expect("request");
        assert!(spec.mount.read_only);
        let writable = disk_request(v1::AddDiskRequest {
            disk: Some(v1::DiskConfig {
                host_path: "/w.img".into(),
                ..v1::DiskConfig::default()
            }),
            mount: Some(v1::DiskMount {
                guest_path: "/w".into(),
                ..v1::DiskMount::default()
            }),
        })
        .expect("request");
        assert!(!writable.mount.read_only && !writable.disk.read_only);
        let share = share_request(v1::AddShareRequest {
            share: Some(v1::ShareConfig {
                host_path: "/srv".into(),
                read_only: true,
            }),
            mount: Some(v1::ShareMount {
                guest_path: "/srv".into(),
                read_only: false,
            }),
        })
        .expect("request");
        assert!(share.mount.read_only);
    }

    #[test]
    fn every_device_state_maps_to_its_own_specified_value() {
        let disks: Vec<v1::DiskState> = DiskState::ALL.into_iter().map(Into::into).collect();
        let shares: Vec<v1::ShareState> = ShareState::ALL.into_iter().map(Into::into).collect();
        let mounts: Vec<v1::MountState> = MountState::ALL.into_iter().map(Into::into).collect();
        let names = |names: Vec<&str>, prefix: &str| -> Vec<String> {
            names
                .into_iter()
                .map(|n| n.trim_start_matches(prefix).replace('_', ""))
                .collect()
        };
        let ours = |names: Vec<&str>| -> Vec<String> {
            names.into_iter().map(|n| n.to_uppercase()).collect()
        };
        assert_eq!(
            names(
                disks.iter().map(|s| s.as_str_name()).collect(),
                "DISK_STATE_"
            ),
            ours(DiskState::ALL.iter().map(|s| s.as_str()).collect())
        );
        assert_eq!(
            names(
                shares.iter().map(|s| s.as_str_name()).collect(),
                "SHARE_STATE_"
            ),
            ours(ShareState::ALL.iter().map(|s| s.as_str()).collect())
        );
        assert_eq!(
            names(
                mounts.iter().map(|s| s.as_str_name()).collect(),
                "MOUNT_STATE_"
            ),
            ours(MountState::ALL.iter().map(|s| s.as_str()).collect())
        );
    }

    #[test]
    fn devices_keep_slots_tags_states_and_mounts() {
        let devices = Devices {
            disks: vec![DiskInfo {
                slot: ScsiSlot {
                    controller: 1,
                    lun: 3,
                },
                config: disk(),
                state: DiskState::Ejected,
                cold: true,
                mounts: vec![MountInfo {
                    config: mount(),
                    state: MountState::Mounted,
                    references: 2,
                }],
            }],
            shares: vec![ShareInfo {
                tag: "uvm-share-0".into(),
                config: ShareConfig {
                    host_path: "/srv".into(),
                    read_only: false,
                },
                state: ShareState::Invalid,
                cold: false,
                mounts: vec![MountInfo {
                    config: ShareMount {
                        guest_path: "/srv".into(),
                        read_only: false,
                    },
                    state: MountState::Unmounted,
                    references: 1,
                }],
            }],
        };
        let v = v1::Devices::from(&devices);
        let d = &v.disks[0];
        assert_eq!((d.slot, d.controller, d.lun), (67, 1, 3));
        assert_eq!(d.state(), v1::DiskState::Ejected);
        assert!(d.cold);
        assert_eq!(
            d.config.as_ref().map(|c| c.host_path.as_str()),
            Some("/images/data.img")
        );
        assert_eq!(d.mounts[0].state(), v1::MountState::Mounted);
        assert_eq!(d.mounts[0].references, 2);
        assert_eq!(
            d.mounts[0].mount.as_ref().map(|m| m.fs_type.as_str()),
            Some("xfs")
        );
        let s = &v.shares[0];
        assert_eq!(s.tag, "uvm-share-0");
        assert_eq!(s.state(), v1::ShareState::Invalid);
        assert!(!s.cold);
        assert_eq!(s.mounts[0].state(), v1::MountState::Unmounted);
    }
}
