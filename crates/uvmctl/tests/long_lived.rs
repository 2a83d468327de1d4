//! Long-lived VMs through the CLI binary, each command a separate `uvmctl` invocation against
//! its own temporary `--root`: create, exec, ps, inspect, stats, stop, rm, and their failure
//! paths. Tests that need the guest image or boot QEMU are named `real_vm_*` (at most a few at
//! once, failing loudly without `make setup` and `make agent`); the rest need no VM.
//!
//! Every test's [`Root`] kills, when dropped, the supervisors its records name (only those, by
//! pid *and* start time: processes our `create`s started; their VMs die with them) and removes
//! the root, so a failing test leaves nothing running.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{require_prerequisites, stderr, Root, UVMCTL};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").mode() & 0o777
}

// ---- No VM needed --------------------------------------------------------------------------

#[test]
fn an_unknown_id_or_name_is_named_in_the_error_and_exits_125() {
    let root = Root::new();
    for args in [
        &["exec", "nosuch", "--", "true"][..],
        &["inspect", "nosuch"],
        &["start", "nosuch"],
        &["rm", "nosuch"],
        &["stats", "nosuch"],
    ] {
        let out = root.run(args);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no such VM: nosuch"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_root_that_is_a_file_or_not_ours_is_refused() {
    let root = Root::new();
    let file = root.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let out = Command::new(UVMCTL)
        .arg("--root")
        .arg(&file)
        .args(["create", "--name", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );

    let theirs = root.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    let nobody = rustix::fs::Uid::from_raw(65534);
    if rustix::process::geteuid().is_root() {
        rustix::fs::chown(&theirs, Some(nobody), None).expect("chown");
    } else {
        // Not root: a directory of root's stands in for another user's.
        return check_not_ours(Path::new("/"));
    }
    check_not_ours(&theirs);
}

fn check_not_ours(path: &Path) {
    let out = Command::new(UVMCTL)
        .arg("--root")
        .arg(path)
        .args(["ps", "-a"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("not by us"), "{}", stderr(&out));
}

#[test]
fn a_bad_name_is_refused_and_leaves_nothing() {
    let root = Root::new();
    let out = root.run(&["create", "--name", "no/slashes"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("invalid VM name"), "{}", stderr(&out));
    root.assert_clean();
}

// ---- Real VMs -------------------------------------------------------------------------------

/// Creates a VM (started unless `created_only`); returns its id.
fn create(root: &Root, name: &str, created_only: bool) -> String {
    require_prerequisites();
    let mut args = vec!["create", "--name", name];
    if !created_only {
        args.push("--start");
    }
    let id = root.ok(&args).trim().to_owned();
    assert_eq!(id.len(), 16, "{id:?}");
    id
}

#[test]
fn real_vm_lifecycle_across_invocations_keeps_guest_state_and_the_modes() {
    let root = Root::new();
    let id = create(&root, "life", true);
    let dir = root.path().join(&id);
    assert_eq!(mode(root.path()), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("api.sock")), 0o600);
    assert_eq!(mode(&dir.join("vm.json")), 0o600);

    // Created: exec is refused naming the state.
    let v = root.inspect("life");
    assert_eq!(v["state"], "Created", "{v}");
    let out = root.run(&["exec", "life", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("Created"), "{}", stderr(&out));

    // By a unique id prefix.
    root.ok(&["start", &id[..6]]);
    root.ok(&["exec", "life", "--", "sh", "-c", "echo kept > /tmp/state"]);
    assert_eq!(root.ok(&["exec", &id, "--", "cat", "/tmp/state"]), "kept\n");
    let out = root.run(&[
        "exec",
        "-e",
        "X=7",
        "-w",
        "/tmp",
        "life",
        "--",
        "sh",
        "-c",
        "pwd; exit $X",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/tmp\n");

    let v = root.inspect("life");
    for key in [
        "id",
        "name",
        "state",
        "reason",
        "pids",
        "created_at",
        "started_at",
        "config",
        "devices",
    ] {
        assert!(v.get(key).is_some(), "inspect lacks {key}: {v}");
    }
    assert_eq!(
        (v["id"].as_str(), v["name"].as_str(), v["state"].as_str()),
        (Some(id.as_str()), Some("life"), Some("Running"))
    );
    for role in ["supervisor", "qemu", "vhost-device-vsock"] {
        assert!(v["pids"][role].as_u64().is_some(), "no {role} pid: {v}");
    }
    let ps: Value = serde_json::from_str(&root.ok(&["ps", "--json"])).expect("ps JSON");
    assert_eq!(ps.as_array().map(Vec::len), Some(1), "{ps}");
    let stats: Value = serde_json::from_str(&root.ok(&["stats", "life", "--json"])).expect("stats");
    assert!(stats["host"]["rss_bytes"].as_u64() > Some(0), "{stats}");
    assert!(
        stats["guest"]["mem_total_bytes"].as_u64() > Some(0),
        "{stats}"
    );

    assert_eq!(
        root.ok(&["update", "life", "--memory", "200"]),
        "memory 200 MiB\n"
    );
    // The VM's cgroup takes CPU limits, and its figures are in the host stats.
    assert_eq!(
        root.ok(&["update", "life", "--cpu-limit", "50", "--cpu-weight", "200"]),
        "cpu limit 50%\ncpu weight 200\n"
    );
    let stats: Value = serde_json::from_str(&root.ok(&["stats", "life", "--json"])).expect("stats");
    assert!(
        stats["host"]["memory_current_bytes"].as_u64() > Some(0),
        "{stats}"
    );
    assert!(
        stats["host"]["cpu_throttling"]["periods"].is_u64(),
        "{stats}"
    );
    // A VM created without a vCPU maximum cannot grow: said, not faked.
    let out = root.run(&["update", "life", "--cpus", "2"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("no maximum"), "{}", stderr(&out));
    // A CPU group that does not exist: said, and nothing moved.
    let out = root.run(&["update", "life", "--cpu-group", "no-such-group"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains(r#"cpu group "no-such-group" does not exist"#),
        "{}",
        stderr(&out)
    );

    assert!(
        root.ok(&["logs", "life"]).contains("uvm-agent"),
        "no agent lines on the console"
    );
    let stacks = root.ok(&["dump-stacks", "life"]);
    for part in [
        "=== guest agent",
        "=== supervisor threads",
        "=== QEMU threads",
        "uvm-agent",
    ] {
        assert!(
            stacks.contains(part),
            "dump-stacks lacks {part:?}:\n{stacks}"
        );
    }

    root.ok(&["stop", "life"]);
    let out = root.run(&["logs", "life"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("console log went"),
        "{}",
        stderr(&out)
    );
    let v = root.inspect("life");
    assert_eq!(v["state"], "Terminated", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("terminated on request")),
        "{v}"
    );
    let out = root.run(&["exec", "life", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("Terminated"), "{}", stderr(&out));
    // Not running any more: listed only with -a.
    assert_eq!(root.ok(&["ps"]).lines().count(), 1);
    assert_eq!(root.ok(&["ps", "-a"]).lines().count(), 2);

    // Events: numbered 1, 2, … without gaps; resuming after N gives exactly what followed N.
    let events = |since: &str| -> Vec<Value> {
        root.ok(&["events", "--json", "--since", since, "life"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    };
    let all = events("0");
    let seqs: Vec<u64> = all.iter().filter_map(|e| e["sequence"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{all:?}");
    let tos: Vec<&str> = all.iter().filter_map(|e| e["to"].as_str()).collect();
    assert_eq!(tos, ["CREATED", "RUNNING", "TERMINATED"], "{all:?}");
    let execs = all.iter().filter(|e| e["type"] == "exec_exited").count();
    assert_eq!(execs, 3, "{all:?}");
    assert_eq!(events("3"), all[3..].to_vec());
    let out = root.run(&["events", "--since", "999", "life"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("beyond the newest"),
        "{}",
        stderr(&out)
    );

    root.ok(&["rm", "life"]);
    root.assert_clean();
}

#[test]
fn real_vm_four_concurrent_execs_stream_their_own_stdin_back_byte_for_byte() {
    let root = Root::new();
    let id = create(&root, "four", false);
    let inputs: Vec<Vec<u8>> = (0..4u8)
        .map(|i| {
            (0..200_000u32)
                .map(|n| (n.wrapping_mul(2_654_435_761) >> 24) as u8 ^ i)
                .collect()
        })
        .collect();
    let children: Vec<_> = inputs
        .iter()
        .map(|input| {
            let mut child = root
                .cmd(&["exec", "-i", &id, "--", "cat"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn exec");
            let mut stdin = child.stdin.take().expect("stdin");
            let input = input.clone();
            // Written in pieces while the output streams back.
            let writer = std::thread::spawn(move || {
                for piece in input.chunks(7_000) {
                    stdin.write_all(piece).expect("write stdin");
                }
            });
            (child, writer)
        })
        .collect();
    for ((child, writer), input) in children.into_iter().zip(&inputs) {
        let out = child.wait_with_output().expect("exec");
        writer.join().expect("writer");
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            out.stdout == *input,
            "stdout differs: {} bytes back of {}",
            out.stdout.len(),
            input.len()
        );
    }
    root.ok(&["rm", "-f", "four"]);
    root.assert_clean();
}

#[test]
fn real_vm_rm_refuses_a_running_vm_without_force_and_a_taken_name_is_refused() {
    let root = Root::new();
    let id = create(&root, "busy", false);
    let out = root.run(&["rm", "busy"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("Running"), "{}", stderr(&out));
    assert!(stderr(&out).contains("-f"), "{}", stderr(&out));
    root.ok(&["exec", "busy", "--", "true"]);
    // -t: a terminal in the guest, stderr merged into stdout.
    let out = root.ok(&["exec", "-t", "busy", "--", "sh", "-c", "tty; echo err >&2"]);
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("err"), "{out:?}");

    let out = root.run(&["create", "--name", "busy"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("already in use by VM"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        root.vm_dirs(),
        [root.path().join(&id)],
        "the loser left something"
    );

    root.ok(&["rm", "-f", "busy"]);
    root.assert_clean();
}

#[test]
fn real_vm_two_creates_racing_for_one_name_have_one_winner_and_the_loser_leaves_nothing() {
    require_prerequisites();
    let root = Root::new();
    let racers: Vec<_> = (0..2)
        .map(|_| {
            root.cmd(&["create", "--name", "race"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn create")
        })
        .collect();
    let outs: Vec<Output> = racers
        .into_iter()
        .map(|c| c.wait_with_output().expect("create"))
        .collect();
    let winners: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(
        winners.len(),
        1,
        "{:?}",
        outs.iter().map(stderr).collect::<Vec<_>>()
    );
    let loser = outs.iter().find(|o| !o.status.success()).expect("a loser");
    assert!(
        stderr(loser).contains("already in use"),
        "{}",
        stderr(loser)
    );
    let id = String::from_utf8_lossy(&winners[0].stdout)
        .trim()
        .to_owned();
    assert_eq!(root.vm_dirs(), [root.path().join(&id)]);
    // A Created VM is not Terminated: rm needs -f.
    root.ok(&["rm", "-f", "race"]);
    root.assert_clean();
}

#[test]
fn real_vm_a_client_killed_mid_exec_gets_its_guest_process_killed_and_the_vm_runs_on() {
    let root = Root::new();
    create(&root, "cut", false);
    let mut client = root
        .cmd(&["exec", "cut", "--", "sleep", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn exec");
    let sleeping = || root.ok(&["exec", "cut", "--", "ps"]).contains("sleep 1000");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sleeping() {
        assert!(Instant::now() < deadline, "the exec never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    client.kill().expect("kill our exec client");
    client.wait().expect("reap it");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping() {
        assert!(
            Instant::now() < deadline,
            "the guest process outlived its client"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(root.inspect("cut")["state"], "Running");
    root.ok(&["rm", "-f", "cut"]);
    root.assert_clean();
}

#[test]
fn real_vm_a_vm_whose_supervisor_died_shows_so_and_rm_cleans_it() {
    let root = Root::new();
    let id = create(&root, "orphan", false);
    let v = root.inspect("orphan");
    let pid = v["pids"]["supervisor"].as_u64().expect("supervisor pid");
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    // Our own create started it.
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.ok(&["ps", "-a"]).contains("supervisor dead") {
        assert!(
            Instant::now() < deadline,
            "ps never showed the dead supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = root.run(&["exec", "orphan", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("is not running"), "{}", stderr(&out));
    // The VM's cgroup outlived its supervisor (its runtime directory names it).
    let cgroups = || -> Vec<std::path::PathBuf> {
        let runtime: Vec<_> = std::fs::read_dir(root.path().join(&id))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let hierarchies: Vec<std::path::PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        hierarchies
            .iter()
            .chain([std::path::PathBuf::from("/sys/fs/cgroup")].iter())
            .flat_map(|h| runtime.iter().map(move |n| h.join("uvmctl").join(n)))
            .filter(|p| p.is_dir())
            .collect()
    };
    let left = cgroups();
    assert!(!left.is_empty(), "the VM had no cgroup");
    assert_eq!(root.ok(&["rm", "orphan"]).trim(), id);
    assert!(left.iter().all(|p| !p.exists()), "rm left {left:?}");
    root.assert_clean();
}

#[test]
fn real_vm_a_create_the_supervisor_refuses_fails_with_its_message_and_leaves_nothing() {
    require_prerequisites();
    let root = Root::new();
    let out = root.run(&["create", "--name", "tiny", "--memory", "1"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("creating VM"), "{}", stderr(&out));
    assert!(stderr(&out).contains("memory"), "{}", stderr(&out));
    root.assert_clean();
}

#[test]
fn real_vm_a_signal_to_exec_reaches_the_guest_process() {
    let root = Root::new();
    create(&root, "sig", false);
    // The shell traps TERM and says so; `wait` returns early when the trap fires.
    let script = "trap 'echo got TERM; exit 9' TERM; echo ready; sleep 1000 & wait";
    let mut client = root
        .cmd(&["exec", "sig", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn exec");
    let mut stdout = client.stdout.take().expect("stdout");
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("ready line");
    assert_eq!(&first, b"ready\n");
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(client.id()).expect("pid")).expect("pid");
    // Our own exec client: it forwards the signal to the guest process.
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("rest");
    let status = client.wait().expect("exec");
    assert_eq!((status.code(), rest.as_str()), (Some(9), "got TERM\n"));
    // The background sleep is the guest's business; the VM is fine.
    root.ok(&["exec", "sig", "--", "true"]);
    root.ok(&["rm", "-f", "sig"]);
    root.assert_clean();
}

#[test]
fn real_vm_a_vm_that_powers_off_by_itself_is_recorded_terminated_and_still_inspectable() {
    let root = Root::new();
    create(&root, "off", false);
    // The guest powers itself off; the exec's own fate (its link goes with the VM) is not the point.
    let _ = root.run(&["exec", "off", "--", "poweroff", "-f"]);
    let why = root.ok(&["wait", "off"]);
    assert!(why.contains("exited"), "{why:?}");
    let v = root.inspect("off");
    assert_eq!(
        (v["state"].as_str(), v["supervisor_alive"].as_bool()),
        (Some("Terminated"), Some(true)),
        "{v}"
    );
    // The record says so too, without asking the supervisor.
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root.path()
                .join(v["id"].as_str().expect("id"))
                .join("vm.json"),
        )
        .expect("record"),
    )
    .expect("record JSON");
    assert_eq!(record["state"], "Terminated", "{record}");
    assert!(record["pids"].get("qemu").is_none(), "{record}");
    root.ok(&["rm", "off"]);
    root.assert_clean();
}

#[test]
fn real_vm_a_terminated_supervisor_takes_its_vm_down_and_leaves_the_record_for_rm() {
    let root = Root::new();
    create(&root, "term", false);
    let v = root.inspect("term");
    let pid = |role: &str| {
        v["pids"][role]
            .as_u64()
            .and_then(|p| i32::try_from(p).ok())
            .expect("pid")
    };
    let (supervisor, qemu) = (pid("supervisor"), pid("qemu"));
    let pid = rustix::process::Pid::from_raw(supervisor).expect("pid");
    // Our own create started it.
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root
        .ok(&["ps", "-a"])
        .contains("Terminated (supervisor dead)")
    {
        assert!(
            Instant::now() < deadline,
            "ps never showed the VM terminated: {}",
            root.ok(&["ps", "-a"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists(),
        "QEMU outlived its supervisor"
    );
    root.ok(&["rm", "term"]);
    root.assert_clean();
}

#[test]
fn real_vm_cp_of_10_mib_both_ways_is_byte_exact_and_a_refused_path_leaves_nothing() {
    let root = Root::new();
    create(&root, "cp", false);
    let local = tempfile::tempdir().expect("local dir");
    let src = local.path().join("src.bin");
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write");
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    let src_arg = src.to_str().expect("utf-8 path");
    root.ok(&["cp", src_arg, "cp:/tmp/big.bin"]);
    assert_eq!(
        root.ok(&["exec", "cp", "--", "stat", "-c", "%a %s", "/tmp/big.bin"]),
        format!("640 {}\n", data.len())
    );
    let back = local.path().join("back.bin");
    root.ok(&["cp", "cp:/tmp/big.bin", back.to_str().expect("utf-8 path")]);
    assert!(
        std::fs::read(&back).expect("read back") == data,
        "the copy out differs"
    );
    assert_eq!(mode(&back), 0o640);

    // Refused by the guest: an error, and nothing at the target or beside it.
    let out = root.run(&["cp", src_arg, "cp:/proc/nope"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("the guest refused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(root.ok(&["exec", "cp", "--", "ls", "/tmp"]), "big.bin\n");
    let out = root.run(&["cp", "cp:/nope", back.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("No such file"), "{}", stderr(&out));
    root.ok(&["rm", "-f", "cp"]);
    root.assert_clean();
}

#[test]
fn real_vm_create_json_names_the_socket_and_root_may_follow_the_command() {
    require_prerequisites();
    let root = Root::new();
    let root_arg = root.path().to_str().expect("utf-8 root");
    // As the Python client calls it: `--root` after the command.
    let out = Command::new(UVMCTL)
        .args(["create", "--root", root_arg, "--name", "js", "--json"])
        .output()
        .expect("create");
    assert!(out.status.success(), "{}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let id = info["id"].as_str().expect("id");
    assert_eq!(
        (info["name"].as_str(), info["state"].as_str()),
        (Some("js"), Some("Created")),
        "{info}"
    );
    let socket = Path::new(info["api_socket"].as_str().expect("api_socket"));
    assert_eq!(socket, root.path().join(id).join("api.sock"));
    let out = Command::new(UVMCTL)
        .args(["rm", "-f", "--root", root_arg, id])
        .output()
        .expect("rm");
    assert!(out.status.success(), "{}", stderr(&out));
    root.assert_clean();
    // `run` is one-shot: a root means nothing to it, and it says so.
    let out = Command::new(UVMCTL)
        .args(["run", "--root", root_arg, "--", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--root applies to"),
        "{}",
        stderr(&out)
    );
}
