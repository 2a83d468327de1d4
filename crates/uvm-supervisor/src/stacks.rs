//! Host threads of a process, from `/proc`, for DumpStacks: one line per thread with its id,
//! name, state and the kernel function it waits in (`wchan`) — what `ps -L` would show.

use std::fmt::Write as _;

/// The threads of process `pid`, one per line; empty if the process is gone.
pub(crate) fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut tids: Vec<u32> = tasks
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    tids.sort_unstable();
    let mut out = String::new();
    for tid in tids {
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{file}")).unwrap_or_default()
        };
        let comm = read("comm");
        let stat = read("stat");
        // Field 3, after the parenthesised name.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        let wchan = read("wchan");
        let _ = writeln!(
            out,
            "{tid:>8} {:<16} {state} {}",
            comm.trim(),
            if wchan.is_empty() { "-" } else { wchan.trim() }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn our_own_threads_are_listed_and_a_missing_process_is_empty() {
        let me = super::threads_of(std::process::id());
        assert!(me.lines().count() >= 1, "{me}");
        assert_eq!(super::threads_of(u32::MAX), "");
    }
}
