//! What the security policy costs the agent per request: building the input document and
//! evaluating the rule (`policy::Guard::check`), under `examples/policies/sandbox.rego` —
//! allowed, denied, with fragments loaded — against no policy at all (the baseline: a lock and
//! a branch). Run: `cargo bench -p uvm-agent --bench policy`.

use criterion::{criterion_group, criterion_main, Criterion};
use uvm_agent::policy::{exec_input, mount_share_input, Guard};
use uvm_agent::process::ExecSpec;
use uvm_agent_proto::agent::ShareTransport;
use uvm_policy::Rule;

const SANDBOX: &str = include_str!("../../../examples/policies/sandbox.rego");

fn spec(args: &[&str]) -> ExecSpec {
    ExecSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: vec!["HOME=/root".into(), "TERM=xterm".into()],
        ..ExecSpec::default()
    }
}

fn policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    let echo = spec(&["echo", "hello", "world"]);
    let sh = spec(&["sh", "-c", "id"]);

    let none = Guard::default();
    group.bench_function("exec/no-policy", |b| {
        b.iter(|| none.check(Rule::Exec, || exec_input(&echo)))
    });

    let sandbox = Guard::default();
    sandbox.set(SANDBOX).expect("sandbox.rego compiles");
    group.bench_function("exec/sandbox/allowed", |b| {
        b.iter(|| {
            sandbox
                .check(Rule::Exec, || exec_input(&echo))
                .expect("echo is allowed")
        })
    });
    group.bench_function("exec/sandbox/denied", |b| {
        b.iter(|| {
            sandbox
                .check(Rule::Exec, || exec_input(&sh))
                .expect_err("sh is denied")
        })
    });
    group.bench_function("mount_share/sandbox/allowed", |b| {
        b.iter(|| {
            sandbox
                .check(Rule::MountShare, || {
                    mount_share_input("t0", Ok(ShareTransport::VIRTIO_FS), "/mnt/data", true)
                })
                .expect("a read-only share is allowed")
        })
    });

    // The base denies `ls`; the fourth of four fragments allows it: every module is asked.
    let fragments = Guard::default();
    fragments
        .set(&format!(
            "{SANDBOX}\nload_fragment if startswith(input.package, \"fragment.\")\n"
        ))
        .expect("sandbox.rego and load_fragment compile");
    for (i, program) in ["vi", "top", "ps", "ls"].iter().enumerate() {
        fragments
            .add_fragment(&format!(
                "package fragment.f{i}\nexec if input.program == \"{program}\"\n"
            ))
            .expect("fragment");
    }
    let ls = spec(&["ls", "/"]);
    group.bench_function("exec/sandbox+4-fragments/allowed-by-the-last", |b| {
        b.iter(|| {
            fragments
                .check(Rule::Exec, || exec_input(&ls))
                .expect("ls is allowed by a fragment")
        })
    });
    group.finish();

    c.bench_function("policy/compile/sandbox", |b| {
        b.iter(|| uvm_policy::Policy::compile(SANDBOX).expect("compiles"))
    });
}

criterion_group!(benches, policy);
criterion_main!(benches);
