//! The host's real cgroups (v1 on these machines, v2 elsewhere): a cgroup made, a process tree
//! started inside it before exec, limits written, its accounting read, everything in it killed
//! and the cgroup removed. Needs root (CI runs as root).

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use uvm_cgroup::{Layout, VmCgroup};

fn layout() -> Layout {
    let layout = Layout::detect().expect("this host mounts cgroups");
    assert!(
        rustix::process::geteuid().is_root(),
        "real-host cgroup tests need root (CI runs as root)"
    );
    layout
}

/// Removes the test's cgroup however the test ends.
struct Cleanup(VmCgroup);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.0.kill_all();
        let _ = self.0.remove(Duration::from_secs(5));
        // Its parent too (each test has its own).
        for dir in self.0.paths() {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

#[test]
fn real_host_a_process_tree_started_inside_is_accounted_limited_and_killed_at_release() {
    let layout = layout();
    // A parent of its own: the tests run in parallel and each removes its parent at the end.
    let parent = format!("uvmctl-test-tree-{}", std::process::id());
    let cg = VmCgroup::create(&layout, &parent, "vm").expect("create");
    let guard = Cleanup(cg.clone());
    let joiner = cg.joiner().expect("joiner");
    let mut cmd = Command::new("sh");
    // A child that forks a grandchild and waits: both must be inside, both must die.
    cmd.args(["-c", "sleep 300 & wait"]).stdin(Stdio::null());
    // SAFETY: `Joiner::join` only makes write(2) calls on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || joiner.join());
    }
    let mut child = cmd.spawn().expect("spawn inside the cgroup");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cg.pids().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "members: {:?}",
            cg.pids()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(cg.pids().contains(&child.id()), "{:?}", cg.pids());
    cg.set_cpu_limits(Some(5_000), Some(50), 1).expect("limits");
    let stats = cg.stats();
    assert!(stats.cpu_usage.is_some(), "{stats:?}");
    assert!(stats.memory_current.is_some(), "{stats:?}");
    assert!(stats.throttling.is_some(), "{stats:?}");

    cg.kill_all().expect("kill everything inside");
    let status = child.wait().expect("reap");
    assert_eq!(status.signal(), Some(9), "{status:?}");
    cg.remove(Duration::from_secs(5)).expect("remove");
    assert!(cg.paths().iter().all(|p| !p.exists()), "{:?}", cg.paths());
    drop(guard);
}

#[test]
fn real_host_an_existing_cgroup_is_refused_and_left_alone() {
    let layout = layout();
    let parent = format!("uvmctl-test-dup-{}", std::process::id());
    let cg = VmCgroup::create(&layout, &parent, "vm").expect("create");
    let _guard = Cleanup(cg.clone());
    assert!(matches!(
        VmCgroup::create(&layout, &parent, "vm"),
        Err(uvm_cgroup::CgroupError::Exists { .. })
    ));
    assert!(cg.paths().iter().all(|p| p.is_dir()));
}
