//! Shared directories: `MountShare` and `UnmountShare`. A share is a host directory the VM
//! serves under a tag, over virtio-fs (`mount -t virtiofs TAG`) or 9p (`mount -t 9p -o
//! trans=virtio TAG`).
//!
//! A hot-added share's device reaches the guest some time after the host added it, so a mount
//! may wait for it: the agent listens to the kernel's uevents and retries the mount at each
//! one until the deadline — an event, not a sleep. The kernel tells a missing device apart by
//! its error: `EINVAL` for virtio-fs ("virtio-fs: tag <…> not found" in the kernel log) and
//! `ENOENT` for 9p ("no channels available for device …"); the mount options are ours, so
//! nothing else this request controls yields those.
//!
//! Mounting the same share at the same path again is a no-op (the host retries after a lost
//! reply); anything else already mounted there is busy. A 9p channel serves one mount only, so
//! a second guest path of the same 9p share is a bind mount of the first. Unmounting is never
//! lazy: a share in use is busy, and the host retries.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use uvm_agent_proto::ttrpc::Code;

use crate::error::ApiError;
use crate::mounts::path::check_mount_point;
use crate::mounts::{unescape, Decide, MountTarget};

/// `msize` of 9p mounts: the largest message, so the largest single read or write. The kernel's
/// virtio transport takes up to about 500 KiB; 256 KiB keeps each request's buffers modest.
pub const NINEP_MSIZE: u32 = 256 * 1024;
/// The longest tag virtio-fs carries (`struct virtio_fs_config`), used for both transports.
pub const MAX_TAG_BYTES: usize = 36;

/// How the guest reaches a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-fs, served by a virtiofsd on the host.
    VirtioFs,
    /// 9p over virtio, served by QEMU.
    NineP,
}

impl Transport {
    /// The filesystem type the kernel knows it by.
    pub const fn fstype(self) -> &'static str {
        match self {
            Transport::VirtioFs => "virtiofs",
            Transport::NineP => "9p",
        }
    }

    fn data(self) -> Option<String> {
        match self {
            Transport::VirtioFs => None,
            Transport::NineP => Some(format!("trans=virtio,version=9p2000.L,msize={NINEP_MSIZE}")),
        }
    }

    /// Whether a failed mount says the share's device is not (yet) there.
    fn device_absent(self, e: Errno) -> bool {
        match self {
            Transport::VirtioFs => e == Errno::EINVAL,
            Transport::NineP => e == Errno::ENOENT,
        }
    }
}

/// A share to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRequest {
    /// The tag the host gave it.
    pub tag: String,
    /// How it is reached.
    pub transport: Transport,
    /// Where to mount it (checked, made if missing).
    pub guest_path: String,
    /// Mount it read-only.
    pub read_only: bool,
    /// How long to wait for its device to appear.
    pub wait: Duration,
}

