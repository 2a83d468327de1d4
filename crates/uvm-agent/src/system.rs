//! PID-1 duties at boot: the pseudo filesystems, device links, environment and hostname that
//! exec'd programs expect. Every step is best-effort: a failure is logged and boot goes on.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::{info, warn};

/// Hostname of every utility VM.
pub const HOSTNAME: &str = "uvm";
/// `PATH` of the agent (and the default of its processes, see `DEFAULT_PATH`).
pub const AGENT_PATH: &str = "/bin:/sbin";

struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
    /// Absent kernel support (no such filesystem / mount point) is not worth a warning.
    optional: bool,
}

fn mounts() -> [Mount; 8] {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let secure = nosuid_nodev | MsFlags::MS_NOEXEC;
    [
        Mount {
            fstype: "proc",
            target: "/proc",
            flags: secure,
            data: "",
            optional: false,
        },
        Mount {
            fstype: "sysfs",
            target: "/sys",
            flags: secure,
            data: "",
            optional: false,
        },
        Mount {
            fstype: "devtmpfs",
            target: "/dev",
            flags: MsFlags::MS_NOSUID,
            data: "mode=0755",
            optional: false,
        },
        Mount {
            fstype: "devpts",
            target: "/dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: "mode=0620,ptmxmode=0666",
            optional: false,
        },
        Mount {
            fstype: "tmpfs",
            target: "/dev/shm",
            flags: nosuid_nodev,
            data: "mode=1777",
            optional: true,
        },
        Mount {
            fstype: "tmpfs",
            target: "/tmp",
            flags: nosuid_nodev,
            data: "mode=1777",
            optional: false,
        },
        Mount {
            fstype: "tmpfs",
            target: "/run",
            flags: nosuid_nodev,
            data: "mode=0755",
            optional: false,
        },
        Mount {
            fstype: "cgroup2",
            target: "/sys/fs/cgroup",
            flags: secure,
            data: "",
            optional: true,
        },
    ]
}

/// Mounts the pseudo filesystems, creates the usual `/dev` links, sets `PATH` and the hostname.
/// Must run before any thread is started (it sets environment variables).
pub fn setup() {
    for m in mounts() {
        let target = Path::new(m.target);
        if let Err(e) = std::fs::create_dir_all(target) {
            if !m.optional {
                warn!("cannot create {}: {e}", m.target);
            }
        }
        let data = (!m.data.is_empty()).then_some(m.data);
        match mount(Some(m.fstype), target, Some(m.fstype), m.flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(Errno::ENODEV | Errno::ENOENT) if m.optional => {}
            Err(e) => warn!("cannot mount {} on {}: {e}", m.fstype, m.target),
        }
    }
    for (link, to) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        // devtmpfs may already have a ptmx node; that works as well as the link.
        if let Err(e) = std::os::unix::fs::symlink(to, link) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                warn!("cannot link {link} -> {to}: {e}");
            }
        }
    }
    std::env::set_var("PATH", AGENT_PATH);
    if let Err(e) = rustix::system::sethostname(HOSTNAME.as_bytes()) {
        warn!("cannot set the hostname: {e}");
    }
    info!("filesystems mounted, hostname {HOSTNAME}");
}
