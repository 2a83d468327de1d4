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
        // `uvmctl-groups` goes with its last group; made again if that happens meanwhile.
        let mut attempts = 0;
        loop {
            match CpuGroup::create_once(layout, name, settings) {
                Err(CgroupError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && attempts < 3 =>
                {
                    attempts += 1;
                }
                made => return made,
            }
        }
    }

    fn create_once(
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
        subdirectories(parent)
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
            let set = |d: &Path| {
                write(&d.join("cpuset.cpus"), cpus).map_err(|e| match e {
                    // EINVAL for a list it cannot parse, ERANGE for CPUs the host lacks.
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
                })
            };
            // v1: each member has its own copy, which must stay a subset of the group's —
            // widen the group first, narrow the members first (the group refuses, busy).
            let members: Vec<PathBuf> = if self.v2 {
                Vec::new()
            } else {
                self.members().iter().map(|m| dir.join(m)).collect()
            };
            match set(dir) {
                Ok(()) => members.iter().try_for_each(|m| set(m))?,
                Err(CgroupError::Io { source, .. })
                    if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) =>
                {
                    members.iter().try_for_each(|m| set(m))?;
                    set(dir)?;
                }
                Err(e) => return Err(e),
            }
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
        subdirectories(&first.path)
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
            // `uvmctl-groups` with it when it was the last (harmless while others remain).
            if let Some(parent) = d.path.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}

/// A VM's cgroup half moved into a group ([`VmCgroup::move_into`]): every process is in the
/// new directories, the ones they replaced still exist (a child spawned meanwhile may have
/// joined one). Point the spawning of children at [`GroupMove::cgroup`], then
/// [`GroupMove::finish`].
#[derive(Debug)]
pub struct GroupMove {
    cgroup: VmCgroup,
    replaced: Vec<Dir>,
}

impl GroupMove {
    /// The VM's cgroup as it is after the move.
    pub fn cgroup(&self) -> &VmCgroup {
        &self.cgroup
    }

