//! Our guest kernel's recipe: the config fragment `kernel/uvm.config` says what it must say,
//! and `scripts/build-kernel.sh` keys its cache on the fragment and `kernel/patches/` and skips
//! the build when nothing changed. (The build itself takes minutes and is not run here; `boot_qemu.rs` boots its
//! result.)

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fragment_path() -> PathBuf {
    repo().join("kernel/uvm.config")
}

/// What one line of a fragment is.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Blank,
    Comment,
    /// `CONFIG_X=value`.
    Set(&'a str, &'a str),
    /// `# CONFIG_X is not set`.
    Unset(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    let line = line.trim_end();
    if line.is_empty() {
        return Line::Blank;
    }
    if let Some(name) = line
        .strip_prefix("# ")
        .and_then(|l| l.strip_suffix(" is not set"))
        .filter(|n| n.starts_with("CONFIG_"))
    {
        return Line::Unset(name);
    }
    if line.starts_with('#') {
        return Line::Comment;
    }
    let (name, value) = line
        .split_once('=')
        .unwrap_or_else(|| panic!("not an option line: {line:?}"));
    assert!(
        name.starts_with("CONFIG_")
            && name[7..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "bad option name in {line:?}"
    );
    assert!(!value.is_empty(), "no value in {line:?}");
    Line::Set(name, value)
}

fn fragment() -> String {
    std::fs::read_to_string(fragment_path()).expect("read kernel/uvm.config")
}

#[test]
fn fragment_parses_with_each_group_explained() {
    let text = fragment();
    let mut seen = HashSet::new();
    let mut previous = Line::Blank;
    let mut options = 0;
    for line in text.lines() {
        let parsed = parse_line(line);
        match parsed {
            Line::Set(name, _) | Line::Unset(name) => {
                assert!(seen.insert(name), "{name} appears twice");
                // A group starts right after its comment: no option line follows a blank one.
                assert_ne!(
                    previous,
                    Line::Blank,
                    "{name} starts a group with no comment"
                );
                options += 1;
            }
            Line::Blank | Line::Comment => {}
        }
        previous = parsed;
    }
    assert!(options >= 80, "only {options} options");
}

#[test]
fn fragment_has_the_required_options() {
    let text = fragment();
    let set: HashSet<&str> = text
        .lines()
        .filter_map(|l| match parse_line(l) {
            Line::Set(name, "y") => Some(name),
            _ => None,
        })
        .collect();
    for option in [
        "PVH",
        "SMP",
        "SERIAL_8250_CONSOLE",
        "DEVTMPFS",
        "TMPFS",
        "BLK_DEV_INITRD",
        "RD_GZIP",
        "BINFMT_ELF",
        "BINFMT_SCRIPT",
        "UNIX",
        "EPOLL",
        "EVENTFD",
        "SIGNALFD",
        "TIMERFD",
        "FUTEX",
        "PCI",
        "HOTPLUG_PCI_PCIE",
        "ACPI",
        "VIRTIO_PCI",
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        "VIRTIO_CONSOLE",
        "VSOCKETS",
        "VIRTIO_VSOCKETS",
        "VIRTIO_BLK",
        "SCSI_VIRTIO",
        "BLK_DEV_SD",
        "VIRTIO_NET",
        "NET_9P_VIRTIO",
        "9P_FS",
        "EXT4_FS",
        "OVERLAY_FS",
        "HOTPLUG_CPU",
        "MEMORY_HOTPLUG",
        "VIRTIO_MEM",
        "VIRTIO_BALLOON",
        "CGROUPS",
        "MEMCG",
        "CGROUP_PIDS",
        "CGROUP_SCHED",
        "NAMESPACES",
        "PID_NS",
        "UNIX98_PTYS",
        "HW_RANDOM_VIRTIO",
        "NO_HZ_IDLE",
        "HIGH_RES_TIMERS",
    ] {
        let name = format!("CONFIG_{option}");
        assert!(set.contains(name.as_str()), "{name}=y missing");
    }
    // No modules: everything is built in, and the image ships no .ko files.
    assert!(
        text.lines()
            .any(|l| parse_line(l) == Line::Unset("CONFIG_MODULES")),
        "`# CONFIG_MODULES is not set` missing"
    );
    assert!(!text
        .lines()
        .any(|l| matches!(parse_line(l), Line::Set(_, "m"))));
}

/// Runs `scripts/build-kernel.sh` with a cache of its own, a stand-in source tarball (the
/// fast paths only look at its size and mtime) and `fragment`.
fn build_kernel(cache: &Path, fragment: &Path, args: &[&str]) -> (Output, Duration) {
    let tarball = cache.join("linux-source-stand-in.tar.xz");
    if !tarball.exists() {
        std::fs::write(&tarball, b"not really a kernel tree").expect("write the stand-in tarball");
    }
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo().join("scripts/build-kernel.sh"))
        .args(args)
        .env("UVMCTL_CACHE", cache)
        .env("UVM_KERNEL_CONFIG", fragment)
        .env("UVM_KERNEL_SOURCE", &tarball)
        .output()
        .expect("run scripts/build-kernel.sh");
    (out, started.elapsed())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn key_is_stable_and_follows_the_fragment() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = build_kernel(dir.path(), &fragment_path(), &["--print-key"]);
    let (b, _) = build_kernel(dir.path(), &fragment_path(), &["--print-key"]);
    assert!(a.status.success(), "{a:?}");
    let key = stdout(&a).trim().to_owned();
    assert_eq!(key.len(), 64, "{key:?}");
    assert!(key.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(stdout(&b).trim(), key);

    let changed = dir.path().join("changed.config");
    std::fs::write(&changed, format!("{}CONFIG_IPV6=y\n", fragment())).unwrap();
    let (c, _) = build_kernel(dir.path(), &changed, &["--print-key"]);
    assert_ne!(stdout(&c).trim(), key);
}

#[test]
fn key_follows_the_kernel_patches() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = build_kernel(dir.path(), &fragment_path(), &["--print-key"]);
    let key = stdout(&a).trim().to_owned();

    // The same patches from another directory: the same key.
    let patches = dir.path().join("patches");
    std::fs::create_dir(&patches).unwrap();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("kernel/patches")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "patch") {
            std::fs::copy(&path, patches.join(path.file_name().unwrap())).unwrap();
            names.push(path.file_name().unwrap().to_owned());
        }
    }
    assert!(!names.is_empty(), "kernel/patches holds no .patch file");
    let with = |dir: &Path| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/build-kernel.sh"))
            .arg("--print-key")
            .env("UVMCTL_CACHE", dir)
            .env("UVM_KERNEL_CONFIG", fragment_path())
            .env(
                "UVM_KERNEL_SOURCE",
                dir.join("linux-source-stand-in.tar.xz"),
            )
            .env("UVM_KERNEL_PATCHES", &patches)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        stdout(&out).trim().to_owned()
    };
    assert_eq!(with(dir.path()), key);

    // One byte more in a patch, or one patch less: another key.
    let first = patches.join(&names[0]);
    let mut text = std::fs::read(&first).unwrap();
    text.push(b'\n');
    std::fs::write(&first, &text).unwrap();
    let edited = with(dir.path());
    assert_ne!(edited, key);
    std::fs::remove_file(&first).unwrap();
    let fewer = with(dir.path());
    assert_ne!(fewer, key);
    assert_ne!(fewer, edited);
}

