//! The security policy through the CLI binary: `create --policy`, `exec` under it (a denial
//! exits 126), `policy add-fragment`, and what `inspect` shows. Each command a separate
//! `uvmctl` invocation against its own temporary `--root`; the tests that boot VMs are named
//! `real_vm_*` and end with `common::Root::assert_clean`.

use std::path::{Path, PathBuf};

mod common;

use common::{require_prerequisites, stderr, Root};

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the file");
    path.to_string_lossy().into_owned()
}

#[test]
fn create_with_a_policy_that_does_not_compile_fails_before_anything_starts() {
    let root = Root::new();
    let dir = tempfile::tempdir().expect("scratch");
    let bad = write(dir.path(), "bad.rego", "package uvmctl.policy\nexec if {\n");
    let out = root.run(&["create", "--policy", &bad]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("does not compile"), "{err}");
    assert!(err.contains("bad.rego"), "{err}");
    let elsewhere = write(dir.path(), "other.rego", "package mine\nexec := true\n");
    let err = stderr(&root.run(&["create", "--policy", &elsewhere]));
    assert!(err.contains("package uvmctl.policy"), "{err}");
    let err = stderr(&root.run(&["create", "--policy", "/nonexistent/policy.rego"]));
    assert!(err.contains("reading the policy"), "{err}");
    root.assert_clean();
}

#[test]
fn real_vm_exec_denied_by_the_policy_exits_126_and_only_a_named_fragment_adds_a_command() {
    require_prerequisites();
    let root = Root::new();
    let dir = tempfile::tempdir().expect("scratch");
    // sandbox.rego, taking exactly one fragment: the one whose digest it names.
    let ls_text =
        "package fragment.ls\nexec if {\n\tinput.program == \"ls\"\n\tinput.dir == \"/bin\"\n}\n";
    let ls = write(dir.path(), "ls.rego", ls_text);
    let sandbox_text = std::fs::read_to_string(policies().join("sandbox.rego")).expect("sandbox");
    let text = format!(
        "{sandbox_text}\nload_fragment if input.sha256 == \"{}\"\n",
        uvm_policy::sha256_hex(ls_text)
    );
    let policy = write(dir.path(), "policy.rego", &text);
    root.ok(&["create", "--name", "pol", "--policy", &policy, "--start"]);

    assert_eq!(root.ok(&["exec", "pol", "--", "echo", "hi"]), "hi\n");
    let out = root.run(&["exec", "pol", "--", "sh", "-c", "echo escaped"]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("denied by policy rule uvmctl.policy.exec"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());

    let other = write(dir.path(), "sh.rego", "package fragment.sh\nexec := true\n");
    let out = root.run(&["policy", "add-fragment", "pol", &other]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("load_fragment"), "{}", stderr(&out));
    root.ok(&["policy", "add-fragment", "pol", &ls]);
    assert!(root
        .ok(&["exec", "pol", "--", "ls", "/"])
        .contains("proc\n"));
    let bad = write(dir.path(), "bad.rego", "package fragment.bad\nexec if {\n");
    let out = root.run(&["policy", "add-fragment", "pol", &bad]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not compile"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        root.run(&["exec", "pol", "--", "sh", "-c", "true"])
            .status
            .code(),
        Some(126)
    );

    let inspect = root.inspect("pol");
    assert_eq!(inspect["policy"]["enforced"], true);
    assert_eq!(
        inspect["policy"]["sha256"].as_str(),
        Some(uvm_policy::sha256_hex(&text).as_str())
    );
    assert_eq!(inspect["policy"]["fragments"], 1);
    assert_eq!(inspect["config"]["policy"].as_str(), Some(policy.as_str()));
    assert_eq!(inspect["resources"]["memory_mib"], 256);
    assert_eq!(inspect["resources"]["cpus"], 1);
    root.ok(&["rm", "-f", "pol"]);
    root.assert_clean();
}

#[test]
fn real_vm_a_fragment_for_a_vm_without_a_policy_is_refused_and_the_vm_runs_on() {
    require_prerequisites();
    let root = Root::new();
    root.ok(&["create", "--name", "open", "--start"]);
    let dir = tempfile::tempdir().expect("scratch");
    let ls = write(
        dir.path(),
        "ls.rego",
        "package fragment.ls\nexec if input.program == \"ls\"\n",
    );
    let out = root.run(&["policy", "add-fragment", "open", &ls]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("without a security policy"),
        "{}",
        stderr(&out)
    );
    // Without a policy everything is allowed, and inspect says there is none.
    assert_eq!(
        root.ok(&["exec", "open", "--", "sh", "-c", "echo ok"]),
        "ok\n"
    );
    let inspect = root.inspect("open");
    assert_eq!(inspect["policy"]["enforced"], false);
    assert_eq!(inspect["state"], "Running");
    root.ok(&["rm", "-f", "open"]);
    root.assert_clean();
}
