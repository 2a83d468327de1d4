//! Host processes: spawning children that cannot outlive us, quoting their logs, and finding
//! the processes that still mention a path (a leak check, and the stale-directory sweep).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::process::Signal;

/// Bytes of a child's log quoted by [`log_tail`].
const LOG_TAIL: u64 = 2048;

/// A command for a child that must not outlive this process: its own process group (a
/// terminal's Ctrl-C reaches the controller, which decides), SIGKILL as its parent-death signal
/// (checked against a parent that died before the prctl), stdin from /dev/null, stdout and
/// stderr into `log_path`. Note: the parent-death signal fires when the *spawning thread* exits.
pub fn tethered_command(
    program: &Path,
    args: &[String],
    log_path: &Path,
) -> std::io::Result<Command> {
    let log = File::create(log_path)?;
    let log_err = log.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes two raw syscalls (prctl, getppid) through rustix, allocates
    // nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The parent may have died before the prctl: then nobody will ever kill us.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other("the parent exited during spawn"));
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The end of a child's log (its last 2 KiB), for error messages.
pub fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    };
    match read() {
        Ok(s) if s.is_empty() => "(nothing)".to_owned(),
        Ok(s) => s,
        Err(e) => format!("(log unreadable: {e})"),
    }
}

/// Processes (other than this one) whose command line mentions `dir`.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| contains(&cmdline, needle))
        })
        .collect();
    pids.sort_unstable();
    pids
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_nobody_mentions_has_no_processes() {
        assert!(processes_mentioning(Path::new("/nonexistent/uvm-none-XYZ")).is_empty());
        assert!(!contains(b"abc", b""));
        assert!(contains(
            b"--vm\0guest-cid=3,socket=/tmp/uvm-a/vhost.sock",
            b"/tmp/uvm-a"
        ));
    }

    #[test]
    fn a_tethered_child_writes_its_log_and_the_tail_quotes_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("child.log");
        let args = ["-c".to_owned(), "echo out; echo err >&2".to_owned()];
        let status = tethered_command(Path::new("/bin/sh"), &args, &log)
            .unwrap()
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(log_tail(&log), "out\nerr");
        std::fs::write(&log, "").unwrap();
        assert_eq!(log_tail(&log), "(nothing)");
        assert!(log_tail(&dir.path().join("none.log")).starts_with("(log unreadable: "));
    }
}
