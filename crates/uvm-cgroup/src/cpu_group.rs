//! CPU groups (Hyper-V's CPU groups, which hcsshim's `UpdateCPUGroup` drives): a named parent
//! cgroup `uvmctl-groups/<name>` with a cap and optionally a cpuset, shared by the VMs moved into
//! it — their CPU sum is what the cap limits. On v2 it is one directory with `cpu` and `cpuset`
//! (and the VM controllers, for the VMs below it) enabled; on v1 a directory in the cpu, cpuacct
//! and cpuset hierarchies (a v1 cpuset cgroup starts with no CPUs or memory nodes: each is given
//! its parent's, or the CPUs asked for). A VM joins with [`VmCgroup::move_into`]: its
//! cpu-side directories become `<group>/<vm>`, its memory and pids ones stay where they were.

use std::path::{Path, PathBuf};

use crate::group::{check_name, io_error, keyed, make_new, pids_in, read, write, Dir};
use crate::layout::{Layout, V1_CPUSET, V2_CONTROLLERS};
use crate::{limits, CgroupError, Throttling, VmCgroup};

/// Where groups live, in every hierarchy.
pub const GROUPS_PARENT: &str = "uvmctl-groups";

/// The v1 controllers a group has a directory for.
const GROUP_CONTROLLERS: [&str; 3] = ["cpu", "cpuacct", V1_CPUSET];

/// A group's cap and CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSettings {
    /// The most CPU its VMs together may use, in percent of one host CPU (150: one and a
    /// half); `None`: no cap.
    pub cap_percent: Option<u32>,
    /// The host CPUs its VMs may run on (`0-1`, `0,2`); `None`: all of its parent's.
    pub cpus: Option<String>,
}

/// A named CPU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuGroup {
    name: String,
    v2: bool,
    dirs: Vec<Dir>,
}

/// Copies `cpuset.cpus` and `cpuset.mems` from `dir`'s parent where `dir`'s are empty (a new v1
/// cpuset cgroup), so that processes can join it.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = read(&dir.join(file)).unwrap_or_default();
        if own.trim().is_empty() {
            if let Some(theirs) = read(&parent.join(file)).filter(|t| !t.trim().is_empty()) {
                write(&dir.join(file), theirs.trim())?;
            }
        }
    }
    Ok(())
}

fn group_dirs(layout: &Layout, name: &str) -> (bool, Vec<Dir>) {
    let relative = Path::new("/").join(GROUPS_PARENT).join(name);
    match layout {
        Layout::V2 { root } => (
            true,
            vec![Dir {
                path: root.join(GROUPS_PARENT).join(name),
                relative,
                controllers: vec!["cpu".to_owned(), V1_CPUSET.to_owned()],
            }],
        ),
        Layout::V1 { hierarchies } => (
            false,
            hierarchies
                .iter()
                .filter(|h| GROUP_CONTROLLERS.iter().any(|c| h.has(c)))
                .map(|h| Dir {
                    path: h.mount.join(GROUPS_PARENT).join(name),
                    relative: relative.clone(),
                    controllers: h.controllers.clone(),
                })
                .collect(),
        ),
    }
}

