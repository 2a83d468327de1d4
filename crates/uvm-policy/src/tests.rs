use serde_json::json;

use super::*;

const SANDBOX: &str = include_str!("../../../examples/policies/sandbox.rego");
const ALLOW_ALL: &str = include_str!("../../../examples/policies/allow-all.rego");

fn sandbox() -> Policy {
    Policy::compile(SANDBOX).expect("sandbox.rego compiles")
}

/// sandbox.rego as a policy that accepts fragments under `fragment.` (it accepts none itself).
fn sandbox_with_fragments() -> Policy {
    Policy::compile(&format!(
        "{SANDBOX}\nload_fragment if startswith(input.package, \"fragment.\")\n"
    ))
    .expect("compiles")
}

fn exec(program: &str, path: &str) -> serde_json::Value {
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    json!({
        "args": [program, "hello"], "program": program, "path": path, "dir": dir,
        "env": ["HOME=/root"], "cwd": "/", "terminal": false, "stdin": false,
    })
}

fn share(guest_path: &str, read_only: bool) -> serde_json::Value {
    json!({"tag": "s0", "transport": "virtiofs", "guest_path": guest_path, "read_only": read_only})
}

#[test]
fn sandbox_allows_echo_cat_and_true_with_any_arguments_and_nothing_else() {
    let mut p = sandbox();
    for program in ["echo", "cat", "true"] {
        assert_eq!(
            p.decide(Rule::Exec, &exec(program, &format!("/bin/{program}"))),
            Ok(())
        );
    }
    for program in ["sh", "ls", "busybox", "cat2"] {
        let denied = p
            .decide(Rule::Exec, &exec(program, &format!("/bin/{program}")))
            .expect_err(program);
        assert_eq!(denied.rule, Rule::Exec);
        assert_eq!(
            denied.to_string(),
            "denied by policy rule uvmctl.policy.exec: no rule allows it"
        );
    }
}

#[test]
fn sandbox_refuses_an_allowed_name_outside_the_system_directories() {
    let mut p = sandbox();
    assert!(p
        .decide(Rule::Exec, &exec("echo", "/mnt/share/echo"))
        .is_err());
    assert!(p.decide(Rule::Exec, &exec("echo", "/tmp/echo")).is_err());
    assert_eq!(p.decide(Rule::Exec, &exec("echo", "/usr/bin/echo")), Ok(()));
}

#[test]
fn sandbox_mounts_shares_only_read_only_and_away_from_system_directories() {
    let mut p = sandbox();
    assert_eq!(
        p.decide(Rule::MountShare, &share("/mnt/data", true)),
        Ok(())
    );
    assert_eq!(
        p.decide(Rule::MountShare, &share("/binaries", true)),
        Ok(())
    );
    for (path, ro) in [
        ("/mnt/data", false),
        ("/bin", true),
        ("/usr/lib/x", true),
        ("/", true),
        ("/etc", true),
    ] {
        let denied = p
            .decide(Rule::MountShare, &share(path, ro))
            .expect_err(path);
        assert_eq!(denied.rule, Rule::MountShare);
    }
    assert_eq!(
        p.decide(Rule::UnmountShare, &json!({"guest_path": "/mnt/data"})),
        Ok(())
    );
}

#[test]
fn sandbox_refuses_every_other_rule_class_naming_the_rule() {
    let mut p = sandbox();
    let cases = [
        (
            Rule::WriteFile,
            json!({"path": "/tmp/x", "mode": 420, "size": 3}),
        ),
        (
            Rule::ReadFile,
            json!({"path": "/etc/hostname", "max_size": 4096}),
        ),
        (
            Rule::MountDisk,
            json!({"guest_path": "/mnt/d", "read_only": true, "fs_type": "", "options": [],
                   "partition": 0, "location": {"scsi": {"controller": 0, "lun": 1}}}),
        ),
        (Rule::UnmountDisk, json!({"guest_path": "/mnt/d"})),
        (
            Rule::Signal,
            json!({"exec_id": "e1", "signal": 2, "args": ["cat"], "program": "cat"}),
        ),
        (Rule::DumpStacks, json!({})),
    ];
    for (rule, input) in cases {
        let denied = p.decide(rule, &input).expect_err(rule.name());
        assert_eq!(denied.rule, rule);
        assert!(denied.to_string().contains(rule.name()), "{denied}");
    }
}

#[test]
fn sandbox_lets_the_host_end_what_it_started_and_no_other_signal() {
    let mut p = sandbox();
    let signal = |n: i32| json!({"exec_id": "e1", "signal": n, "args": ["cat"], "program": "cat"});
    assert_eq!(p.decide(Rule::Signal, &signal(9)), Ok(()));
    assert_eq!(p.decide(Rule::Signal, &signal(15)), Ok(()));
    for n in [1, 2, 10, 19] {
        assert!(p.decide(Rule::Signal, &signal(n)).is_err(), "signal {n}");
    }
}

