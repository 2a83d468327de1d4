//! What the CLI tests of long-lived VMs share: the prerequisite check and a temporary state
//! root that cleans up after itself.

#![allow(dead_code, reason = "each test file uses its own part")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use uvm_host::processes_mentioning;

pub const UVMCTL: &str = env!("CARGO_BIN_EXE_uvmctl");

/// Fails the test: a real-VM test whose prerequisites are missing says which, and how to get it.
pub fn missing(what: impl std::fmt::Display) -> ! {
    panic!(
        "real-VM test prerequisite missing: {what}\n\
         (`make test` provides every prerequisite: it runs `make setup` and `make agent` first)"
    )
}

pub fn require_prerequisites() {
    for name in ["qemu-system-x86_64", "vhost-device-vsock"] {
        if !uvm_qemu::find_binary(name).is_absolute() {
            missing(format_args!(
                "{name} is not installed; `make setup` installs it"
            ));
        }
    }
    uvm_image::ImageSpec::from_env().unwrap_or_else(|e| missing(e));
}

/// A temporary state root; dropping it kills what its records name and removes it. A test
/// killed before its drop runs leaves only the empty root: its VMs are tethered to it (`create
/// --tether-to`) and their supervisors remove them when it dies.
pub struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    pub fn new() -> Root {
        Root {
            dir: tempfile::Builder::new()
                .prefix("uvms")
                .tempdir_in("/tmp")
                .expect("temp root"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `uvmctl --root <root> ARGS`; a `create` is tethered to this test process, so that a
    /// test killed outright (a timeout) still has its VMs removed by their supervisors.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(UVMCTL);
        cmd.arg("--root").arg(self.path()).args(args);
        if args.first() == Some(&"create") {
            cmd.arg("--tether-to").arg(std::process::id().to_string());
        }
        cmd
    }

    /// Runs `uvmctl --root <root> ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run uvmctl")
    }

    /// Runs it and asserts it succeeded; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "uvmctl {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    pub fn inspect(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["inspect", id, "--json"])).expect("inspect JSON")
    }

    /// The VM directories under the root.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| !p.ends_with("names"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nothing of any VM remains: no process mentions the root, no VM directory, no name claim.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut left = processes_mentioning(self.path());
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            left = processes_mentioning(self.path());
        }
        assert!(left.is_empty(), "processes of the VMs remain: {left:?}");
        assert_eq!(
            self.vm_dirs(),
            Vec::<PathBuf>::new(),
            "VM directories remain"
        );
        let claims: Vec<_> = std::fs::read_dir(self.path().join("names"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!(claims, Vec::<PathBuf>::new(), "name claims remain");
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for dir in self.vm_dirs() {
            let Ok(text) = std::fs::read_to_string(dir.join("vm.json")) else {
                continue;
            };
            let Ok(record) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let supervisor = &record["pids"]["supervisor"];
            let (Some(pid), start) = (
                supervisor["pid"].as_u64(),
                supervisor["start_time"].as_u64(),
            ) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let now = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(19))
                .and_then(|s| s.parse::<u64>().ok());
            // Only the very process our `create` started (same pid, same start time).
            if let (Some(now), Some(start), Ok(pid)) = (now, start, i32::try_from(pid)) {
                if now == start {
                    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
            }
            // A supervisor killed outright releases nothing: its QEMU dies with it (parent-death
            // signal), and the VM's cgroup is removed here, once empty.
            for runtime in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = runtime.file_name().to_string_lossy().into_owned();
                if name.starts_with("uvm-") {
                    remove_vm_cgroups(&name);
                }
            }
        }
    }
}

/// Removes the cgroup `uvmctl/<name>` of every hierarchy (v1 and v2) once it has no process,
/// waiting up to 5 s for the VM's processes to go.
fn remove_vm_cgroups(name: &str) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| h.path().join("uvmctl").join(name))
        .collect();
    dirs.push(PathBuf::from("/sys/fs/cgroup/uvmctl").join(name));
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
