//! Disks and shares through the CLI binary (`create --disk/--share`, `disk add|rm|ls`, `share
//! add|rm|ls`, `inspect`), each command a separate `uvmctl` invocation against its own temporary
//! `--root`. The tests that boot VMs are named `real_vm_*`; each makes its ext4 images with
//! `mkfs.ext4 -d`, reads guest writes back with `debugfs`, and ends with the leak check of
//! `common::Root::assert_clean` (no process, socket or directory left). A machine without what
//! they need (`make setup`, `make agent`, e2fsprogs) fails them, naming what is missing.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

mod common;

use common::{require_prerequisites, stderr, Root};

fn require_tools() {
    require_prerequisites();
    for tool in ["mkfs.ext4", "debugfs"] {
        if Command::new(tool).arg("-V").output().is_err() {
            common::missing(format_args!("{tool} is not installed (package e2fsprogs)"));
        }
    }
}

/// A scratch directory for images and shared directories.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("uvmdev")
        .tempdir_in("/tmp")
        .expect("scratch directory")
}

/// An ext4 image of 16 MiB at `dir/name` holding `files` (name, content) at its root.
fn ext4_image(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let content = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&content).expect("image content dir");
    for (file, text) in files {
        std::fs::write(content.join(file), text).expect("image content");
    }
    let image = dir.join(name);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image file");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// `/name` inside an ext4 image, read on the host.
fn debugfs_cat(image: &Path, name: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(image)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `uvmctl disk ls ID --json` (or `share ls`).
fn ls(root: &Root, kind: &str, id: &str) -> Vec<Value> {
    let out = root.ok(&[kind, "ls", id, "--json"]);
    serde_json::from_str::<Vec<Value>>(&out).expect("ls JSON")
}

/// Runs `uvmctl ARGS`, which must fail with uvmctl's own exit code (125); returns its stderr.
fn refused(root: &Root, args: &[&str]) -> String {
    let out = root.run(args);
    assert_eq!(
        out.status.code(),
        Some(125),
        "{args:?} did not fail as expected: {}",
        stderr(&out)
    );
    stderr(&out)
}

fn assert_running(root: &Root, id: &str) {
    let v = root.inspect(id);
    assert_eq!(v["state"], "Running", "{v}");
    assert_eq!(root.ok(&["exec", id, "--", "true"]), "");
}

fn create(root: &Root, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "--name", name, "--start"];
    args.extend_from_slice(extra);
    root.ok(&args).trim().to_owned()
}

// ---- No VM needed --------------------------------------------------------------------------

