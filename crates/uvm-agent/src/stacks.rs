//! `DumpStacks`: what the agent is doing — version and uptime, the tracked processes, and every
//! agent thread with its scheduler state, wait channel and kernel stack from `/proc/self/task`.

use std::fmt::Write as _;
use std::path::Path;

use uvm_agent_proto::PROTOCOL_VERSION;

use crate::clock;
use crate::process::ProcInfo;

/// Bound on the text (well below a ttrpc message).
pub const MAX_DUMP_BYTES: usize = 1 << 20;

/// The scheduler state letter of a `/proc/<pid>/task/<tid>/stat` text (the field after the
/// parenthesised command name, which may itself contain spaces and parentheses).
pub fn parse_task_state(stat: &str) -> Option<char> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

/// One thread's section of the dump, read from `task_dir` (`/proc/self/task/<tid>`).
fn describe_thread(task_dir: &Path, out: &mut String) {
    let tid = task_dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    let read = |name: &str| std::fs::read_to_string(task_dir.join(name)).ok();
    let comm = read("comm").unwrap_or_default();
    let state = read("stat")
        .as_deref()
        .and_then(parse_task_state)
        .unwrap_or('?');
    let wchan = read("wchan").unwrap_or_default();
    let wchan = if wchan.is_empty() || wchan == "0" {
        "-"
    } else {
        wchan.trim()
    };
    let _ = writeln!(
        out,
        "  thread {tid} {:?} state={state} wchan={wchan}",
        comm.trim()
    );
    match read("stack") {
        Some(stack) if !stack.trim().is_empty() => {
            for line in stack.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
        Some(_) => {}
        None => out.push_str("      (kernel stack not readable)\n"),
    }
}

/// The whole dump.
pub fn dump(processes: &[ProcInfo]) -> String {
    let mut out = String::new();
    let uptime = clock::boottime();
    let _ = writeln!(
        out,
        "uvm-agent {} (protocol v{PROTOCOL_VERSION}) pid {} — guest up {}.{:03}s",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        uptime.as_secs(),
        uptime.subsec_millis()
    );
    let _ = writeln!(out, "processes ({}):", processes.len());
    for p in processes {
        let _ = writeln!(
            out,
            "  {} pid={} {} args={:?}",
            p.exec_id, p.pid, p.state, p.args
        );
    }
    let mut tasks: Vec<_> = std::fs::read_dir("/proc/self/task")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    tasks.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    let _ = writeln!(out, "threads ({}):", tasks.len());
    for task in &tasks {
        describe_thread(task, &mut out);
        if out.len() > MAX_DUMP_BYTES {
            break;
        }
    }
    if out.len() > MAX_DUMP_BYTES {
        let cut = (0..=MAX_DUMP_BYTES)
            .rev()
            .find(|&i| out.is_char_boundary(i))
            .unwrap_or(0);
        out.truncate(cut);
        out.push_str("\n(truncated)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_found_after_a_tricky_comm() {
        assert_eq!(parse_task_state("1 (uvm-agent) S 0 1 1 0"), Some('S'));
        assert_eq!(parse_task_state("7 (a) (b) ) R 1 2"), Some('R'));
        assert_eq!(parse_task_state("garbage"), None);
    }

    #[test]
    fn dump_names_processes_and_threads() {
        let text = dump(&[ProcInfo {
            exec_id: "e1".into(),
            pid: 99,
            args: vec!["sleep".into(), "1".into()],
            state: "running".into(),
        }]);
        assert!(text.starts_with("uvm-agent "), "{text}");
        assert!(text.contains("e1 pid=99 running"), "{text}");
        assert!(text.contains("threads ("), "{text}");
        assert!(text.contains("  thread "), "{text}");
    }
}
