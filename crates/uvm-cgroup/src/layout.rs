//! Which cgroup version the host runs and where its hierarchies are mounted, read from
//! `/proc/self/mountinfo` — detected, never assumed.

use std::path::{Path, PathBuf};

use crate::CgroupError;

/// The v1 controllers a VM's cgroup uses: CPU limits (`cpu`), CPU accounting (`cpuacct`),
/// memory accounting (`memory`), process membership (`pids`) and freezing for a clean kill
/// (`freezer`).
pub const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// The v1 controller a CPU group adds (a VM outside a group stays out of its hierarchy: a v1
/// cpuset cgroup starts with no CPUs and must be given some first).
pub const V1_CPUSET: &str = "cpuset";

/// The v2 controllers a VM's cgroup enables where the host has them.
pub const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// One v1 hierarchy: where it is mounted and which controllers it carries (`cpu,cpuacct` may
/// share one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Hierarchy {
    pub mount: PathBuf,
    pub controllers: Vec<String>,
}

impl V1Hierarchy {
    /// Whether it carries `controller`.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// The host's cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One unified hierarchy (`cgroup2`) mounted at `root`.
    V2 { root: PathBuf },
    /// Separate hierarchies (`cgroup`), those with a controller of [`V1_CONTROLLERS`] or
    /// [`V1_CPUSET`]. A hybrid
    /// host (v1 controllers plus an empty `cgroup2` mount, as systemd's "hybrid" mode makes) is
    /// v1: that is where the controllers are.
    V1 { hierarchies: Vec<V1Hierarchy> },
}

impl Layout {
    /// The layout of this process's mount namespace.
    ///
    /// # Errors
    /// [`CgroupError::NotMounted`] when no usable hierarchy is mounted; the mount table could not
    /// be read.
    pub fn detect() -> Result<Layout, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
            operation: "read",
            path: path.to_owned(),
            source,
        })?;
        Layout::from_mountinfo(&text)
    }

    /// The layout `mountinfo` (the text of `/proc/<pid>/mountinfo`) describes.
    ///
    /// # Errors
    /// [`CgroupError::NotMounted`] when it has neither a v1 hierarchy with the `cpu` controller
    /// nor a `cgroup2` mount.
    pub fn from_mountinfo(mountinfo: &str) -> Result<Layout, CgroupError> {
        let mut v1 = Vec::new();
        let mut v2 = Vec::new();
        for line in mountinfo.lines() {
            let Some((fstype, mount, super_options)) = parse_line(line) else {
                continue;
            };
            match fstype {
                "cgroup2" => v2.push(mount),
                "cgroup" => {
                    let controllers: Vec<String> = super_options
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o) || *o == V1_CPUSET)
                        .map(str::to_owned)
                        .collect();
                    if !controllers.is_empty() {
                        v1.push(V1Hierarchy { mount, controllers });
                    }
                }
                _ => {}
            }
        }
        if v1.iter().any(|h| h.has("cpu")) {
            return Ok(Layout::V1 { hierarchies: v1 });
        }
        // The conventional place first, when several are mounted.
        v2.sort_by_key(|m| m != Path::new("/sys/fs/cgroup"));
        match v2.into_iter().next() {
            Some(root) => Ok(Layout::V2 { root }),
            None => Err(CgroupError::NotMounted),
        }
    }

    /// `v2` or `v1`.
    pub fn version(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }
}

/// (filesystem type, mount point, super options) of one mountinfo line:
/// `ID PARENT MAJ:MIN ROOT MOUNT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_line(line: &str) -> Option<(&str, PathBuf, &str)> {
    let (before, after) = line.split_once(" - ")?;
    let mount = before.split(' ').nth(4)?;
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let super_options = after.next().unwrap_or("");
    Some((fstype, PathBuf::from(unescape(mount)), super_options))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These machines: v1 controllers, each its own hierarchy, plus systemd's empty cgroup2.
    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
32 31 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:29 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:32 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
37 31 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
38 31 0:34 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
39 31 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A current distribution: one unified hierarchy.
    const UNIFIED: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn a_host_with_v1_controllers_is_v1_even_with_an_empty_cgroup2_beside_them() {
        let Layout::V1 { hierarchies } = Layout::from_mountinfo(HYBRID).expect("v1") else {
            panic!("not v1");
        };
        let mounts: Vec<_> = hierarchies.iter().map(|h| h.mount.clone()).collect();
        assert_eq!(
            mounts,
            ["cpu", "cpuacct", "cpuset", "memory", "freezer", "pids"]
                .map(|c| PathBuf::from("/sys/fs/cgroup").join(c))
        );
        assert!(hierarchies[0].has("cpu") && !hierarchies[0].has("memory"));
    }

    #[test]
    fn comounted_v1_controllers_share_a_hierarchy() {
        let text = "32 31 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let Layout::V1 { hierarchies } = Layout::from_mountinfo(text).expect("v1") else {
            panic!("not v1");
        };
        assert_eq!(hierarchies.len(), 1);
        assert!(hierarchies[0].has("cpu") && hierarchies[0].has("cpuacct"));
        assert_eq!(
            hierarchies[0].mount,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
    }

    #[test]
    fn a_unified_host_is_v2_and_no_cgroups_is_an_error() {
        assert_eq!(
            Layout::from_mountinfo(UNIFIED).expect("v2"),
            Layout::V2 {
                root: PathBuf::from("/sys/fs/cgroup")
            }
        );
        assert!(matches!(
            Layout::from_mountinfo("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            Err(CgroupError::NotMounted)
        ));
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let text = "31 25 0:27 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Layout::from_mountinfo(text).expect("v2"),
            Layout::V2 {
                root: PathBuf::from("/mnt/my cgroups")
            }
        );
    }

    #[test]
    fn this_host_has_a_layout() {
        // Whatever this machine runs, detection must not fail where cgroups are mounted.
        if Path::new("/sys/fs/cgroup").exists() {
            let layout = Layout::detect().expect("detect");
            assert!(["v1", "v2"].contains(&layout.version()));
        }
    }
}
