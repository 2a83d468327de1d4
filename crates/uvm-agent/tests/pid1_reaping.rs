//! The PID-1 reaper (`waitpid(-1)`), in a test binary of its own so that it steals no other
//! test's children: as a child subreaper this process inherits its descendants' orphans, as
//! init does in the guest.

use std::time::{Duration, Instant};

use uvm_agent::process::{ExecSpec, Exit, Limits, Processes, ReapMode};

fn sh(script: &str) -> ExecSpec {
    ExecSpec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecSpec::default()
    }
}

/// Whether `pid` still exists and is not a zombie-in-waiting.
fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    uvm_agent::stacks::parse_task_state(&stat)
}

#[tokio::test]
async fn orphans_are_reaped_and_tracked_exits_still_arrive() {
    nix::sys::prctl::set_child_subreaper(true).expect("become a subreaper");
    let procs = Processes::new(ReapMode::AllChildren, Limits::default());
    let _reaper = procs.spawn_reaper().expect("reaper");

    // Processes that exit before they are even registered are still waited for.
    for _ in 0..50 {
        let proc = procs.start(&sh("exit 7")).expect("start");
        assert_eq!(
            procs.wait(&proc.exec_id).await.expect("wait"),
            Exit { code: 7, signal: 0 }
        );
    }

    // `sh` exits at once, leaving its background `sleep` to us.
    let proc = procs
        .start(&sh("sleep 0.3 >/dev/null 2>&1 & echo $!"))
        .expect("start");
    let mut out = Vec::new();
    loop {
        let (data, eof) = proc.stdout.read(1024).await;
        out.extend(data);
        if eof {
            break;
        }
    }
    let orphan: u32 = String::from_utf8(out)
        .expect("utf-8")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(
        procs.wait(&proc.exec_id).await.expect("wait"),
        Exit { code: 0, signal: 0 }
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match state_of(orphan) {
            None => break,
            Some(state) => assert!(
                Instant::now() < deadline,
                "orphan {orphan} not reaped (state {state})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
