//! One VM's cgroup: a directory per hierarchy used (one on v2), its files, its members.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use crate::layout::{Layout, V2_CONTROLLERS};
use crate::{limits, CgroupError};

/// One directory of the VM's cgroup and the controllers its hierarchy carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dir {
    pub(crate) path: PathBuf,
    /// Its path inside its hierarchy (what `/proc/<pid>/cgroup` shows for a member).
    pub(crate) relative: PathBuf,
    pub(crate) controllers: Vec<String>,
}

impl Dir {
    pub(crate) fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// A VM's cgroup, made by [`VmCgroup::create`]. Dropping it removes nothing: release calls
/// [`VmCgroup::kill_all`] and [`VmCgroup::remove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    pub(crate) v2: bool,
    /// `/<parent>/<name>`: where it was made.
    relative: PathBuf,
    /// Its name (the last component of each directory).
    pub(crate) name: String,
    pub(crate) dirs: Vec<Dir>,
}

/// CPU time spent throttled by the VM's limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttling {
    /// Enforcement periods that have elapsed.
    pub periods: u64,
    /// Periods in which the VM used up its quota and waited.
    pub throttled: u64,
    /// How long it waited in all.
    pub throttled_time: Duration,
}

/// What the cgroup says the VM uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time of every member, together.
    pub cpu_usage: Option<Duration>,
    /// The quota's effect.
    pub throttling: Option<Throttling>,
    /// Memory charged to the cgroup now, bytes (the guest's RAM it touched, QEMU's own, page
    /// cache of its files).
    pub memory_current: Option<u64>,
    /// The most ever charged, bytes (v2 `memory.peak` needs Linux 5.19).
    pub memory_peak: Option<u64>,
}

/// The `cgroup.procs` files of a VM's cgroup, open for writing: cheap to clone into a
/// `pre_exec` closure.
#[derive(Debug, Clone)]
pub struct Joiner(Arc<[OwnedFd]>);

impl Joiner {
    /// Puts the calling process into the cgroup (`0` is "myself" on v1 and v2). Meant for a
    /// child between fork and exec: it only makes `write` system calls on descriptors opened
    /// beforehand, allocating nothing.
    ///
    /// # Errors
    /// The kernel refused a write.
    pub fn join(&self) -> io::Result<()> {
        for fd in self.0.iter() {
            rustix::io::write(fd, b"0")?;
        }
        Ok(())
    }
}

/// Whether a VM's own cgroup has a directory in v1 hierarchy `h` (not in a cpuset-only one).
fn vm_hierarchy(h: &crate::layout::V1Hierarchy) -> bool {
    h.controllers
        .iter()
        .any(|c| crate::layout::V1_CONTROLLERS.contains(&c.as_str()))
}

/// A single plain component.
pub(crate) fn check_name(what: &'static str, value: &str) -> Result<(), CgroupError> {
    let mut parts = Path::new(value).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(()),
        _ => Err(CgroupError::InvalidName {
            what,
            value: value.to_owned(),
        }),
    }
}

/// Plain components only (no root, no `..`), at least one.
fn check_parent(value: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new(value);
    let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain || path.as_os_str().is_empty() {
        return Err(CgroupError::InvalidName {
            what: "cgroup parent",
            value: value.to_owned(),
        });
    }
    Ok(path.to_owned())
}

pub(crate) fn io_error(
    operation: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io {
        operation,
        path,
        source,
    }
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_error("write", path))
}