#[test]
fn allow_all_allows_every_rule_class() {
    let mut p = Policy::compile(ALLOW_ALL).expect("allow-all compiles");
    for rule in Rule::ALL {
        assert_eq!(p.decide(rule, &json!({})), Ok(()), "{rule}");
    }
}

#[test]
fn a_policy_that_does_not_parse_is_refused_with_the_compilers_line() {
    let err = Policy::compile("package uvmctl.policy\nexec if {\n").expect_err("no compile");
    let PolicyError::Compile { what, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*what, "the policy");
    assert!(message.contains("policy.rego:"), "{message}");
    // Rego v1: a rule body needs `if`.
    assert!(Policy::compile("package uvmctl.policy\nexec { true }").is_err());
}

#[test]
fn a_base_policy_in_another_package_is_refused() {
    assert_eq!(
        Policy::compile("package mine\nexec := true").map(|_| ()),
        Err(PolicyError::BasePackage {
            found: "mine".into()
        })
    );
}

#[test]
fn conflicting_rule_values_fail_to_compile() {
    let text = "package uvmctl.policy\nexec := true\nexec := false";
    assert!(matches!(
        Policy::compile(text),
        Err(PolicyError::Compile { .. })
    ));
}

#[test]
fn a_rule_that_is_not_exactly_true_or_fails_to_evaluate_denies() {
    let mut p = Policy::compile(
        "package uvmctl.policy\nexec := \"yes\"\nread_file if { x := 1 / input.size; x > 0 }",
    )
    .expect("compiles");
    assert!(p.decide(Rule::Exec, &json!({})).is_err());
    let denied = p
        .decide(Rule::ReadFile, &json!({"size": 0}))
        .expect_err("divide by zero");
    assert!(denied.reason.contains("divide by zero"), "{denied}");
    assert_eq!(p.decide(Rule::ReadFile, &json!({"size": 2})), Ok(()));
}

#[test]
fn a_fragment_adds_a_command_and_never_takes_one_away() {
    let mut p = sandbox_with_fragments();
    assert!(p.decide(Rule::Exec, &exec("ls", "/bin/ls")).is_err());
    let fragment = "package fragment.tools\nexec if input.program == \"ls\"\n";
    assert_eq!(p.add_fragment(fragment), Ok(FragmentLoad::Added));
    assert_eq!(p.decide(Rule::Exec, &exec("ls", "/bin/ls")), Ok(()));
    // A fragment that says no to everything changes nothing the base allows.
    let nay = "package fragment.nay\nexec := false\nmount_share := false\n";
    assert_eq!(p.add_fragment(nay), Ok(FragmentLoad::Added));
    assert_eq!(p.decide(Rule::Exec, &exec("echo", "/bin/echo")), Ok(()));
    assert_eq!(
        p.decide(Rule::MountShare, &share("/mnt/data", true)),
        Ok(())
    );
    assert!(p.decide(Rule::Exec, &exec("sh", "/bin/sh")).is_err());
    assert_eq!(
        p.fragments().collect::<Vec<_>>(),
        ["fragment.tools", "fragment.nay"]
    );
}

#[test]
fn a_fragment_that_does_not_compile_is_refused_and_changes_nothing() {
    let mut p = sandbox_with_fragments();
    p.add_fragment("package fragment.a\nexec if input.program == \"ls\"")
        .expect("first fragment");
    let err = p
        .add_fragment("package fragment.b\nexec if {")
        .expect_err("does not compile");
    assert!(
        matches!(
            err,
            PolicyError::Compile {
                what: "the fragment",
                ..
            }
        ),
        "{err:?}"
    );
    let conflict = p
        .add_fragment("package fragment.c\nexec := true\nexec := false")
        .expect_err("conflict");
    assert!(
        matches!(conflict, PolicyError::Compile { .. }),
        "{conflict:?}"
    );
    assert_eq!(p.fragments().collect::<Vec<_>>(), ["fragment.a"]);
    assert_eq!(p.decide(Rule::Exec, &exec("ls", "/bin/ls")), Ok(()));
    assert!(p.decide(Rule::Exec, &exec("sh", "/bin/sh")).is_err());
}

#[test]
fn a_fragment_in_or_around_the_base_package_is_refused() {
    let mut p = Policy::compile(ALLOW_ALL).expect("allow-all");
    for package in ["uvmctl.policy", "uvmctl.policy.more", "uvmctl"] {
        let text = format!("package {package}\nx := 1");
        assert_eq!(
            p.add_fragment(&text),
            Err(PolicyError::FragmentPackage {
                package: package.into()
            })
        );
    }
    assert_eq!(
        p.add_fragment("package uvmctl_extra\nexec := true"),
        Ok(FragmentLoad::Added)
    );
}