impl CpuGroup {
    /// Makes the group `name` with `settings`.
    ///
    /// # Errors
    /// [`CgroupError::Exists`] when there is one by that name; a name that is not plain; the
    /// kernel refused.
    pub fn create(
        layout: &Layout,
        name: &str,
        settings: &GroupSettings,
    ) -> Result<CpuGroup, CgroupError> {
        check_name("cpu group name", name)?;
        let (v2, dirs) = group_dirs(layout, name);
        if let Layout::V2 { root } = layout {
            let available = read(&root.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<String> = V2_CONTROLLERS
                .iter()
                .chain(&[V1_CPUSET])
                .filter(|c| available.split_ascii_whitespace().any(|a| a == **c))
                .map(|c| format!("+{c}"))
                .collect();
            let parent = root.join(GROUPS_PARENT);
            write(&root.join("cgroup.subtree_control"), &enable.join(" "))?;
            match std::fs::create_dir(&parent) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(io_error("make", &parent)(e))
                }
                _ => {}
            }
            write(&parent.join("cgroup.subtree_control"), &enable.join(" "))?;
            make_new(&dirs[0].path)?;
            write(
                &dirs[0].path.join("cgroup.subtree_control"),
                &enable.join(" "),
            )?;
        } else {
            let mut made: Vec<&Path> = Vec::new();
            for d in &dirs {
                let result = d
                    .path
                    .parent()
                    .map_or(Ok(()), |p| {
                        std::fs::create_dir_all(p).map_err(io_error("make", p))
                    })
                    .and_then(|()| {
                        if d.has(V1_CPUSET) {
                            d.path.parent().map_or(Ok(()), inherit_cpuset)?;
                        }
                        make_new(&d.path)
                    })
                    .and_then(|()| {
                        if d.has(V1_CPUSET) {
                            inherit_cpuset(&d.path)?;
                        }
                        Ok(())
                    });
                if let Err(e) = result {
                    for m in made {
                        let _ = std::fs::remove_dir(m);
                    }
                    return Err(e);
                }
                made.push(&d.path);
            }
        }
        let group = CpuGroup {
            name: name.to_owned(),
            v2,
            dirs,
        };
        if let Err(e) = group.apply(settings) {
            let _ = group.remove();
            return Err(e);
        }
        Ok(group)
    }

    /// The group `name`.
    ///
    /// # Errors
    /// [`CgroupError::NoGroup`] when there is none; a name that is not plain.
    pub fn open(layout: &Layout, name: &str) -> Result<CpuGroup, CgroupError> {
        check_name("cpu group name", name)?;
        let (v2, dirs) = group_dirs(layout, name);
        if dirs.is_empty() || !dirs.iter().all(|d| d.path.is_dir()) {
            return Err(CgroupError::NoGroup {
                name: name.to_owned(),
            });
        }
        Ok(CpuGroup {
            name: name.to_owned(),
            v2,
            dirs,
        })
    }

    /// The names of every group, sorted.
    pub fn list(layout: &Layout) -> Vec<String> {
        let (_, dirs) = group_dirs(layout, "x");
        let Some(parent) = dirs.first().and_then(|d| d.path.parent()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = std::fs::read_dir(parent)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directories.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }

    pub(crate) fn dirs(&self) -> &[Dir] {
        &self.dirs
    }

    fn with(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.dirs
            .iter()
            .find(|d| d.has(controller))
            .map(|d| d.path.as_path())
            .ok_or(CgroupError::NoController { controller })
    }

    /// Sets what `settings` gives (`None` fields are left as they are).
    ///
    /// # Errors
    /// A cap of 0; the kernel refused a value (CPUs it does not have).
    pub fn apply(&self, settings: &GroupSettings) -> Result<(), CgroupError> {
        if let Some(cap) = settings.cap_percent {
            if cap == 0 {
                return Err(CgroupError::InvalidValue {
                    what: "cpu group cap",
                    value: "0 %".to_owned(),
                });
            }
            let quota = (limits::PERIOD_US * u64::from(cap) / 100).max(limits::MIN_QUOTA_US);
            let dir = self.with("cpu")?;
            if self.v2 {
                write(
                    &dir.join("cpu.max"),
                    &format!("{quota} {}", limits::PERIOD_US),
                )?;
            } else {
                write(
                    &dir.join("cpu.cfs_period_us"),
                    &limits::PERIOD_US.to_string(),
                )?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        if let Some(cpus) = &settings.cpus {
            let dir = self.with(V1_CPUSET)?;
            write(&dir.join("cpuset.cpus"), cpus).map_err(|e| match e {
                // EINVAL for a list it cannot parse, ERANGE for CPUs the host does not have.
                CgroupError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::InvalidInput
                        || source.raw_os_error()
                            == Some(rustix::io::Errno::RANGE.raw_os_error()) =>
                {
                    CgroupError::InvalidValue {
                        what: "cpu group cpus",
                        value: cpus.clone(),
                    }
                }
                other => other,
            })?;
        }
        Ok(())
    }

    /// Its cap and CPUs, as the cgroup files say.
    pub fn settings(&self) -> GroupSettings {
        let cap_percent = self.with("cpu").ok().and_then(|d| {
            let quota = if self.v2 {
                read(&d.join("cpu.max"))?
                    .split_ascii_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()?
            } else {
                read(&d.join("cpu.cfs_quota_us"))?
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .and_then(|q| u64::try_from(q).ok())?
            };
            u32::try_from(quota * 100 / limits::PERIOD_US).ok()
        });
        let cpus = self
            .with(V1_CPUSET)
            .ok()
            .and_then(|d| read(&d.join("cpuset.cpus")))
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        GroupSettings { cap_percent, cpus }
    }

    /// The VMs in it (the names of their cgroups).
    pub fn members(&self) -> Vec<String> {
        let Some(first) = self.dirs.first() else {
            return Vec::new();
        };
        let mut names: Vec<String> = std::fs::read_dir(&first.path)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// What its cap has held back, its VMs together.
    pub fn throttling(&self) -> Option<Throttling> {
        let d = self.with("cpu").ok()?;
        let stat = read(&d.join("cpu.stat"))?;
        Some(Throttling {
            periods: keyed(&stat, "nr_periods")?,
            throttled: keyed(&stat, "nr_throttled").unwrap_or(0),
            throttled_time: if self.v2 {
                std::time::Duration::from_micros(keyed(&stat, "throttled_usec").unwrap_or(0))
            } else {
                std::time::Duration::from_nanos(keyed(&stat, "throttled_time").unwrap_or(0))
            },
        })
    }

    /// Removes the group.
    ///
    /// # Errors
    /// [`CgroupError::InUse`] while a VM is in it; the kernel refused.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let members = self.members();
        if !members.is_empty() {
            return Err(CgroupError::InUse {
                name: self.name.clone(),
                members,
            });
        }
        for d in &self.dirs {
            match std::fs::remove_dir(&d.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", &d.path)(e)),
            }
        }
        Ok(())
    }
}

impl VmCgroup {
    /// Moves the VM into `group`: in each hierarchy the group has, a directory `<group>/<vm>`
    /// is made and every process of the VM written into it, and the VM's directory it replaces
    /// (if any) is removed once empty. Returns the cgroup as it is now; the caller re-opens its
    /// joiner for processes spawned from now on. Moving into the group it is in is a no-op.
    ///
    /// # Errors
    /// The kernel refused a directory or a move; the cgroup is then as far as it got (every
    /// process still in one of its directories).
    pub fn move_into(&self, group: &CpuGroup) -> Result<VmCgroup, CgroupError> {
        let mut moved = self.clone();
        let pids = self.pids();
        let mut replaced = Vec::new();
        for g in group.dirs() {
            let mount = mount_of(g);
            let new = Dir {
                path: g.path.join(&self.name),
                relative: g.relative.join(&self.name),
                controllers: g.controllers.clone(),
            };
            let old = moved.dirs.iter().position(|d| mount_of(d) == mount);
            if old.is_some_and(|i| moved.dirs[i].path == new.path) {
                continue;
            }
            match std::fs::create_dir(&new.path) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(io_error("make", &new.path)(e))
                }
                _ => {}
            }
            if !self.v2 && new.has(V1_CPUSET) {
                inherit_cpuset(&new.path)?;
            }
            let procs = new.path.join("cgroup.procs");
            for pid in &pids {
                match std::fs::write(&procs, pid.to_string()) {
                    Ok(()) => {}
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => {}
                    Err(e) => return Err(io_error("move a process into", &new.path)(e)),
                }
            }
            match old {
                Some(i) => replaced.push(std::mem::replace(&mut moved.dirs[i], new)),
                None => moved.dirs.push(new),
            }
        }
        // What the move left behind (a process spawned meanwhile joined the old directory).
        for old in replaced {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                let left = pids_in(&old.path);
                let target = moved
                    .dirs
                    .iter()
                    .find(|d| mount_of(d) == mount_of(&old))
                    .map(|d| d.path.join("cgroup.procs"));
                if let Some(procs) = &target {
                    for pid in &left {
                        let _ = std::fs::write(procs, pid.to_string());
                    }
                }
                match std::fs::remove_dir(&old.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(e) => return Err(io_error("remove", &old.path)(e)),
                }
            }
        }
        Ok(moved)
    }
}