#[test]
fn a_patch_that_does_not_apply_fails_the_build_and_leaves_no_tree_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // A stand-in source tree: what the script checks for, and the file the patch edits.
    let tree = dir.path().join("linux-stand-in");
    std::fs::create_dir_all(tree.join("arch/x86")).unwrap();
    std::fs::write(tree.join("Makefile"), "all:\n").unwrap();
    std::fs::write(tree.join("file.c"), "int a;\n").unwrap();
    let tarball = dir.path().join("linux-stand-in.tar.xz");
    let tar = Command::new("tar")
        .arg("-cJf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.path())
        .arg("linux-stand-in")
        .status()
        .unwrap();
    assert!(tar.success());
    let patches = dir.path().join("patches");
    std::fs::create_dir(&patches).unwrap();
    std::fs::write(
        patches.join("0001-bad.patch"),
        "--- a/file.c\n+++ b/file.c\n@@ -1 +1 @@\n-int b;\n+int c;\n",
    )
    .unwrap();

    let out = Command::new("bash")
        .arg(repo().join("scripts/build-kernel.sh"))
        .env("UVMCTL_CACHE", &cache)
        .env("UVM_KERNEL_CONFIG", fragment_path())
        .env("UVM_KERNEL_SOURCE", &tarball)
        .env("UVM_KERNEL_PATCHES", &patches)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0001-bad.patch does not apply"), "{stderr}");
    // Neither a temporary tree nor a half-patched source tree, nor a `current` link.
    let left: Vec<String> = std::fs::read_dir(cache.join("kernel/ours"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn the_build_is_skipped_when_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    let (out, _) = build_kernel(cache, &fragment_path(), &["--print-key"]);
    let key = stdout(&out).trim().to_owned();
    let (out, _) = build_kernel(cache, &fragment_path(), &["--check"]);
    assert_eq!(out.status.code(), Some(1), "nothing built yet: {out:?}");

    // As if the build had run: the key's vmlinux is in place.
    let ours = cache.join("kernel/ours");
    std::fs::create_dir_all(ours.join(&key)).unwrap();
    std::fs::write(ours.join(&key).join("vmlinux"), b"\x7fELF").unwrap();
    let (out, _) = build_kernel(cache, &fragment_path(), &["--check"]);
    assert!(out.status.success(), "{out:?}");
    for _ in 0..2 {
        let (out, took) = build_kernel(cache, &fragment_path(), &[]);
        assert!(out.status.success(), "{out:?}");
        assert!(stdout(&out).contains("up to date"), "{}", stdout(&out));
        // A real build takes minutes; the up-to-date path a fraction of a second (the bound is
        // loose for a loaded machine).
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    // `current` names the key's directory, which is where uvm-image looks.
    assert_eq!(
        std::fs::read_link(ours.join("current")).unwrap(),
        Path::new(&key)
    );
    assert!(uvm_image::our_vmlinux(cache).is_file());
    // Nothing was unpacked or configured.
    let entries: Vec<String> = std::fs::read_dir(&ours)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != &key && n != "current")
        .collect();
    assert!(entries.is_empty(), "{entries:?}");
}

/// Needs the set-up (scripts/build-kernel.sh), like the tests that boot VMs: hence the name, which
/// puts it in their group and out of `make check`.
#[test]
fn real_vm_kernel_built_by_the_setup_kept_every_option_of_the_fragment() {
    // The script checks this itself after olddefconfig; this re-checks what it left in the cache.
    let spec_cache = uvm_image::cache_dir_from_env().expect("the image cache directory");
    let config = spec_cache.join("kernel/ours/current/config");
    let built = std::fs::read_to_string(&config).unwrap_or_else(|e| {
        panic!(
            "real-VM test prerequisite missing: our kernel's config at {} ({e})\n\
             run `make setup` (scripts/build-kernel.sh) first",
            config.display()
        )
    });
    let built: HashSet<&str> = built.lines().collect();
    let text = fragment();
    let lost: Vec<&str> = text
        .lines()
        .filter(|l| matches!(parse_line(l), Line::Set(..) | Line::Unset(_)))
        .filter(|l| !built.contains(l.trim_end()))
        .collect();
    // A fragment edited since the last build is not an error here: the next build picks it up.
    if lost.is_empty() {
        return;
    }
    let current = std::fs::read_link(spec_cache.join("kernel/ours/current")).unwrap();
    let out = Command::new("bash")
        .arg(repo().join("scripts/build-kernel.sh"))
        .arg("--print-key")
        .env("UVMCTL_CACHE", &spec_cache)
        .env_remove("UVM_KERNEL_CONFIG")
        .env_remove("UVM_KERNEL_SOURCE")
        .output()
        .unwrap();
    if Path::new(stdout(&out).trim()) == current {
        panic!("the built kernel lacks {lost:?}");
    }
}
