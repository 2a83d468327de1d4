//! Mounts the host asks for: disks ([`disk`]) and what every mount shares — the guest-path
//! checks ([`path`]), the mount table (`/proc/self/mountinfo`), mount options, the mount point
//! and the unmount that is never lazy.

pub mod disk;
pub mod path;
pub mod share;
pub(crate) mod uevent;

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd as _, OwnedFd};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags, MsFlags};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use uvm_agent_proto::MAX_MOUNT_OPTIONS_BYTES;

use crate::error::ApiError;

/// The kernel's mount table of the agent's mount namespace.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of `/proc/self/mountinfo`: which device is mounted where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mounted device's `(major, minor)`.
    pub dev: (u32, u32),
    /// Where it is mounted (unescaped).
    pub mount_point: PathBuf,
}

/// The entries of a mountinfo text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options ...
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            let (major, minor) = dev.split_once(':')?;
            Some(MountEntry {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                mount_point: PathBuf::from(OsStr::from_bytes(&unescape(mount_point))),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal); the field's bytes.
pub(crate) fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// The agent's mount table now.
///
/// # Errors
/// [`ApiError::Proc`] when `/proc/self/mountinfo` cannot be read.
pub fn mount_table() -> Result<Vec<MountEntry>, ApiError> {
    std::fs::read_to_string(MOUNTINFO)
        .map(|t| parse_mountinfo(&t))
        .map_err(|source| ApiError::Proc {
            what: MOUNTINFO.to_owned(),
            source,
        })
}

/// The last mount on `path` (the one a process there sees), if any.
pub fn mounted_at<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|e| e.mount_point == path)
}

/// mount(8)-style options split into flags and filesystem data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The flags (`MS_RDONLY`, `MS_NOATIME`, …).
    pub flags: MsFlags,
    /// What is left for the filesystem, comma-separated.
    pub data: String,
}

/// `options` (one option each, no commas) with `read_only` as `MS_RDONLY`. `rw` does not undo
/// `read_only`.
///
/// # Errors
/// [`ApiError::InvalidArgument`] for an empty option, one holding a comma or NUL, or options
/// longer than the kernel's page of mount data.
pub fn parse_options(read_only: bool, options: &[String]) -> Result<MountOptions, ApiError> {
    let mut flags = MsFlags::empty();
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let mut data: Vec<&str> = Vec::new();
    let total: usize = options.iter().map(|o| o.len() + 1).sum();
    if total > MAX_MOUNT_OPTIONS_BYTES {
        return Err(ApiError::invalid(
            "options",
            format!("{total} bytes, at most {MAX_MOUNT_OPTIONS_BYTES} allowed"),
        ));
    }
    for option in options {
        if option.is_empty() || option.contains([',', '\0']) {
            return Err(ApiError::invalid(
                "options",
                format!("{option:?}: one non-empty option each, without commas or NUL"),
            ));
        }
        let flag = match option.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "rw" | "defaults" => MsFlags::empty(),
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            other => {
                data.push(other);
                continue;
            }
        };
        flags |= flag;
    }
    Ok(MountOptions {
        flags,
        data: data.join(","),
    })
}

/// The security policy's say on a mount, given the mount point with its symlinks resolved (what
/// the mount will land on), before anything is mounted.
pub type Decide = Box<dyn FnOnce(&Path) -> Result<(), ApiError> + Send>;

/// Where a mount goes: the mount point with its symlinks resolved, held open so that the mount
/// lands on the very directory that was checked (and that the security policy decided on),
/// whatever happens to the path in between.
#[derive(Debug)]
pub struct MountTarget {
    /// The mount point, symlinks resolved.
    pub path: PathBuf,
    /// The directory, opened `O_PATH` without following any symlink.
    dir: OwnedFd,
}

impl MountTarget {
    /// Opens `path` (absolute, symlinks resolved) without following a symlink anywhere on it:
    /// a component that became one since it was resolved fails the open.
    fn open(path: PathBuf) -> io::Result<MountTarget> {
        let dir = rustix::fs::openat2(
            rustix::fs::CWD,
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )?;
        Ok(MountTarget { path, dir })
    }

    /// What `mount(2)` is given: the open directory's `/proc/self/fd` link, which the kernel
    /// follows to that directory and nowhere else.
    pub fn syscall_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }

    /// The same path opened again, now that something is mounted on it: its `syscall_path`
    /// reaches the new mount (to remount it).
    pub fn reopen(&self) -> io::Result<MountTarget> {
        MountTarget::open(self.path.clone())
    }
}