/// Why a share request failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The tag cannot name a share.
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag {
        /// The tag.
        tag: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No device serves the tag (it did not appear within the wait).
    #[error("no {fstype} device with tag {tag:?} (waited {waited:?})")]
    NoDevice {
        /// The tag.
        tag: String,
        /// `virtiofs` or `9p`.
        fstype: &'static str,
        /// How long the agent waited for it.
        waited: Duration,
    },
    /// Something else is mounted at the path.
    #[error("{path} already has a {fstype} mount of {source_name:?}")]
    Occupied {
        /// The mount point.
        path: String,
        /// What is mounted there.
        fstype: String,
        /// Its source.
        source_name: String,
    },
    /// Nothing is mounted at the path.
    #[error("no share is mounted at {path}")]
    NotMounted {
        /// The path.
        path: String,
    },
    /// What is mounted at the path is not a share (an `UnmountShare` never unmounts it).
    #[error("{path} is a {fstype} mount, not a share")]
    NotAShare {
        /// The mount point.
        path: String,
        /// What is mounted there.
        fstype: String,
    },
    /// The share is in use (open files, a working directory, a mount under it).
    #[error("{path} is in use")]
    InUse {
        /// The mount point.
        path: String,
    },
    /// The mount point could not be made or resolved.
    #[error("cannot make the mount point {path}")]
    MountPoint {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `mount(2)` failed.
    #[error("cannot mount {tag:?} ({fstype}) at {path}")]
    Mount {
        /// The tag.
        tag: String,
        /// `virtiofs` or `9p`.
        fstype: &'static str,
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// `umount2(2)` failed.
    #[error("cannot unmount {path}")]
    Unmount {
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The mount table could not be read, or the uevent socket not opened.
    #[error("cannot {what}")]
    System {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ShareError {
    /// The ttrpc status code the host sees.
    pub fn code(&self) -> Code {
        match self {
            ShareError::InvalidTag { .. } => Code::INVALID_ARGUMENT,
            ShareError::NoDevice { .. } | ShareError::NotMounted { .. } => Code::NOT_FOUND,
            // The agent's code for "in use, retry once it is not".
            ShareError::Occupied { .. } | ShareError::InUse { .. } => Code::UNAVAILABLE,
            ShareError::NotAShare { .. } => Code::FAILED_PRECONDITION,
            ShareError::MountPoint { source, .. } => match source.raw_os_error() {
                Some(e) => errno_code(Errno::from_raw(e)),
                None => Code::INTERNAL,
            },
            ShareError::Mount { source, .. } | ShareError::Unmount { source, .. } => {
                errno_code(*source)
            }
            ShareError::System { .. } => Code::INTERNAL,
        }
    }
}

fn errno_code(e: Errno) -> Code {
    match e {
        Errno::EACCES | Errno::EPERM | Errno::EROFS => Code::PERMISSION_DENIED,
        Errno::EBUSY => Code::UNAVAILABLE,
        Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => Code::NOT_FOUND,
        Errno::EINVAL | Errno::ENAMETOOLONG => Code::INVALID_ARGUMENT,
        Errno::ENOTDIR | Errno::EEXIST | Errno::ELOOP => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    }
}

fn check_tag(tag: &str) -> Result<(), ShareError> {
    let reason = if tag.is_empty() {
        "must not be empty".to_owned()
    } else if tag.len() > MAX_TAG_BYTES {
        format!("{} bytes, at most {MAX_TAG_BYTES} allowed", tag.len())
    } else if tag.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        "contains a control character or a space".to_owned()
    } else {
        return Ok(());
    };
    Err(ShareError::InvalidTag {
        tag: tag.to_owned(),
        reason,
    })
}

/// Mount the share `req` asks for. Blocking (it may wait for the device): run it off the
/// async threads.
///
/// # Errors
/// Invalid tag or path ([`Code::INVALID_ARGUMENT`]), no device in time
/// ([`Code::NOT_FOUND`]), something else mounted there ([`Code::UNAVAILABLE`]), or the mount
/// failed (its errno decides the code).
pub fn mount_share(req: &ShareRequest, decide: Decide) -> Result<(), ApiError> {
    check_tag(&req.tag)?;
    let target = mount_point(&req.guest_path)?;
    decide(&target.path)?;
    let path = target.path.clone();
    let shown = path.display().to_string();
    let table = MountTable::read()?;
    if let Some(top) = table.top_at(&path) {
        if top.fstype == req.transport.fstype()
            && top.source == req.tag
            && top.read_only == req.read_only
        {
            return Ok(());
        }
        return Err(ShareError::Occupied {
            path: shown,
            fstype: top.fstype.clone(),
            source_name: top.source.clone(),
        }
        .into());
    }
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if req.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let fstype = req.transport.fstype();
    let failed = |source| ShareError::Mount {
        tag: req.tag.clone(),
        fstype,
        path: shown.clone(),
        source,
    };
    if req.transport == Transport::NineP {
        if let Some(first) = table.find_share(fstype, &req.tag) {
            return Ok(bind_mount(&first.mount_point, &target, flags).map_err(failed)?);
        }
    }
    // Listen before the first attempt, so a device that appears in between is not missed.
    let uevents = if req.wait.is_zero() {
        None
    } else {
        Some(Uevents::open()?)
    };
    let start = Instant::now();
    let deadline = start + req.wait;
    let data = req.transport.data();
    loop {
        match mount(
            Some(req.tag.as_str()),
            &target.syscall_path(),
            Some(fstype),
            flags,
            data.as_deref(),
        ) {
            Ok(()) => return Ok(()),
            Err(e) if req.transport.device_absent(e) => {
                let appeared = match &uevents {
                    Some(events) => events.wait_until(deadline)?,
                    None => false,
                };
                if !appeared {
                    return Err(ShareError::NoDevice {
                        tag: req.tag.clone(),
                        fstype,
                        waited: start.elapsed(),
                    }
                    .into());
                }
            }
            Err(e) => return Err(failed(e).into()),
        }
    }
}

/// Unmount the share at `guest_path`. Never lazy: a share in use is [`Code::UNAVAILABLE`].
///
/// # Errors
/// Invalid path ([`Code::INVALID_ARGUMENT`]), no share mounted there ([`Code::NOT_FOUND`]),
/// another kind of mount there ([`Code::FAILED_PRECONDITION`]), in use, or the unmount failed.
pub fn unmount_share(guest_path: &str) -> Result<(), ApiError> {
    let checked = check_mount_point("guest_path", guest_path)?;
    let shown = checked.display().to_string();
    let path = match std::fs::canonicalize(&checked) {
        Ok(p) => check_mount_point("guest_path", &p.to_string_lossy())?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ShareError::NotMounted { path: shown }.into())
        }
        Err(source) => {
            return Err(ShareError::MountPoint {
                path: shown,
                source,
            }
            .into())
        }
    };
    let table = MountTable::read()?;
    let Some(top) = table.top_at(&path) else {
        return Err(ShareError::NotMounted { path: shown }.into());
    };
    if ![Transport::VirtioFs, Transport::NineP]
        .iter()
        .any(|t| t.fstype() == top.fstype)
    {
        return Err(ShareError::NotAShare {
            path: shown,
            fstype: top.fstype.clone(),
        }
        .into());
    }
    match umount2(&path, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => Err(ShareError::InUse { path: shown }.into()),
        Err(Errno::EINVAL) => Err(ShareError::NotMounted { path: shown }.into()),
        Err(source) => Err(ShareError::Unmount {
            path: shown,
            source,
        }
        .into()),
    }
}

/// Check `guest_path`, make it, and check where it really leads (a symlink in the guest must
/// not carry the mount onto a refused place); held open there ([`MountTarget`]).
fn mount_point(guest_path: &str) -> Result<MountTarget, ApiError> {
    let checked = check_mount_point("guest_path", guest_path)?;
    super::prepare_mount_point("guest_path", &checked)
}

/// Bind the mount at `from` onto `to`; `flags` beyond the bind (read-only, nosuid, nodev) need
/// a remount of the new mount, reached by opening the mount point again.
fn bind_mount(from: &Path, to: &MountTarget, flags: MsFlags) -> Result<(), Errno> {
    mount(
        Some(from),
        &to.syscall_path(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    let remount = flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    let remounted = to
        .reopen()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
    let result = remounted.and_then(|new| {
        mount(
            None::<&str>,
            &new.syscall_path(),
            None::<&str>,
            remount,
            None::<&str>,
        )
    });
    if let Err(e) = result {
        // Do not leave a bind with the wrong flags behind.
        let _ = umount2(&to.path, MntFlags::UMOUNT_NOFOLLOW);
        return Err(e);
    }
    Ok(())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
    source: String,
    read_only: bool,
}

/// The mounts of the agent's namespace, in mount order.
#[derive(Debug, Default)]
struct MountTable(Vec<MountEntry>);

impl MountTable {
    fn read() -> Result<MountTable, ShareError> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|text| MountTable::parse(&text))
            .map_err(|source| ShareError::System {
                what: "read /proc/self/mountinfo",
                source,
            })
    }

    /// Lines it cannot read are skipped: they cannot be one of ours.
    fn parse(text: &str) -> MountTable {
        MountTable(text.lines().filter_map(parse_mountinfo_line).collect())
    }

    /// The mount on top at `path` (the last one mounted there).
    fn top_at(&self, path: &Path) -> Option<&MountEntry> {
        self.0.iter().rev().find(|m| m.mount_point == path)
    }

    /// A mount of the share `tag` over `fstype`, anywhere.
    fn find_share(&self, fstype: &str, tag: &str) -> Option<&MountEntry> {
        self.0
            .iter()
            .rev()
            .find(|m| m.fstype == fstype && m.source == tag)
    }
}

/// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let mut left = before.split(' ');
    let mount_point = left.nth(4)?;
    let options = left.next()?;
    let mut right = after.split(' ');
    let fstype = right.next()?;
    let source = right.next()?;
    Some(MountEntry {
        mount_point: PathBuf::from(OsStr::from_bytes(&unescape(mount_point))),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
        read_only: options.split(',').any(|o| o == "ro"),
    })
}

/// The kernel's uevent broadcast (what udev listens to): every device that comes or goes.
struct Uevents(OwnedFd);

impl Uevents {
    fn open() -> Result<Uevents, ShareError> {
        let failed = |e: Errno| ShareError::System {
            what: "listen to uevents",
            source: e.into(),
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(failed)?;
        // Group 1: the kernel's own events (udev re-broadcasts on group 2; there is no udev).
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 1),
        )
        .map_err(failed)?;
        Ok(Uevents(fd))
    }

    /// Wait until the kernel announces something or `deadline` passes (`false`); what arrived
    /// is drained. An overflowing socket (`ENOBUFS`) counts as news too.
    fn wait_until(&self, deadline: Instant) -> Result<bool, ShareError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => {
                    return Err(ShareError::System {
                        what: "wait for uevents",
                        source: e.into(),
                    })
                }
            }
        }
        let mut buf = [0u8; 4096];
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.0);
        while matches!(
            recv(raw, &mut buf, MsgFlags::MSG_DONTWAIT),
            Ok(_) | Err(Errno::ENOBUFS)
        ) {}
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:20 / / rw,relatime - rootfs rootfs rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec - proc proc rw
30 22 0:30 / /mnt/my\\040data rw,nosuid,nodev - virtiofs uvm-cold-0 rw
31 22 0:31 / /mnt/ro ro,nosuid,nodev - 9p uvm-hot-1 ro,trans=virtio
32 30 0:32 / /mnt/my\\040data rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let table = MountTable::parse(MOUNTINFO);
        assert_eq!(table.0.len(), 5);
        assert_eq!(
            table.0[2],
            MountEntry {
                mount_point: PathBuf::from("/mnt/my data"),
                fstype: "virtiofs".into(),
                source: "uvm-cold-0".into(),
                read_only: false,
            }
        );
        assert!(table.0[3].read_only);
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn the_last_mount_at_a_path_is_the_one_on_top() {
        let table = MountTable::parse(MOUNTINFO);
        let top = table.top_at(Path::new("/mnt/my data")).unwrap();
        assert_eq!(top.fstype, "tmpfs");
        assert!(table.top_at(Path::new("/mnt/none")).is_none());
        let share = table.find_share("9p", "uvm-hot-1").unwrap();
        assert_eq!(share.mount_point, Path::new("/mnt/ro"));
        assert!(table.find_share("virtiofs", "uvm-hot-1").is_none());
    }

    #[test]
    fn bad_tags_are_invalid_arguments() {
        for tag in ["", "a b", "tab\t", &"x".repeat(MAX_TAG_BYTES + 1)] {
            let e = check_tag(tag).unwrap_err();
            assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{tag:?}");
        }
        assert!(check_tag("uvm-cold-0").is_ok());
        assert!(check_tag(&"x".repeat(MAX_TAG_BYTES)).is_ok());
    }

    #[test]
    fn mount_errors_map_to_the_codes_the_host_acts_on() {
        let mount = |source| ShareError::Mount {
            tag: "t".into(),
            fstype: "virtiofs",
            path: "/mnt".into(),
            source,
        };
        assert_eq!(mount(Errno::EACCES).code(), Code::PERMISSION_DENIED);
        assert_eq!(mount(Errno::EROFS).code(), Code::PERMISSION_DENIED);
        assert_eq!(mount(Errno::EBUSY).code(), Code::UNAVAILABLE);
        assert_eq!(mount(Errno::EIO).code(), Code::INTERNAL);
        assert_eq!(
            ShareError::InUse { path: "/m".into() }.code(),
            Code::UNAVAILABLE
        );
        assert_eq!(
            ShareError::NotMounted { path: "/m".into() }.code(),
            Code::NOT_FOUND
        );
        let absent = ShareError::NoDevice {
            tag: "t".into(),
            fstype: "9p",
            waited: Duration::ZERO,
        };
        assert_eq!(absent.code(), Code::NOT_FOUND);
    }

    #[test]
    fn each_transport_names_its_missing_device_error() {
        assert!(Transport::VirtioFs.device_absent(Errno::EINVAL));
        assert!(!Transport::VirtioFs.device_absent(Errno::ENOENT));
        assert!(Transport::NineP.device_absent(Errno::ENOENT));
        assert!(!Transport::NineP.device_absent(Errno::EINVAL));
        assert_eq!(Transport::VirtioFs.data(), None);
        assert_eq!(
            Transport::NineP.data().as_deref(),
            Some("trans=virtio,version=9p2000.L,msize=262144")
        );
    }

    #[test]
    fn invalid_paths_are_refused_before_anything_is_made() {
        let req = ShareRequest {
            tag: "t".into(),
            transport: Transport::VirtioFs,
            guest_path: "/proc/x".into(),
            read_only: false,
            wait: Duration::ZERO,
        };
        assert!(matches!(
            mount_share(&req, Box::new(|_| panic!("not asked for a bad path"))),
            Err(ApiError::InvalidArgument {
                field: "guest_path",
                ..
            })
        ));
        assert!(matches!(
            unmount_share("relative"),
            Err(ApiError::InvalidArgument {
                field: "guest_path",
                ..
            })
        ));
    }

    #[test]
    fn the_policy_is_asked_about_where_a_symlink_leads_and_its_no_mounts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("real dir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("link");
        let req = ShareRequest {
            tag: "t".into(),
            transport: Transport::VirtioFs,
            guest_path: link.display().to_string(),
            read_only: true,
            wait: Duration::ZERO,
        };
        let asked = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = asked.clone();
        let refused = mount_share(
            &req,
            Box::new(move |resolved| {
                *uvm_util::lock(&seen) = Some(resolved.to_path_buf());
                Err(ApiError::invalid("guest_path", "refused by the test"))
            }),
        );
        assert!(matches!(refused, Err(ApiError::InvalidArgument { .. })));
        assert_eq!(
            uvm_util::lock(&asked).clone(),
            Some(std::fs::canonicalize(&real).expect("real"))
        );
        assert!(MountTable::read()
            .expect("mountinfo")
            .top_at(&std::fs::canonicalize(&real).expect("real"))
            .is_none());
    }
}