#[test]
fn the_base_policy_decides_which_fragments_load() {
    // sandbox.rego takes none: whoever holds the API cannot lift it.
    let mut p = sandbox();
    assert_eq!(
        p.add_fragment("package fragment.x\nexec := true"),
        Err(PolicyError::FragmentRefused {
            package: "fragment.x".into(),
            reason: None
        })
    );
    let mut p = sandbox_with_fragments();
    assert_eq!(
        p.add_fragment("package other\nexec := true"),
        Err(PolicyError::FragmentRefused {
            package: "other".into(),
            reason: None
        })
    );
    // A policy can name the very fragments it takes, by digest.
    let ls = "package fragment.ls\nexec if input.program == \"ls\"\n";
    let mut pinned = Policy::compile(&format!(
        "package uvmctl.policy\nload_fragment if input.sha256 == \"{}\"\n",
        sha256_hex(ls)
    ))
    .expect("compiles");
    assert_eq!(pinned.add_fragment(ls), Ok(FragmentLoad::Added));
    assert!(matches!(
        pinned.add_fragment("package fragment.ls2\nexec := true"),
        Err(PolicyError::FragmentRefused { .. })
    ));
    let mut strict = Policy::compile("package uvmctl.policy\nexec := true").expect("compiles");
    assert!(matches!(
        strict.add_fragment("package fragment.x\nread_file := true"),
        Err(PolicyError::FragmentRefused { .. })
    ));
    assert_eq!(strict.fragments().count(), 0);
}

#[test]
fn the_same_fragment_again_is_a_no_op_and_a_different_one_for_its_package_is_refused() {
    let mut p = sandbox_with_fragments();
    let text = "package fragment.tools\nexec if input.program == \"ls\"";
    assert_eq!(p.add_fragment(text), Ok(FragmentLoad::Added));
    assert_eq!(p.add_fragment(text), Ok(FragmentLoad::AlreadyLoaded));
    assert_eq!(
        p.add_fragment("package fragment.tools\nexec := true"),
        Err(PolicyError::FragmentExists {
            package: "fragment.tools".into()
        })
    );
    assert!(p.decide(Rule::Exec, &exec("sh", "/bin/sh")).is_err());
}

#[test]
fn a_package_is_checked_as_the_evaluator_reads_it() {
    let mut p = Policy::compile(ALLOW_ALL).expect("allow-all");
    // An escape that spells the base's package is the base's package.
    assert_eq!(
        p.add_fragment("package uvmctl[\"p\\u006flicy\"]\nexec := true"),
        Err(PolicyError::FragmentPackage {
            package: "uvmctl.policy".into()
        })
    );
    // One that spells a package already loaded is that package.
    p.add_fragment("package fragment.tools\nexec := true")
        .expect("loads");
    assert_eq!(
        p.add_fragment("package fragment[\"t\\u006fols\"]\nread_file := true"),
        Err(PolicyError::FragmentExists {
            package: "fragment.tools".into()
        })
    );
    // A part that is no identifier is refused.
    assert!(matches!(
        p.add_fragment("package fragment[\"a.b\"]\nexec := true"),
        Err(PolicyError::Compile { .. })
    ));
    assert_eq!(p.fragments().collect::<Vec<_>>(), ["fragment.tools"]);
}

#[test]
fn a_fragment_is_not_asked_about_loading_fragments() {
    let mut p = Policy::compile(ALLOW_ALL).expect("allow-all");
    p.add_fragment("package fragment.no\nload_fragment := false")
        .expect("loads");
    // decide() asks the base alone for this rule.
    assert_eq!(
        p.decide(Rule::LoadFragment, &json!({"package": "x"})),
        Ok(())
    );
    let mut strict = Policy::compile(
        "package uvmctl.policy\nload_fragment if input.package == \"fragment.yes\"",
    )
    .expect("compiles");
    strict
        .add_fragment("package fragment.yes\nload_fragment := true")
        .expect("loads");
    assert!(strict
        .decide(Rule::LoadFragment, &json!({"package": "other"}))
        .is_err());
}

#[test]
fn a_fragment_cannot_answer_for_load_fragment() {
    let mut p = sandbox_with_fragments();
    p.add_fragment("package fragment.open\nload_fragment := true")
        .expect("loads");
    assert!(matches!(
        p.add_fragment("package elsewhere\nexec := true"),
        Err(PolicyError::FragmentRefused { .. })
    ));
}

#[test]
fn a_policys_digest_is_the_sha256_of_its_text() {
    assert_eq!(
        sha256_hex("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
