//! Following logs, boot-phase and exec events, a clean stop within the grace period, a process
//! killed by a signal, and what is left when a `create` or a test dies half-way: nothing that
//! `rm` (or the supervisor itself) does not clean.

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{require_prerequisites, stderr, Root, UVMCTL};
use serde_json::Value;

/// A hang guard for what a test waits on, not a timing assertion.
const HANG: Duration = Duration::from_secs(60);

fn create(root: &Root, name: &str, start: bool) -> String {
    require_prerequisites();
    let mut args = vec!["create", "--name", name];
    if start {
        args.push("--start");
    }
    let id = root.ok(&args).trim().to_owned();
    assert_eq!(id.len(), 16, "{id:?}");
    id
}

/// A child's stdout, line by line, from a thread (so that a test can wait for a line with a
/// bound).
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    fn spawn(mut command: Command) -> Lines {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { child, rx }
    }

    /// Waits for a line containing `needle`; returns the lines read up to it.
    fn until(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + HANG;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    seen.push(line);
                    if found {
                        return seen;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e}); read: {seen:?}"),
            }
        }
    }

    /// Waits for the child to end by itself; its status and the rest of its output.
    fn ends(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + HANG;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.rx.iter().collect());
            }
            assert!(Instant::now() < deadline, "the follower did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // Our own child; harmless if it has ended.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn events(root: &Root, id: &str, since: u64) -> Vec<Value> {
    root.ok(&["events", "--json", "--since", &since.to_string(), id])
        .lines()
        .map(|l| serde_json::from_str(l).expect("event JSON"))
        .collect()
}

/// Waits until no VM directory is left under the root (a supervisor removing its VM by
/// itself), then checks that nothing else is either.
fn assert_removed_by_itself(root: &Root) {
    let deadline = Instant::now() + HANG;
    while !root.vm_dirs().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the VM was not removed: {:?}",
            root.vm_dirs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    root.assert_clean();
}

// ---- Without a VM ---------------------------------------------------------------------------

/// A root with the directory and name claim a `create` leaves when it is killed before its
/// supervisor wrote the record.
fn abandoned(root: &Root, id: &str, name: &str) -> std::path::PathBuf {
    let names = root.path().join("names");
    std::fs::create_dir_all(&names).expect("names");
    let dir = root.path().join(id);
    std::fs::create_dir(&dir).expect("vm dir");
    std::fs::write(dir.join("supervisor.log"), b"").expect("log");
    std::fs::write(names.join(name), id).expect("claim");
    dir
}