pub(crate) fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// `key value` lines (`cpu.stat`).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The PIDs a `cgroup.procs` lists.
pub(crate) fn pids_in(dir: &Path) -> Vec<u32> {
    read(&dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Makes `dir`, which must not exist yet.
pub(crate) fn make_new(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(CgroupError::Exists {
            path: dir.to_owned(),
        }),
        Err(e) => Err(io_error("make", dir)(e)),
    }
}

impl VmCgroup {
    /// Makes the cgroup `<parent>/<name>` (parent: relative, e.g. `uvmctl`; made when missing)
    /// in every hierarchy a VM uses. On v2 the controllers of [`V2_CONTROLLERS`] the host has
    /// are enabled from the root down to `<parent>`. Nothing is left behind on failure.
    ///
    /// The parent is removed again when its last VM's cgroup goes ([`VmCgroup::remove`]); a
    /// parent that vanishes that way in the middle of this (another VM's release) is made again.
    ///
    /// # Errors
    /// A parent or name that is not plain; the cgroup exists already; the kernel refused
    /// (no permission, a read-only cgroupfs).
    pub fn create(layout: &Layout, parent: &str, name: &str) -> Result<VmCgroup, CgroupError> {
        let mut attempts = 0;
        loop {
            match VmCgroup::create_once(layout, parent, name) {
                Err(CgroupError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && attempts < 3 =>
                {
                    attempts += 1;
                }
                made => return made,
            }
        }
    }

    fn create_once(layout: &Layout, parent: &str, name: &str) -> Result<VmCgroup, CgroupError> {
        let parent = check_parent(parent)?;
        check_name("cgroup name", name)?;
        let relative = Path::new("/").join(&parent).join(name);
        match layout {
            Layout::V2 { root } => {
                let available: Vec<String> = read(&root.join("cgroup.controllers"))
                    .unwrap_or_default()
                    .split_ascii_whitespace()
                    .filter(|c| V2_CONTROLLERS.contains(c))
                    .map(str::to_owned)
                    .collect();
                let enable: Vec<String> = available.iter().map(|c| format!("+{c}")).collect();
                let mut dir = root.clone();
                for part in parent.components() {
                    if !enable.is_empty() {
                        write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
                    }
                    dir.push(part);
                    match std::fs::create_dir(&dir) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            return Err(io_error("make", &dir)(e))
                        }
                        _ => {}
                    }
                }
                if !enable.is_empty() {
                    write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
                }
                let path = dir.join(name);
                make_new(&path)?;
                Ok(VmCgroup {
                    v2: true,
                    relative: relative.clone(),
                    name: name.to_owned(),
                    dirs: vec![Dir {
                        path,
                        relative,
                        controllers: available,
                    }],
                })
            }
            Layout::V1 { hierarchies } => {
                let mut made = VmCgroup {
                    v2: false,
                    relative: relative.clone(),
                    name: name.to_owned(),
                    dirs: Vec::new(),
                };
                for h in hierarchies.iter().filter(|h| vm_hierarchy(h)) {
                    let dir = h.mount.join(&parent);
                    let result = std::fs::create_dir_all(&dir)
                        .map_err(io_error("make", &dir))
                        .and_then(|()| make_new(&dir.join(name)));
                    if let Err(e) = result {
                        made.remove_dirs();
                        return Err(e);
                    }
                    made.dirs.push(Dir {
                        path: dir.join(name),
                        relative: relative.clone(),
                        controllers: h.controllers.clone(),
                    });
                }
                Ok(made)
            }
        }
    }

    /// The cgroup `<parent>/<name>` as far as it exists (in any hierarchy), e.g. one a dead
    /// controller left behind; `None` when it exists nowhere.
    ///
    /// # Errors
    /// A parent or name that is not plain.
    pub fn existing(
        layout: &Layout,
        parent: &str,
        name: &str,
    ) -> Result<Option<VmCgroup>, CgroupError> {
        let parent = check_parent(parent)?;
        check_name("cgroup name", name)?;
        let relative = Path::new("/").join(&parent).join(name);
        // Each hierarchy: (its mount, its controllers). A VM moved into a CPU group has its
        // cpu side (on v2: all of it) under `uvmctl-groups/<group>/<name>` instead.
        let (v2, hierarchies): (bool, Vec<(PathBuf, Vec<String>)>) = match layout {
            Layout::V2 { root } => (
                true,
                vec![(
                    root.clone(),
                    V2_CONTROLLERS.iter().map(|c| (*c).to_owned()).collect(),
                )],
            ),
            Layout::V1 { hierarchies } => (
                false,
                hierarchies
                    .iter()
                    .map(|h| (h.mount.clone(), h.controllers.clone()))
                    .collect(),
            ),
        };
        let mut dirs = Vec::new();
        for (mount, controllers) in hierarchies {
            let mut places = vec![(mount.join(&parent).join(name), relative.clone())];
            let groups = mount.join(crate::cpu_group::GROUPS_PARENT);
            if let Ok(entries) = std::fs::read_dir(&groups) {
                for group in entries.flatten().filter(|e| e.path().is_dir()) {
                    places.push((
                        group.path().join(name),
                        Path::new("/")
                            .join(crate::cpu_group::GROUPS_PARENT)
                            .join(group.file_name())
                            .join(name),
                    ));
                }
            }
            dirs.extend(places.into_iter().filter(|(path, _)| path.is_dir()).map(
                |(path, relative)| Dir {
                    path,
                    relative,
                    controllers: controllers.clone(),
                },
            ));
        }
        if dirs.is_empty() {
            return Ok(None);
        }
        Ok(Some(VmCgroup {
            v2,
            relative,
            name: name.to_owned(),
            dirs,
        }))
    }

    /// `v2` or `v1`.
    pub fn version(&self) -> &'static str {
        if self.v2 {
            "v2"
        } else {
            "v1"
        }
    }

    /// The cgroup's path inside its hierarchies (`/uvmctl/<name>`).
    pub fn relative_path(&self) -> &Path {
        self.dirs.first().map_or(&self.relative, |d| &d.relative)
    }

    /// Its directories, one per hierarchy.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }

    /// Opens every `cgroup.procs` for [`Joiner::join`].
    ///
    /// # Errors
    /// One could not be opened.
    pub fn joiner(&self) -> Result<Joiner, CgroupError> {
        let fds = self
            .dirs
            .iter()
            .map(|d| {
                let procs = d.path.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map(OwnedFd::from)
                    .map_err(io_error("open", &procs))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Joiner(fds.into()))
    }

    pub(crate) fn with(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.dirs
            .iter()
            .find(|d| d.has(controller))
            .map(|d| d.path.as_path())
            .ok_or(CgroupError::NoController { controller })
    }

    /// Caps the VM at `limit` (1/10000 of its `cpus` CPUs; 10000: no cap) and/or sets its
    /// `weight` (cgroup v2 units, 1–10000). `None` leaves a setting as it is.
    ///
    /// # Errors
    /// No cpu controller; the kernel refused a value.
    pub fn set_cpu_limits(
        &self,
        limit: Option<u32>,
        weight: Option<u32>,
        cpus: u32,
    ) -> Result<(), CgroupError> {
        let dir = self.with("cpu")?;
        if self.v2 {
            if let Some(limit) = limit {
                write(&dir.join("cpu.max"), &limits::cpu_max(limit, cpus))?;
            }
            if let Some(weight) = weight {
                write(&dir.join("cpu.weight"), &weight.to_string())?;
            }
        } else {
            if let Some(limit) = limit {
                write(
                    &dir.join("cpu.cfs_period_us"),
                    &limits::PERIOD_US.to_string(),
                )?;
                // v1 refuses (EINVAL) a quota above its parent's: a CPU group's cap.
                write(
                    &dir.join("cpu.cfs_quota_us"),
                    &limits::cfs_quota_us(limit, cpus),
                )
                .map_err(|e| match e {
                    CgroupError::Io { source, .. }
                        if source.kind() == io::ErrorKind::InvalidInput =>
                    {
                        CgroupError::InvalidValue {
                            what: "cpu limit",
                            value: format!("{limit}/10000 (above its CPU group's cap)"),
                        }
                    }
                    other => other,
                })?;
            }
            if let Some(weight) = weight {
                write(&dir.join("cpu.shares"), &limits::shares(weight).to_string())?;
            }
        }
        Ok(())
    }

    /// What the cgroup's files say (a figure a file lacks is `None`).
    pub fn stats(&self) -> CgroupStats {
        let dir = |c| self.with(c).ok();
        if self.v2 {
            let Some(d) = self.dirs.first().map(|d| d.path.as_path()) else {
                return CgroupStats::default();
            };
            let cpu = read(&d.join("cpu.stat")).unwrap_or_default();
            let throttling = keyed(&cpu, "nr_periods").map(|periods| Throttling {
                periods,
                throttled: keyed(&cpu, "nr_throttled").unwrap_or(0),
                throttled_time: Duration::from_micros(keyed(&cpu, "throttled_usec").unwrap_or(0)),
            });
            return CgroupStats {
                cpu_usage: keyed(&cpu, "usage_usec").map(Duration::from_micros),
                throttling,
                memory_current: read_u64(&d.join("memory.current")),
                memory_peak: read_u64(&d.join("memory.peak")),
            };
        }
        let throttling = dir("cpu").and_then(|d| {
            let cpu = read(&d.join("cpu.stat"))?;
            Some(Throttling {
                periods: keyed(&cpu, "nr_periods")?,
                throttled: keyed(&cpu, "nr_throttled").unwrap_or(0),
                throttled_time: Duration::from_nanos(keyed(&cpu, "throttled_time").unwrap_or(0)),
            })
        });
        let memory = dir("memory");
        CgroupStats {
            cpu_usage: dir("cpuacct")
                .and_then(|d| read_u64(&d.join("cpuacct.usage")))
                .map(Duration::from_nanos),
            throttling,
            memory_current: memory.and_then(|d| read_u64(&d.join("memory.usage_in_bytes"))),
            memory_peak: memory.and_then(|d| read_u64(&d.join("memory.max_usage_in_bytes"))),
        }
    }

    /// Every process in the cgroup (in any of its hierarchies).
    pub fn pids(&self) -> Vec<u32> {
        let all: BTreeSet<u32> = self.dirs.iter().flat_map(|d| pids_in(&d.path)).collect();
        all.into_iter().collect()
    }

    /// Kills every process in the cgroup: v2's `cgroup.kill` where the kernel has it (5.14+);
    /// otherwise the cgroup is frozen (v2 `cgroup.freeze`, v1's freezer; the freeze is
    /// asynchronous and is waited for, up to a second) so that nothing in it forks meanwhile,
    /// each member is sent SIGKILL through a pidfd once it is checked to be still a member
    /// (never a recycled PID), and it is thawed so that they die. Callers that must see it empty
    /// repeat the call until it is (a process that forked before the freeze took hold).
    ///
    /// A cgroup that is gone already (removed by an earlier release) has nothing to kill.
    ///
    /// # Errors
    /// The kernel refused to freeze or kill.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.dirs.iter().all(|d| !d.path.exists()) {
            return Ok(());
        }
        if self.v2 {
            let Some(dir) = self.dirs.first() else {
                return Ok(());
            };
            let kill = dir.path.join("cgroup.kill");
            if kill.exists() {
                return write(&kill, "1");
            }
            let freeze = dir.path.join("cgroup.freeze");
            write(&freeze, "1")?;
            // Freezing is asynchronous: wait until the kernel says it is done.
            wait_until(|| {
                read(&dir.path.join("cgroup.events")).is_none_or(|e| keyed(&e, "frozen") == Some(1))
            });
            let killed = self.kill_members();
            write(&freeze, "0")?;
            return killed;
        }
        let freezer = self
            .with("freezer")
            .ok()
            .map(|d| d.join("freezer.state"))
            .filter(|state| state.exists());
        if let Some(state) = &freezer {
            write(state, "FROZEN")?;
            // FREEZING until every task is frozen.
            wait_until(|| read(state).is_none_or(|s| s.trim() != "FREEZING"));
        }
        let killed = self.kill_members();
        if let Some(state) = &freezer {
            write(state, "THAWED")?;
        }
        killed
    }

    fn kill_members(&self) -> Result<(), CgroupError> {
        for pid in self.pids() {
            let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
                continue;
            };
            // The pidfd pins the process: once it is checked to be ours, the signal cannot
            // reach another that got its PID.
            let pidfd = match pidfd_open(raw, PidfdFlags::empty()) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::SRCH) => continue, // gone already
                Err(e) => {
                    return Err(CgroupError::Io {
                        operation: "open a pidfd for a member of",
                        path: self.relative.clone(),
                        source: e.into(),
                    })
                }
            };
            if !self.is_member(pid) {
                continue;
            }
            match pidfd_send_signal(&pidfd, Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => {
                    return Err(CgroupError::Io {
                        operation: "kill a member of",
                        path: self.relative.clone(),
                        source: e.into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether `/proc/<pid>/cgroup` puts `pid` in this cgroup (or below it).
    pub(crate) fn is_member(&self, pid: u32) -> bool {
        let Some(text) = read(Path::new(&format!("/proc/{pid}/cgroup"))) else {
            return false;
        };
        text.lines().any(|line| {
            line.splitn(3, ':').nth(2).is_some_and(|p| {
                self.dirs
                    .iter()
                    .any(|d| Path::new(p).starts_with(&d.relative))
            })
        })
    }

    /// Waits (up to `wait`) for the cgroup to empty, then removes its directories. Retryable:
    /// what is gone already is skipped.
    ///
    /// # Errors
    /// [`CgroupError::Busy`] with the processes still inside at the deadline; the kernel
    /// refused a removal.
    pub fn remove(&self, wait: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + wait;
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(&dir.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // Members that are still exiting (or being reaped) keep it busy a moment.
                    Err(e) if e.raw_os_error() == Some(libc_ebusy()) => {
                        if Instant::now() >= deadline {
                            return Err(CgroupError::Busy {
                                path: dir.path.clone(),
                                pids: pids_in(&dir.path),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(io_error("remove", &dir.path)(e)),
                }
            }
            // The parent it was made in goes with its last VM (it fails, harmlessly, while
            // another VM's cgroup is in it). Not a CPU group's: that is its owner's to remove.
            if dir.relative == self.relative {
                if let Some(parent) = dir.path.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
        Ok(())
    }

    /// Best effort, on a failed create: removes the directories made so far.
    fn remove_dirs(&self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(&dir.path);
        }
    }
}

/// Waits (polling every millisecond, at most a second) until `done`; a freeze that takes longer
/// is killed through anyway, and the kill passes after it catch what it missed.
fn wait_until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn libc_ebusy() -> i32 {
    rustix::io::Errno::BUSY.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::V1Hierarchy;

    /// A fake cgroup2 root: what the kernel would show at the root.
    fn fake_v2() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("controllers");
        let layout = Layout::V2 {
            root: dir.path().to_owned(),
        };
        (dir, layout)
    }

    fn fake_v1() -> (tempfile::TempDir, Layout) {
        crate::testing::fake_v1(&["cpu,cpuacct", "memory", "pids", "freezer"])
    }

    #[test]
    fn v2_creation_enables_the_controllers_down_to_the_parent_and_makes_one_directory() {
        let (root, layout) = fake_v2();
        let cg = VmCgroup::create(&layout, "uvmctl/vms", "vm-1").expect("create");
        let r = root.path();
        for level in [r.to_owned(), r.join("uvmctl"), r.join("uvmctl/vms")] {
            assert_eq!(
                std::fs::read_to_string(level.join("cgroup.subtree_control")).expect("enabled"),
                "+cpu +memory +pids",
                "{}",
                level.display()
            );
        }
        assert_eq!(cg.paths(), [r.join("uvmctl/vms/vm-1")]);
        assert_eq!(cg.relative_path(), Path::new("/uvmctl/vms/vm-1"));
        assert_eq!(cg.version(), "v2");
        // The same VM again is refused: its id is taken.
        assert!(matches!(
            VmCgroup::create(&layout, "uvmctl/vms", "vm-1"),
            Err(CgroupError::Exists { .. })
        ));
    }

    #[test]
    fn v1_creation_makes_the_cgroup_in_every_hierarchy_and_undoes_a_partial_one() {
        let (root, layout) = fake_v1();
        let cg = VmCgroup::create(&layout, "uvmctl", "vm-1").expect("create");
        assert_eq!(cg.paths().len(), 4);
        assert!(cg.paths().iter().all(|p| p.is_dir()));
        assert_eq!(cg.version(), "v1");
        // A VM whose directory exists in one hierarchy only: refused, nothing of it left.
        std::fs::create_dir(root.path().join("pids/uvmctl/vm-2")).expect("stale");
        assert!(matches!(
            VmCgroup::create(&layout, "uvmctl", "vm-2"),
            Err(CgroupError::Exists { .. })
        ));
        assert!(!root.path().join("cpu,cpuacct/uvmctl/vm-2").exists());
        assert!(!root.path().join("memory/uvmctl/vm-2").exists());
    }

    #[test]
    fn names_that_climb_or_nest_are_refused() {
        let (_root, layout) = fake_v2();
        for (parent, name) in [
            ("uvmctl", "../x"),
            ("uvmctl", "a/b"),
            ("uvmctl", ""),
            ("../up", "vm"),
            ("/abs", "vm"),
            ("", "vm"),
        ] {
            assert!(
                matches!(
                    VmCgroup::create(&layout, parent, name),
                    Err(CgroupError::InvalidName { .. })
                ),
                "{parent:?} {name:?}"
            );
        }
    }

    #[test]
    fn cpu_limits_are_written_as_each_version_spells_them() {
        let (_r2, v2) = fake_v2();
        let cg = VmCgroup::create(&v2, "uvmctl", "vm").expect("create");
        cg.set_cpu_limits(Some(5_000), Some(200), 2)
            .expect("limits");
        let dir = &cg.paths()[0];
        let file = |n: &str| std::fs::read_to_string(dir.join(n)).expect(n);
        assert_eq!(file("cpu.max"), "100000 100000");
        assert_eq!(file("cpu.weight"), "200");
        cg.set_cpu_limits(Some(10_000), None, 2).expect("no cap");
        assert_eq!(file("cpu.max"), "max 100000");

        let (r1, v1) = fake_v1();
        let cg = VmCgroup::create(&v1, "uvmctl", "vm").expect("create");
        cg.set_cpu_limits(Some(2_500), Some(50), 1).expect("limits");
        let cpu = r1.path().join("cpu,cpuacct/uvmctl/vm");
        let file = |n: &str| std::fs::read_to_string(cpu.join(n)).expect(n);
        assert_eq!(file("cpu.cfs_period_us"), "100000");
        assert_eq!(file("cpu.cfs_quota_us"), "25000");
        assert_eq!(file("cpu.shares"), "512");
    }

    #[test]
    fn a_hierarchy_without_cpu_cannot_take_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::V1 {
            hierarchies: vec![V1Hierarchy {
                mount: dir.path().to_owned(),
                controllers: vec!["memory".into()],
            }],
        };
        let cg = VmCgroup::create(&layout, "uvmctl", "vm").expect("create");
        assert!(matches!(
            cg.set_cpu_limits(Some(1), None, 1),
            Err(CgroupError::NoController { controller: "cpu" })
        ));
    }

    #[test]
    fn stats_are_read_from_either_version_and_missing_files_are_none() {
        let (_r2, v2) = fake_v2();
        let cg = VmCgroup::create(&v2, "uvmctl", "vm").expect("create");
        assert_eq!(cg.stats(), CgroupStats::default());
        let dir = &cg.paths()[0];
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 40\nnr_throttled 7\nthrottled_usec 250000\n",
        )
        .expect("cpu.stat");
        std::fs::write(dir.join("memory.current"), "1048576\n").expect("current");
        let s = cg.stats();
        assert_eq!(s.cpu_usage, Some(Duration::from_millis(1500)));
        assert_eq!(
            s.throttling,
            Some(Throttling {
                periods: 40,
                throttled: 7,
                throttled_time: Duration::from_millis(250)
            })
        );
        assert_eq!((s.memory_current, s.memory_peak), (Some(1 << 20), None));

        let (r1, v1) = fake_v1();
        let cg = VmCgroup::create(&v1, "uvmctl", "vm").expect("create");
        let at = |h: &str| r1.path().join(h).join("uvmctl/vm");
        std::fs::write(at("cpu,cpuacct").join("cpuacct.usage"), "2000000000\n").expect("usage");
        std::fs::write(
            at("cpu,cpuacct").join("cpu.stat"),
            "nr_periods 10\nnr_throttled 3\nthrottled_time 5000000\n",
        )
        .expect("cpu.stat");
        std::fs::write(at("memory").join("memory.usage_in_bytes"), "4096\n").expect("usage");
        std::fs::write(at("memory").join("memory.max_usage_in_bytes"), "8192\n").expect("max");
        let s = cg.stats();
        assert_eq!(s.cpu_usage, Some(Duration::from_secs(2)));
        assert_eq!(s.throttling.map(|t| t.throttled), Some(3));
        assert_eq!(
            s.throttling.map(|t| t.throttled_time),
            Some(Duration::from_millis(5))
        );
        assert_eq!((s.memory_current, s.memory_peak), (Some(4096), Some(8192)));
    }

    #[test]
    fn members_are_the_union_of_every_hierarchy_and_v2_kills_through_cgroup_kill() {
        let (_r1, v1) = fake_v1();
        let cg = VmCgroup::create(&v1, "uvmctl", "vm").expect("create");
        let paths = cg.paths();
        std::fs::write(paths[0].join("cgroup.procs"), "12\n30\n").expect("procs");
        std::fs::write(paths[2].join("cgroup.procs"), "30\n7\n").expect("procs");
        assert_eq!(cg.pids(), [7, 12, 30]);

        let (_r2, v2) = fake_v2();
        let cg = VmCgroup::create(&v2, "uvmctl", "vm").expect("create");
        let kill = cg.paths()[0].join("cgroup.kill");
        std::fs::write(&kill, "0").expect("cgroup.kill");
        cg.kill_all().expect("kill");
        assert_eq!(std::fs::read_to_string(&kill).expect("kill"), "1");
    }

    #[test]
    fn without_cgroup_kill_v2_freezes_around_the_kill_and_thaws() {
        let (_r2, v2) = fake_v2();
        let cg = VmCgroup::create(&v2, "uvmctl", "vm").expect("create");
        // A member list naming a process that is not in the cgroup (this test's own PID): the
        // membership check spares it.
        let dir = &cg.paths()[0];
        std::fs::write(
            dir.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("procs");
        cg.kill_all().expect("kill");
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).expect("freeze"),
            "0"
        );
    }

    #[test]
    fn a_joiner_writes_itself_into_every_procs_file() {
        let (_r1, v1) = fake_v1();
        let cg = VmCgroup::create(&v1, "uvmctl", "vm").expect("create");
        for p in cg.paths() {
            std::fs::write(p.join("cgroup.procs"), "").expect("procs");
        }
        let joiner = cg.joiner().expect("joiner");
        joiner.join().expect("join");
        for p in cg.paths() {
            assert_eq!(
                std::fs::read_to_string(p.join("cgroup.procs")).expect("procs"),
                "0"
            );
        }
    }

    #[test]
    fn an_existing_cgroup_is_found_as_far_as_it_exists() {
        let (root, v1) = fake_v1();
        assert_eq!(VmCgroup::existing(&v1, "uvmctl", "vm").expect("look"), None);
        let made = VmCgroup::create(&v1, "uvmctl", "vm").expect("create");
        assert_eq!(
            VmCgroup::existing(&v1, "uvmctl", "vm").expect("look"),
            Some(made)
        );
        std::fs::remove_dir(root.path().join("memory/uvmctl/vm")).expect("rmdir");
        let partial = VmCgroup::existing(&v1, "uvmctl", "vm")
            .expect("look")
            .expect("three left");
        assert_eq!(partial.paths().len(), 3);
        assert!(VmCgroup::existing(&v1, "uvmctl", "../vm").is_err());
    }

    #[test]
    fn removing_and_killing_what_is_gone_is_fine() {
        let (_r2, v2) = fake_v2();
        let cg = VmCgroup::create(&v2, "uvmctl", "vm").expect("create");
        cg.remove(Duration::ZERO)
            .expect("an empty fake directory is removed");
        cg.remove(Duration::ZERO).expect("again: already gone");
        cg.kill_all().expect("nothing to kill");
        let (_r1, v1) = fake_v1();
        let cg = VmCgroup::create(&v1, "uvmctl", "vm").expect("create");
        cg.remove(Duration::ZERO).expect("removed");
        cg.kill_all().expect("nothing to kill, no freezer to write");
    }
}