/// Makes `path` (checked) and its parents, and resolves it: the mount goes where its symlinks
/// lead, which must pass the same rules, and is held open there ([`MountTarget`]).
///
/// # Errors
/// [`ApiError::Mount`] when it cannot be made, resolved or opened, [`ApiError::InvalidArgument`]
/// when it leads somewhere a mount may not go or is not a directory.
pub fn prepare_mount_point(field: &'static str, path: &Path) -> Result<MountTarget, ApiError> {
    let failed = |op, source| ApiError::Mount {
        op,
        target: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(path).map_err(|e| failed("create the mount point", e))?;
    let resolved = std::fs::canonicalize(path).map_err(|e| failed("resolve the mount point", e))?;
    path::check_mount_point_rules(field, &resolved)?;
    if !resolved.is_dir() {
        return Err(ApiError::invalid(
            field,
            format!("{} is not a directory", resolved.display()),
        ));
    }
    MountTarget::open(resolved).map_err(|e| {
        failed(
            "open the mount point (did it change while it was resolved?)",
            e,
        )
    })
}

/// Unmounts what is mounted at `guest_path` — never lazily: a mount in use is
/// [`ApiError::Busy`], for the host to retry once the guest lets go.
///
/// # Errors
/// [`ApiError::InvalidArgument`] for a path that fails the checks, [`ApiError::NotMounted`]
/// when nothing is mounted there, [`ApiError::Busy`] while it is in use,
/// [`ApiError::Mount`] otherwise.
pub fn unmount(field: &'static str, guest_path: &str) -> Result<(), ApiError> {
    let path = path::check_mount_point(field, guest_path)?;
    let not_mounted = || ApiError::NotMounted {
        path: guest_path.to_owned(),
    };
    let resolved = match std::fs::canonicalize(&path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_mounted()),
        Err(source) => {
            return Err(ApiError::Mount {
                op: "resolve",
                target: guest_path.to_owned(),
                source,
            })
        }
    };
    path::check_mount_point_rules(field, &resolved)?;
    if mounted_at(&mount_table()?, &resolved).is_none() {
        return Err(not_mounted());
    }
    match umount2(&resolved, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => Err(ApiError::Busy {
            what: format!(
                "{guest_path} is in use in the guest (a process has a file, a mount or its working directory there)"
            ),
        }),
        Err(Errno::EINVAL) => Err(not_mounted()),
        Err(e) => Err(ApiError::Mount {
            op: "unmount",
            target: guest_path.to_owned(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_TEXT: &str = "\
22 1 0:20 / / rw,relatime - rootfs rootfs rw
23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,mode=755
40 22 8:16 / /mnt/my\\040disk rw,relatime - ext4 /dev/sdb rw
41 22 8:17 / /mnt/p rw - ext4 /dev/sdb1 rw
42 41 8:32 / /mnt/p ro - ext4 /dev/sdc ro
garbage
";

    #[test]
    fn mountinfo_gives_devices_and_unescaped_mount_points() {
        let table = parse_mountinfo(MOUNTINFO_TEXT);
        assert_eq!(table.len(), 5);
        assert_eq!(
            table[2],
            MountEntry {
                dev: (8, 16),
                mount_point: "/mnt/my disk".into()
            }
        );
        // The last mount on a path is the visible one.
        assert_eq!(
            mounted_at(&table, Path::new("/mnt/p")).map(|e| e.dev),
            Some((8, 32))
        );
        assert!(mounted_at(&table, Path::new("/mnt")).is_none());
    }

    #[test]
    fn options_become_flags_and_data() {
        let o = parse_options(
            true,
            &[
                "noatime".into(),
                "errors=remount-ro".into(),
                "nodev".into(),
                "discard".into(),
            ],
        )
        .expect("valid");
        assert_eq!(
            o.flags,
            MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | MsFlags::MS_NODEV
        );
        assert_eq!(o.data, "errors=remount-ro,discard");
        let rw = parse_options(false, &["rw".into()]).expect("valid");
        assert_eq!((rw.flags, rw.data.as_str()), (MsFlags::empty(), ""));
    }

    #[test]
    fn options_with_commas_nul_or_nothing_are_invalid() {
        for bad in ["a,b", "", "x\0y"] {
            assert!(
                matches!(
                    parse_options(false, &[bad.to_owned()]),
                    Err(ApiError::InvalidArgument {
                        field: "options",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        let huge = vec!["x".repeat(100); 50];
        assert!(matches!(
            parse_options(false, &huge),
            Err(ApiError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn a_mount_point_is_made_and_a_link_into_proc_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = dir.path().join("a/b");
        let target = prepare_mount_point("guest_path", &made).expect("made");
        assert!(target.path.is_dir());
        assert_eq!(
            std::fs::canonicalize(target.syscall_path()).expect("the fd's directory"),
            std::fs::canonicalize(&made).expect("made")
        );
        let link = dir.path().join("sneaky");
        std::os::unix::fs::symlink("/proc/self", &link).expect("link");
        assert!(matches!(
            prepare_mount_point("guest_path", &link),
            Err(ApiError::InvalidArgument { reason, .. }) if reason.contains("kernel")
        ));
    }
}
