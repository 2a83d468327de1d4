//! `uvmctl cpu-group`: CPU groups on this host's real cgroups (root, as CI runs), no VM.

use std::process::{Command, Output};

fn uvmctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uvmctl"))
        .args(args)
        .output()
        .expect("run uvmctl")
}

fn ok(args: &[&str]) -> String {
    let out = uvmctl(args);
    assert!(
        out.status.success(),
        "uvmctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the group however the test ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = uvmctl(&["cpu-group", "rm", &self.0]);
    }
}

#[test]
fn real_host_cpu_groups_are_made_listed_changed_and_removed_and_bad_ones_refused() {
    let name = format!("cli-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    assert_eq!(
        ok(&["cpu-group", "create", &name, "--cap", "150"]),
        format!("{name}\n")
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["cpu-group", "ls", "--json"])).expect("JSON");
    let mine = listed
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("{name} not listed: {listed}"))
        .clone();
    assert_eq!(mine["cap_percent"], 150);
    assert_eq!(mine["vms"], serde_json::json!([]));
    ok(&["cpu-group", "update", &name, "--cap", "50", "--cpus", "0"]);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["cpu-group", "ls", "--json"])).expect("JSON");
    let mine = listed
        .as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == name.as_str()))
        .expect("listed")
        .clone();
    assert_eq!(
        (mine["cap_percent"].as_u64(), mine["cpus"].as_str()),
        (Some(50), Some("0"))
    );
    assert!(ok(&["cpu-group", "ls"]).contains(&name));

    // Refused, each with what is wrong: the same name again, nothing to update, CPUs the host
    // does not have, a cap of 0, a name that climbs.
    for (args, says) in [
        (vec!["cpu-group", "create", &name], "exists"),
        (vec!["cpu-group", "update", &name], "nothing to update"),
        (
            vec!["cpu-group", "update", &name, "--cpus", "999"],
            "not valid",
        ),
        (vec!["cpu-group", "create", "x", "--cap", "0"], "0"),
        (vec!["cpu-group", "create", "../up"], "plain"),
    ] {
        let out = uvmctl(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    ok(&["cpu-group", "rm", &name]);
    let out = uvmctl(&["cpu-group", "rm", &name]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cpu group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