#[test]
fn a_create_killed_before_its_record_is_listed_refused_and_removed_by_rm_with_its_name() {
    let root = Root::new();
    let id = "00c0ffee00c0ffee";
    let dir = abandoned(&root, id, "half");
    let ps = root.ok(&["ps", "-a"]);
    assert!(ps.contains(id) && ps.contains("Abandoned"), "{ps}");
    let listed: Value = serde_json::from_str(&root.ok(&["ps", "-a", "--json"])).expect("json");
    assert_eq!(listed[0]["state"], "Abandoned", "{listed}");
    assert_eq!(listed[0]["name"], "half", "{listed}");
    // Not a VM to talk to: the error says what it is and what cleans it.
    let out = root.run(&["exec", "half", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("uvmctl rm"), "{}", stderr(&out));
    // By its name, as the user knows it.
    assert_eq!(root.ok(&["rm", "half"]).trim(), id);
    assert!(!dir.exists());
    root.assert_clean();
}

#[test]
fn a_create_under_way_is_listed_as_creating_and_rm_refuses_it_until_it_is_abandoned() {
    let root = Root::new();
    let id = "00beef0000beef00";
    let dir = abandoned(&root, id, "busy");
    // What a live starter or supervisor holds.
    let log = std::fs::File::open(dir.join("supervisor.log")).expect("log");
    rustix::fs::flock(&log, rustix::fs::FlockOperation::LockExclusive).expect("lock");
    assert!(root.ok(&["ps", "-a"]).contains("Creating"));
    let out = root.run(&["rm", "-f", "busy"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("being created"), "{}", stderr(&out));
    assert!(dir.is_dir());
    drop(log);
    root.ok(&["rm", "busy"]);
    root.assert_clean();
}

// ---- Real VMs -------------------------------------------------------------------------------

#[test]
fn real_vm_a_clean_stop_within_the_grace_is_a_guest_power_off_and_logs_f_follows_it_to_the_end() {
    let root = Root::new();
    create(&root, "clean", true);
    // Following the guest's log before the stop: the agent's lines about it arrive as they are
    // written, and the follow ends by itself once the VM has ended.
    let follower = Lines::spawn(root.cmd(&["logs", "-f", "--guest", "clean"]));
    // The lines kept from the boot come first: once one is here, the follower is attached.
    follower.until("");
    root.ok(&["stop", "clean", "--timeout", "60"]);
    follower.until("shutdown requested by the host");
    let (status, _) = follower.ends();
    assert!(status.success(), "{status}");
    let v = root.inspect("clean");
    assert_eq!(v["state"], "Terminated", "{v}");
    assert_eq!(v["exit"]["reason"], "guest-shutdown", "{v}");
    root.ok(&["rm", "clean"]);
    root.assert_clean();
}

#[test]
fn real_vm_logs_f_of_the_console_streams_new_output_and_ends_when_the_vm_is_removed() {
    let root = Root::new();
    create(&root, "console", true);
    let follower = Lines::spawn(root.cmd(&["logs", "-f", "console"]));
    root.ok(&[
        "exec",
        "console",
        "--",
        "sh",
        "-c",
        "echo console-marker-one > /dev/console",
    ]);
    follower.until("console-marker-one");
    root.ok(&[
        "exec",
        "console",
        "--",
        "sh",
        "-c",
        "echo console-marker-two > /dev/console",
    ]);
    follower.until("console-marker-two");
    root.ok(&["rm", "-f", "console"]);
    let (status, _) = follower.ends();
    assert!(status.success(), "{status}");
    root.assert_clean();
}

#[test]
fn real_vm_events_have_boot_phases_before_running_then_execs_with_their_signal_and_resume_exactly()
{
    let root = Root::new();
    let id = create(&root, "events", true);
    // Killed by a signal: the exec exits as a shell would, 128 + 9.
    let out = root.run(&["exec", "events", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    // An exit 137 of its own is not a signal.
    let out = root.run(&["exec", "events", "--", "sh", "-c", "exit 137"]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));

    let all = events(&root, &id, 0);
    let sequences: Vec<u64> = all
        .iter()
        .map(|e| e["sequence"].as_u64().expect("seq"))
        .collect();
    let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
    assert_eq!(sequences, expected, "numbered 1, 2, 3, … without gaps");
    let position = |pred: &dyn Fn(&Value) -> bool| all.iter().position(pred);
    let running = position(&|e| e["type"] == "transition" && e["to"] == "RUNNING")
        .expect("the transition to Running");
    let phases: Vec<(usize, &str)> = all
        .iter()
        .enumerate()
        .filter(|(_, e)| e["type"] == "boot_phase")
        .map(|(i, e)| (i, e["step"].as_str().expect("step")))
        .collect();
    assert_eq!(
        phases.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        ["PREPARE_GUEST_LISTENER", "START_VM", "CONNECT_GUEST"],
        "{all:?}"
    );
    assert!(phases.iter().all(|(i, _)| *i < running), "{all:?}");
    assert!(all
        .iter()
        .filter(|e| e["type"] == "boot_phase")
        .all(|e| e["elapsed_ms"].is_number()));
    let first_exec = position(&|e| e["type"] == "exec_started").expect("an exec started");
    assert!(first_exec > running, "{all:?}");
    let exits: Vec<(Value, Value)> = all
        .iter()
        .filter(|e| e["type"] == "exec_exited")
        .map(|e| (e["exit_code"].clone(), e["signal"].clone()))
        .collect();
    assert_eq!(
        exits,
        [
            (Value::from(137), Value::from(9)),
            (Value::from(137), Value::Null)
        ],
        "{all:?}"
    );
    // Resuming after any point gives exactly the rest.
    let since = sequences[running];
    let rest = events(&root, &id, since);
    assert_eq!(rest, all[running + 1..].to_vec());

    // A stop without a grace is QEMU stopped at once.
    root.ok(&["stop", "events", "--timeout", "0"]);
    let v = root.inspect("events");
    assert_eq!(v["exit"]["reason"], "host-qmp-quit", "{v}");
    root.ok(&["rm", "events"]);
    root.assert_clean();
}

#[test]
fn real_vm_a_vm_tethered_to_a_process_is_removed_when_that_process_ends() {
    let root = Root::new();
    require_prerequisites();
    let mut holder = Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("spawn the process to tether to");
    let out = Command::new(UVMCTL)
        .arg("--root")
        .arg(root.path())
        .args(["create", "--name", "tied", "--tether-to"])
        .arg(holder.id().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("create");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(root.ok(&["ps", "-a"]).contains("tied"));
    // Our own child.
    holder.kill().expect("kill");
    holder.wait().expect("reap");
    assert_removed_by_itself(&root);
}

#[test]
fn real_vm_a_supervisor_whose_starter_died_before_hearing_ready_removes_its_vm_and_exits() {
    let root = Root::new();
    require_prerequisites();
    // What `create` makes before it starts the supervisor: the directory and the name claim.
    let id = "0dead0starter000";
    let names = root.path().join("names");
    std::fs::create_dir_all(&names).expect("names");
    std::fs::create_dir(root.path().join(id)).expect("vm dir");
    std::fs::write(names.join("orphan"), id).expect("claim");
    // The starter's end of the readiness pipe is closed: it is gone.
    let (read, write) = rustix::pipe::pipe().expect("pipe");
    drop(read);
    let out = Command::new(UVMCTL)
        .args(["--log", "info", "--root"])
        .arg(root.path())
        .args(["supervise", "--id", id, "--name", "orphan", "--ready-fd"])
        .arg(write.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("supervise");
    drop(write);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("readiness pipe"), "{}", stderr(&out));
    assert!(!Path::new(&root.path().join(id)).exists());
    root.assert_clean();
}