/// The mount point of `d`'s hierarchy: its path without its relative path.
fn mount_of(d: &Dir) -> PathBuf {
    let mut mount = d.path.clone();
    for _ in d.relative.components().skip(1) {
        mount.pop();
    }
    mount
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::V1Hierarchy;

    fn fake_v1() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().expect("tempdir");
        let hierarchies = ["cpu,cpuacct", "cpuset", "memory", "pids", "freezer"]
            .iter()
            .map(|name| {
                let mount = dir.path().join(name);
                std::fs::create_dir(&mount).expect("hierarchy");
                V1Hierarchy {
                    mount,
                    controllers: name.split(',').map(str::to_owned).collect(),
                }
            })
            .collect();
        std::fs::write(dir.path().join("cpuset/cpuset.cpus"), "0-1\n").expect("cpus");
        std::fs::write(dir.path().join("cpuset/cpuset.mems"), "0\n").expect("mems");
        (dir, Layout::V1 { hierarchies })
    }

    #[test]
    fn a_v1_group_has_a_cap_and_inherits_or_takes_its_cpus() {
        let (root, layout) = fake_v1();
        let g = CpuGroup::create(
            &layout,
            "batch",
            &GroupSettings {
                cap_percent: Some(150),
                cpus: None,
            },
        )
        .expect("create");
        assert_eq!(
            g.paths().len(),
            2,
            "cpu,cpuacct and cpuset: {:?}",
            g.paths()
        );
        let cpu = root.path().join("cpu,cpuacct/uvmctl-groups/batch");
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("quota"),
            "150000"
        );
        let set = root.path().join("cpuset/uvmctl-groups/batch");
        assert_eq!(
            std::fs::read_to_string(set.join("cpuset.cpus")).expect("cpus"),
            "0-1"
        );
        assert_eq!(
            g.settings(),
            GroupSettings {
                cap_percent: Some(150),
                cpus: Some("0-1".into())
            }
        );
        g.apply(&GroupSettings {
            cap_percent: None,
            cpus: Some("1".into()),
        })
        .expect("update");
        assert_eq!(g.settings().cpus.as_deref(), Some("1"));
        assert!(matches!(
            g.apply(&GroupSettings {
                cap_percent: Some(0),
                cpus: None
            }),
            Err(CgroupError::InvalidValue { .. })
        ));
        assert_eq!(CpuGroup::list(&layout), ["batch"]);
        assert!(matches!(
            CpuGroup::create(&layout, "batch", &GroupSettings::default()),
            Err(CgroupError::Exists { .. })
        ));
    }

    #[test]
    fn an_unknown_group_is_not_found_and_a_group_in_use_is_not_removed() {
        let (root, layout) = fake_v1();
        assert!(matches!(
            CpuGroup::open(&layout, "nope"),
            Err(CgroupError::NoGroup { .. })
        ));
        let g = CpuGroup::create(&layout, "g", &GroupSettings::default()).expect("create");
        let vm = VmCgroup::create(&layout, "uvmctl", "vm-1").expect("vm");
        let moved = vm.move_into(&g).expect("move");
        // The VM's cpu side is in the group now, its memory side where it was.
        let paths = moved.paths();
        assert!(paths.contains(&root.path().join("cpu,cpuacct/uvmctl-groups/g/vm-1")));
        assert!(paths.contains(&root.path().join("cpuset/uvmctl-groups/g/vm-1")));
        assert!(paths.contains(&root.path().join("memory/uvmctl/vm-1")));
        assert!(!root.path().join("cpu,cpuacct/uvmctl/vm-1").exists());
        assert_eq!(
            std::fs::read_to_string(root.path().join("cpuset/uvmctl-groups/g/vm-1/cpuset.cpus"))
                .expect("cpus"),
            "0-1"
        );
        assert_eq!(g.members(), ["vm-1"]);
        assert!(matches!(g.remove(), Err(CgroupError::InUse { .. })));
        assert_eq!(CpuGroup::open(&layout, "g").expect("open"), g);
        // Again: nothing to do.
        assert_eq!(moved.move_into(&g).expect("again"), moved);
    }
}
