//! Runtime directories whose controller died without releasing its VMs (SIGKILL, the OOM
//! killer): the children died with it (`PR_SET_PDEATHSIG`), but the directory — sockets,
//! console and process logs — stays. Each runtime directory records its owner (pid and start
//! time, which a reused pid does not repeat); [`sweep_stale_runtime_dirs`] removes those whose
//! owner is gone and that no process still mentions, and the VM's cgroup with it (killing
//! whatever is still inside).

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use uvm_host::processes_mentioning;

/// The file in each runtime directory naming the process that owns it: `<pid> <start time>`.
pub const OWNER_FILE: &str = "owner";

/// Runtime directory names start with this (`uvm-<id>-<random>`).
pub(crate) const DIR_PREFIX: &str = "uvm-";

/// A process's identity: pid and start time (clock ticks after boot, `/proc/<pid>/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid: i32,
    start: u64,
}

impl Owner {
    /// The running process `pid` (a zombie has ended: it only waits for its parent).
    fn of(pid: i32) -> Option<Owner> {
        let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
        if matches!(stat.state, 'Z' | 'X') {
            return None;
        }
        Some(Owner {
            pid,
            start: stat.starttime,
        })
    }

    fn parse(text: &str) -> Option<Owner> {
        let (pid, start) = text.trim().split_once(' ')?;
        Some(Owner {
            pid: pid.parse().ok().filter(|p| *p > 0)?,
            start: start.parse().ok()?,
        })
    }

    /// The same process is still running (not merely a process with the same pid).
    fn alive(self) -> bool {
        Owner::of(self.pid) == Some(self)
    }
}

/// Records this process as the owner of `dir`.
pub(crate) fn write_owner(dir: &Path) -> io::Result<()> {
    let me = i32::try_from(std::process::id()).map_err(io::Error::other)?;
    let owner = Owner::of(me).ok_or_else(|| io::Error::other("cannot read /proc/self/stat"))?;
    std::fs::write(
        dir.join(OWNER_FILE),
        format!("{} {}\n", owner.pid, owner.start),
    )
}

/// Removes the runtime directories under `root` left by controllers that are gone; returns
/// what it removed. A directory is removed only if all of these hold: its name starts with
/// `uvm-`, it is a real directory (not a symlink) owned by this user, its owner file names a
/// process that no longer runs, and no process's command line mentions it (a child that
/// survived its controller keeps its directory). Anything else is left alone, including
/// directories of older versions that carry no owner file.
///
/// With `cgroup_parent`, the VM's cgroup `<cgroup_parent>/<directory name>` goes too.
pub fn sweep_stale_runtime_dirs(
    root: &Path,
    cgroup_parent: Option<&str>,
) -> io::Result<Vec<PathBuf>> {
    let uid = rustix::process::geteuid().as_raw();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        let Some(owner) = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|t| Owner::parse(&t))
        else {
            continue;
        };
        if owner.alive() || !processes_mentioning(&dir).is_empty() {
            continue;
        }
        if let Some(parent) = cgroup_parent {
            remove_stale_cgroup(parent, &name.to_string_lossy());
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), owner = owner.pid, "removed a runtime directory its controller left behind");
                removed.push(dir);
            }
            // Another sweeper got there first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a stale runtime directory");
            }
        }
    }
    Ok(removed)
}

/// Kills what is left in the stale VM's cgroup and removes it; a failure is only logged.
fn remove_stale_cgroup(parent: &str, name: &str) {
    let found = uvm_cgroup::Layout::detect()
        .and_then(|layout| uvm_cgroup::VmCgroup::existing(&layout, parent, name));
    let cg = match found {
        Ok(Some(cg)) => cg,
        Ok(None) | Err(uvm_cgroup::CgroupError::NotMounted) => return,
        Err(e) => {
            tracing::warn!(error = %uvm_util::error_chain(&e), "cannot look for a stale VM's cgroup");
            return;
        }
    };
    match crate::cgroup::release(&cg) {
        Ok(()) => {
            tracing::info!(cgroup = %cg.relative_path().display(), "removed a cgroup its controller left behind")
        }
        Err(e) => {
            tracing::warn!(cgroup = %cg.relative_path().display(), error = %uvm_util::error_chain(&e), "cannot remove a stale VM's cgroup")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner record of a process that has exited (and been reaped).
    fn dead_owner() -> String {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let start = Owner::of(pid).map_or(1, |o| o.start);
        child.wait().unwrap();
        format!("{pid} {start}\n")
    }

    fn runtime_dir(root: &Path, name: &str, owner: Option<&str>) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("console.log"), b"log").unwrap();
        if let Some(owner) = owner {
            std::fs::write(dir.join(OWNER_FILE), owner).unwrap();
        }
        dir
    }

    #[test]
    fn only_directories_of_dead_owners_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let dead = dead_owner();
        let stale = runtime_dir(root.path(), "uvm-a-111111", Some(&dead));
        let live = root.path().join("uvm-b-222222");
        std::fs::create_dir(&live).unwrap();
        write_owner(&live).unwrap();
        // Our pid, but another start time: a reused pid, so the owner is gone.
        let me = Owner::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        let reused = runtime_dir(
            root.path(),
            "uvm-c-333333",
            Some(&format!("{} {}", me.pid, me.start + 1)),
        );
        let no_owner = runtime_dir(root.path(), "uvm-d-444444", None);
        let garbled = runtime_dir(root.path(), "uvm-e-555555", Some("not an owner"));
        let not_ours = runtime_dir(root.path(), "other-666666", Some(&dead));

        let mut removed = sweep_stale_runtime_dirs(root.path(), None).unwrap();
        removed.sort();
        assert_eq!(removed, [stale.clone(), reused.clone()]);
        assert!(!stale.exists() && !reused.exists());
        for kept in [&live, &no_owner, &garbled, &not_ours] {
            assert!(kept.is_dir(), "{} was removed", kept.display());
        }
        // A second sweep finds nothing more.
        assert!(sweep_stale_runtime_dirs(root.path(), None)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_directory_a_process_still_mentions_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = runtime_dir(root.path(), "uvm-f-777777", Some(&dead_owner()));
        // A process that blocks with a path inside the directory on its command line.
        let log = dir.join("console.log");
        let mut child = std::process::Command::new("tail")
            .arg("-f")
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // `spawn` returns once the child has begun its exec, which is before the kernel
        // sets up its new command line: wait until /proc shows it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !processes_mentioning(&dir).contains(&child.id()) {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("tail never showed its command line in /proc");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let kept = sweep_stale_runtime_dirs(root.path(), None);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(kept.unwrap().is_empty());
        assert!(dir.is_dir());
        assert_eq!(sweep_stale_runtime_dirs(root.path(), None).unwrap(), [dir]);
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::write(target.path().join(OWNER_FILE), dead_owner()).unwrap();
        std::os::unix::fs::symlink(target.path(), root.path().join("uvm-g-888888")).unwrap();
        assert!(sweep_stale_runtime_dirs(root.path(), None)
            .unwrap()
            .is_empty());
        assert!(target.path().join(OWNER_FILE).is_file());
    }
}