    /// Moves what joined a replaced directory meanwhile and removes those directories.
    ///
    /// # Errors
    /// A replaced directory would not empty within 2 s.
    pub fn finish(self) -> Result<VmCgroup, CgroupError> {
        for old in &self.replaced {
            let target = self
                .cgroup
                .dirs
                .iter()
                .find(|d| mount_of(d) == mount_of(old))
                .map(|d| d.path.clone());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                if let Some(target) = &target {
                    move_members(&old.path, target)?;
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
        Ok(self.cgroup)
    }
}

/// Writes every process listed in `from`'s `cgroup.procs` into `to`'s (one that exited
/// meanwhile is skipped). The list is read right before the writes, from the VM's own cgroup,
/// so a PID in it is a member's.
fn move_members(from: &Path, to: &Path) -> Result<(), CgroupError> {
    let procs = to.join("cgroup.procs");
    for pid in pids_in(from) {
        match std::fs::write(&procs, pid.to_string()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => {}
            Err(e) => return Err(io_error("move a process into", to)(e)),
        }
    }
    Ok(())
}

impl VmCgroup {
    /// Moves the VM into `group`: in each hierarchy the group has, a directory `<group>/<vm>`
    /// is made (v1 cpuset: given the group's CPUs and nodes) and every process of the VM
    /// written into it. The directories it replaces stay until [`GroupMove::finish`]; the
    /// caller points the spawning of children at the new cgroup in between. Moving into the
    /// group it is in changes nothing. On v2 the whole VM moves (one hierarchy); its memory
    /// charged so far stays counted where it was (v2 does not move charges).
    ///
    /// # Errors
    /// The kernel refused a directory or a move: then every process is moved back and the
    /// directories made are removed, so the VM is where it was.
    pub fn move_into(&self, group: &CpuGroup) -> Result<GroupMove, CgroupError> {
        let mut moved = self.clone();
        let mut replaced = Vec::new();
        let mut made: Vec<(Dir, Option<PathBuf>)> = Vec::new();
        let result = (|| {
            for g in group.dirs() {
                let mount = mount_of(g);
                let old = moved.dirs.iter().position(|d| mount_of(d) == mount);
                let mut controllers = g.controllers.clone();
                if let Some(i) = old {
                    for c in &moved.dirs[i].controllers {
                        if !controllers.contains(c) {
                            controllers.push(c.clone());
                        }
                    }
                }
                let new = Dir {
                    path: g.path.join(&self.name),
                    relative: g.relative.join(&self.name),
                    controllers,
                };
                if old.is_some_and(|i| moved.dirs[i].path == new.path) {
                    continue;
                }
                make_new(&new.path).or_else(|e| match e {
                    CgroupError::Exists { .. } => Ok(()),
                    other => Err(other),
                })?;
                let from = old.map(|i| moved.dirs[i].path.clone());
                made.push((new.clone(), from.clone()));
                if !self.v2 && new.has(V1_CPUSET) {
                    inherit_cpuset(&new.path)?;
                }
                match &from {
                    Some(from) => move_members(from, &new.path)?,
                    // A hierarchy the VM had no directory in (v1 cpuset): all of it comes.
                    None => {
                        let procs = new.path.join("cgroup.procs");
                        for pid in self.pids() {
                            if self.is_member(pid) {
                                let _ = std::fs::write(&procs, pid.to_string());
                            }
                        }
                    }
                }
                match old {
                    Some(i) => replaced.push(std::mem::replace(&mut moved.dirs[i], new)),
                    None => moved.dirs.push(new),
                }
            }
            Ok::<(), CgroupError>(())
        })();
        if let Err(e) = result {
            // Back where it was: out of every directory made, which then goes.
            for (dir, from) in made.iter().rev() {
                let back = from.clone().unwrap_or_else(|| mount_of(dir));
                let _ = move_members(&dir.path, &back);
                let _ = std::fs::remove_dir(&dir.path);
            }
            return Err(e);
        }
        Ok(GroupMove {
            cgroup: moved,
            replaced,
        })
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

/// The names of the directories in `dir`, sorted; none when it cannot be read.
fn subdirectories(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_v1() -> (tempfile::TempDir, Layout) {
        let (dir, layout) =
            crate::testing::fake_v1(&["cpu,cpuacct", "cpuset", "memory", "pids", "freezer"]);
        std::fs::write(dir.path().join("cpuset/cpuset.cpus"), "0-1\n").expect("cpus");
        std::fs::write(dir.path().join("cpuset/cpuset.mems"), "0\n").expect("mems");
        (dir, layout)
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
    fn on_v2_the_whole_vm_moves_with_its_controllers_and_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu memory pids\n",
        )
        .expect("controllers");
        let layout = Layout::V2 {
            root: dir.path().to_owned(),
        };
        let g = CpuGroup::create(
            &layout,
            "g",
            &GroupSettings {
                cap_percent: Some(100),
                cpus: None,
            },
        )
        .expect("group");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("uvmctl-groups/g/cpu.max")).expect("cap"),
            "100000 100000"
        );
        // The VMs below the group get their controllers.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("uvmctl-groups/g/cgroup.subtree_control"))
                .expect("enabled"),
            "+cpu +memory +pids +cpuset"
        );
        let vm = VmCgroup::create(&layout, "uvmctl", "vm").expect("vm");
        std::fs::write(vm.paths()[0].join("cgroup.procs"), "4242\n").expect("procs");
        let moving = vm.move_into(&g).expect("move");
        let moved = moving.cgroup();
        assert_eq!(moved.paths(), [dir.path().join("uvmctl-groups/g/vm")]);
        assert_eq!(moved.relative_path(), Path::new("/uvmctl-groups/g/vm"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("uvmctl-groups/g/vm/cgroup.procs"))
                .expect("moved"),
            "4242"
        );
        // Memory and pids still count there (only cpu and cpuset come from the group).
        for c in ["cpu", "cpuset", "memory", "pids"] {
            assert!(moved.dirs[0].has(c), "{c}: {:?}", moved.dirs[0].controllers);
        }
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
        let moved = vm.move_into(&g).expect("move").finish().expect("finish");
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
        assert_eq!(
            moved
                .move_into(&g)
                .expect("again")
                .finish()
                .expect("finish"),
            moved
        );
    }
}