#[test]
fn a_disk_or_share_spec_without_an_absolute_guest_path_is_refused_before_anything_starts() {
    let root = Root::new();
    for args in [
        &["create", "--disk", "data.img"][..],
        &["create", "--disk", "data.img:data"],
        &["create", "--share", "/srv:srv:ro"],
    ] {
        let out = root.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("HOST_PATH:GUEST_PATH"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    root.assert_clean();
}

#[test]
fn every_device_command_has_an_example_in_its_help() {
    let root = Root::new();
    for command in [
        ["disk", "add"],
        ["disk", "rm"],
        ["disk", "ls"],
        ["share", "add"],
        ["share", "rm"],
        ["share", "ls"],
    ] {
        let help = root.ok(&[command[0], command[1], "--help"]);
        assert!(
            help.contains(&format!("uvmctl {} {}", command[0], command[1])),
            "{command:?}: {help}"
        );
    }
    let help = root.ok(&["create", "--help"]);
    assert!(
        help.contains("--disk") && help.contains("--share"),
        "{help}"
    );
}

// ---- Real VMs: disks ------------------------------------------------------------------------

#[test]
fn real_vm_bad_disks_are_refused_and_leave_the_vm_running_with_no_disk() {
    require_tools();
    let root = Root::new();
    let dir = scratch();
    let image = ext4_image(dir.path(), "shared.img", &[("f", "one writer\n")]);
    let a = create(&root, "a", &[]);
    let b = create(&root, "b", &[]);

    let missing = dir.path().join("nosuch.img");
    let e = refused(&root, &["disk", "add", &a, path(&missing), "/data"]);
    assert!(e.contains("nosuch.img"), "{e}");
    let e = refused(&root, &["disk", "add", &a, path(dir.path()), "/data"]);
    assert!(e.contains("directory"), "{e}");
    let e = refused(&root, &["disk", "add", &a, path(&image), "/proc/data"]);
    assert!(e.contains("/proc"), "{e}");
    let e = refused(&root, &["disk", "rm", &a, "/nothing/here"]);
    assert!(e.contains("/nothing/here"), "{e}");
    assert_running(&root, &a);
    assert_eq!(ls(&root, "disk", &a), Vec::<Value>::new());

    // One writer: b's writable attach of the image a writes is refused.
    root.ok(&["disk", "add", &a, path(&image), "/data"]);
    let e = refused(&root, &["disk", "add", &b, path(&image), "/data"]);
    assert!(e.contains("shared.img"), "{e}");
    assert_running(&root, &b);
    assert_eq!(ls(&root, "disk", &b), Vec::<Value>::new());
    assert_eq!(
        root.ok(&["exec", &a, "--", "cat", "/data/f"]),
        "one writer\n"
    );

    root.ok(&["rm", "-f", &a, &b]);
    root.assert_clean();
}

#[test]
fn real_vm_hot_added_disk_is_read_written_busy_while_used_and_its_write_reaches_the_image() {
    require_tools();
    let root = Root::new();
    let dir = scratch();
    let image = ext4_image(dir.path(), "data.img", &[("hello", "from the host\n")]);
    let ro_image = ext4_image(dir.path(), "ro.img", &[("r", "read me\n")]);
    let id = create(&root, "disks", &[]);

    // A relative host path: made absolute by the client, not by the supervisor's cwd.
    let out = root
        .cmd(&["disk", "add", &id, "data.img", "/data"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("disk add");
    assert!(out.status.success(), "disk add: {}", stderr(&out));
    assert_eq!(
        root.ok(&["exec", &id, "--", "cat", "/data/hello"]),
        "from the host\n"
    );
    root.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo from the guest > /data/f && sync",
    ]);
    let disks = ls(&root, "disk", &id);
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert_eq!(disks[0]["state"], "Attached", "{disks:?}");
    assert_eq!(disks[0]["host_path"], path(&image), "{disks:?}");
    assert_eq!(disks[0]["mounts"][0]["guest_path"], "/data", "{disks:?}");
    assert_eq!(disks[0]["mounts"][0]["state"], "Mounted", "{disks:?}");
    let v = root.inspect(&id);
    assert_eq!(v["devices"][0]["state"], "Attached", "{v}");
    let text = root.ok(&["inspect", &id]);
    assert!(
        text.contains("devices: disk slot 0 Attached rw") && text.contains("-> /data (Mounted rw)"),
        "{text}"
    );
    // The record has it too (what `ps` and a dead supervisor's `inspect` read).
    let record: Value = serde_json::from_slice(
        &std::fs::read(root.path().join(&id).join("vm.json")).expect("vm.json"),
    )
    .expect("record JSON");
    assert_eq!(record["devices"][0]["mounts"][0]["guest_path"], "/data");

    // Busy: a process whose working directory is on the mount keeps it; rm refuses, and
    // succeeds once it has ended.
    let mut holder = root
        .cmd(&[
            "exec",
            "-i",
            "-w",
            "/data",
            &id,
            "--",
            "sh",
            "-c",
            "echo ready; read x; exit 0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("holder stdout"))
        .read_line(&mut line)
        .expect("holder ready");
    assert_eq!(line, "ready\n");
    let e = refused(&root, &["disk", "rm", &id, "/data"]);
    assert!(e.contains("/data is in use in the guest"), "{e}");
    assert_eq!(ls(&root, "disk", &id)[0]["mounts"][0]["state"], "Mounted");
    drop(holder.stdin.take());
    let status = holder.wait().expect("holder exit");
    assert!(status.success(), "{status}");
    assert_eq!(root.ok(&["disk", "rm", &id, "/data"]), "/data\n");
    assert_eq!(ls(&root, "disk", &id), Vec::<Value>::new());
    assert_eq!(debugfs_cat(&image, "f"), "from the guest\n");
    let events = root.ok(&["events", "--json", &id]);
    let changes: Vec<(String, String)> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("event JSON"))
        .filter(|e| e["type"] == "device_changed")
        .map(|e| {
            (
                e["operation"].as_str().unwrap_or_default().to_owned(),
                e["guest_path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("ADD_DISK".to_string(), "/data".to_string()),
            ("REMOVE_DISK".into(), "/data".into()),
        ]
    );

    // Read-only: readable, writes refused in the guest.
    root.ok(&["disk", "add", &id, path(&ro_image), "/ro", "--ro"]);
    assert_eq!(root.ok(&["exec", &id, "--", "cat", "/ro/r"]), "read me\n");
    let out = root.run(&["exec", &id, "--", "sh", "-c", "echo x > /ro/w"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a write to a read-only disk worked"
    );
    assert!(stderr(&out).contains("Read-only"), "{}", stderr(&out));
    assert_eq!(ls(&root, "disk", &id)[0]["read_only"], true);

    // Removed with the read-only disk still attached: nothing is left.
    root.ok(&["rm", "-f", &id]);
    root.assert_clean();
}

fn cold_disks_and_shares(machine: &str) {
    require_tools();
    let root = Root::new();
    let dir = scratch();
    let image = ext4_image(dir.path(), "cold.img", &[("c", "cold\n")]);
    let ro_image = ext4_image(dir.path(), "coldro.img", &[("r", "cold ro\n")]);
    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("share dir");
    std::fs::write(share.join("s"), "shared\n").expect("share file");
    let disk_arg = format!("{}:/cold", path(&image));
    let ro_arg = format!("{}:/coldro:ro", path(&ro_image));
    let share_arg = format!("{}:/share", path(&share));
    let id = create(
        &root,
        "cold",
        &[
            "--machine",
            machine,
            "--disk",
            &disk_arg,
            "--disk",
            &ro_arg,
            "--share",
            &share_arg,
        ],
    );
    assert_eq!(root.ok(&["exec", &id, "--", "cat", "/cold/c"]), "cold\n");
    assert_eq!(
        root.ok(&["exec", &id, "--", "cat", "/coldro/r"]),
        "cold ro\n"
    );
    assert_eq!(root.ok(&["exec", &id, "--", "cat", "/share/s"]), "shared\n");
    let out = root.run(&["exec", &id, "--", "sh", "-c", "echo x > /coldro/w"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a write to a read-only disk worked"
    );
    root.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo cold write > /cold/w && sync",
    ]);

    let disks = ls(&root, "disk", &id);
    assert_eq!(disks.len(), 2, "{disks:?}");
    assert!(disks.iter().all(|d| d["cold"] == true), "{disks:?}");
    let shares = ls(&root, "share", &id);
    assert_eq!(shares.len(), 1, "{shares:?}");
    assert_eq!(shares[0]["cold"], true, "{shares:?}");
    let v = root.inspect(&id);
    assert_eq!(v["config"]["disks"][1]["guest_path"], "/coldro", "{v}");
    assert_eq!(v["config"]["disks"][1]["read_only"], true, "{v}");
    assert_eq!(v["config"]["shares"][0]["guest_path"], "/share", "{v}");

    if machine == "microvm" {
        // No hotplug there: a typed refusal, the VM as it was.
        let hot = ext4_image(dir.path(), "hot.img", &[]);
        let e = refused(&root, &["disk", "add", &id, path(&hot), "/hot"]);
        assert!(e.contains("microvm") || e.contains("not supported"), "{e}");
        assert_eq!(ls(&root, "disk", &id).len(), 2);
        assert_running(&root, &id);
    }
    root.ok(&["stop", &id]);
    assert_eq!(debugfs_cat(&image, "w"), "cold write\n");
    root.ok(&["rm", &id]);
    root.assert_clean();
}

#[test]
fn real_vm_disks_and_a_share_given_at_create_are_mounted_at_start_on_q35() {
    cold_disks_and_shares("q35");
}

#[test]
fn real_vm_disks_and_a_share_given_at_create_are_mounted_at_start_on_microvm() {
    cold_disks_and_shares("microvm");
}

#[test]
fn real_vm_run_mounts_a_disk_given_with_disk() {
    require_tools();
    let dir = scratch();
    let image = ext4_image(dir.path(), "run.img", &[("r", "one shot\n")]);
    let spec = format!("{}:/run-disk:ro", path(&image));
    let out = Command::new(common::UVMCTL)
        .args(["run", "--disk", &spec, "--", "cat", "/run-disk/r"])
        .stdin(Stdio::null())
        .output()
        .expect("uvmctl run");
    assert!(out.status.success(), "run: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one shot\n");
}

// ---- Real VMs: shares -----------------------------------------------------------------------

#[test]
fn real_vm_hot_added_share_is_read_and_written_both_ways_and_a_read_only_one_refuses_writes() {
    require_tools();
    let root = Root::new();
    let dir = scratch();
    let shared = dir.path().join("rw");
    let ro = dir.path().join("ro");
    std::fs::create_dir(&shared).expect("rw dir");
    std::fs::create_dir(&ro).expect("ro dir");
    std::fs::write(shared.join("host"), "from the host\n").expect("host file");
    std::fs::write(ro.join("r"), "read only\n").expect("ro file");
    let id = create(&root, "shares", &[]);

    // Bad inputs first: a file is not a directory to share; unknown paths are named.
    let file = shared.join("host");
    let e = refused(&root, &["share", "add", &id, path(&file), "/f"]);
    assert!(e.contains("host"), "{e}");
    let e = refused(&root, &["share", "rm", &id, "/nothing"]);
    assert!(e.contains("/nothing"), "{e}");
    assert_eq!(ls(&root, "share", &id), Vec::<Value>::new());

    let out = root.ok(&["share", "add", &id, path(&shared), "/mnt/rw"]);
    assert!(out.starts_with("/mnt/rw tag "), "{out}");
    assert_eq!(
        root.ok(&["exec", &id, "--", "cat", "/mnt/rw/host"]),
        "from the host\n"
    );
    root.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo from the guest > /mnt/rw/guest",
    ]);
    assert_eq!(
        std::fs::read_to_string(shared.join("guest")).expect("guest's file on the host"),
        "from the guest\n"
    );
    std::fs::write(shared.join("later"), "written later\n").expect("host write");
    assert_eq!(
        root.ok(&["exec", &id, "--", "cat", "/mnt/rw/later"]),
        "written later\n"
    );

    root.ok(&["share", "add", &id, path(&ro), "/mnt/ro", "--ro"]);
    assert_eq!(
        root.ok(&["exec", &id, "--", "cat", "/mnt/ro/r"]),
        "read only\n"
    );
    let out = root.run(&["exec", &id, "--", "sh", "-c", "echo x > /mnt/ro/w"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a write to a read-only share worked"
    );
    assert!(!ro.join("w").exists());

    let shares = ls(&root, "share", &id);
    assert_eq!(shares.len(), 2, "{shares:?}");
    assert!(shares.iter().all(|s| s["state"] == "Added"), "{shares:?}");
    let text = root.ok(&["inspect", &id]);
    assert!(text.contains("-> /mnt/ro (Mounted ro)"), "{text}");

    assert_eq!(root.ok(&["share", "rm", &id, "/mnt/rw"]), "/mnt/rw\n");
    assert_eq!(ls(&root, "share", &id).len(), 1);
    let out = root.run(&["exec", &id, "--", "cat", "/mnt/rw/host"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the removed share is still there"
    );

    // Removed with the read-only share still added: no virtiofsd, socket or directory left.
    root.ok(&["rm", "-f", &id]);
    root.assert_clean();
}
