//! Starting a supervisor (the `uvmctl create` side): claim the name, make `<root>/<id>` (0700),
//! start the supervisor detached with its stdio on `<root>/<id>/supervisor.log`, and wait on the
//! readiness pipe. On any failure nothing is left: the supervisor is reaped (killed first if it
//! lingers), the directory removed and the name released.

use std::ffi::OsString;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::names::{self, NameError};
use crate::ready::{read_message, ReadyError, ReadyMessage, ReadyPipe};
use crate::record::LOG_FILE;
use crate::root::{ensure_root, RootError, DIR_MODE};

/// How long a supervisor may take to serve its API (it may build the guest image first).
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// What to start.
#[derive(Debug, Clone)]
pub struct SupervisorCommand {
    /// The program and its leading arguments (e.g. `uvmctl supervise --memory 256`); the starter
    /// appends `--root`, `--id`, `--ready-fd` and, with a name, `--name`.
    pub argv: Vec<OsString>,
    /// The state root.
    pub root: PathBuf,
    /// The VM's name, if any.
    pub name: Option<String>,
}

/// A supervisor serving its VM's API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The VM's id.
    pub id: String,
    /// The supervisor's pid.
    pub pid: u32,
    /// The VM's directory.
    pub dir: PathBuf,
}

/// Starting the supervisor failed; nothing was left behind.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The root is unusable.
    #[error(transparent)]
    Root(#[from] RootError),
    /// The name is invalid or taken, or the id could not be made.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The supervisor said why it failed (its own message).
    #[error("{message}")]
    Supervisor {
        /// Its message.
        message: String,
    },
    /// The supervisor exited without a word.
    #[error("the supervisor exited before serving its API ({status}); its log ends with:\n{log}")]
    Died {
        /// How it exited.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// The supervisor did not answer in time.
    #[error("the supervisor did not serve its API within {after:?}; it was killed")]
    Timeout {
        /// The limit.
        after: Duration,
    },
    /// The pipe failed.
    #[error(transparent)]
    Ready(#[from] ReadyError),
    /// A file or process operation failed.
    #[error("cannot {action}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Starts a supervisor for a new VM and returns once its API is served.
pub fn start_supervisor(command: &SupervisorCommand) -> Result<Started, StartError> {
    let root = ensure_root(&command.root)?;
    let root = std::fs::canonicalize(&root).map_err(|source| StartError::Io {
        action: "resolve the state root",
        source,
    })?;
    let id = names::new_id()?;
    if let Some(name) = &command.name {
        names::claim_name(&root, name, &id)?;
    }
    let dir = root.join(&id);
    let undo = Undo {
        root: root.clone(),
        id: id.clone(),
        name: command.name.clone(),
        dir: dir.clone(),
    };
    std::fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(&dir)
        .map_err(|source| {
            undo.fail(StartError::Io {
                action: "create the VM directory",
                source,
            })
        })?;
    match spawn_and_wait(command, &root, &id, &dir) {
        Ok(pid) => Ok(Started { id, pid, dir }),
        Err(e) => Err(undo.fail(e)),
    }
}

fn spawn_and_wait(
    command: &SupervisorCommand,
    root: &Path,
    id: &str,
    dir: &Path,
) -> Result<u32, StartError> {
    let io = |action| move |source| StartError::Io { action, source };
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(io("create the supervisor log"))?;
    // The lock on the log's open file description is the supervisor's mark of life: it shares
    // the description as its stdout, so the lock is held until the supervisor (and whatever
    // inherited its stdout) is gone. `ps` and `rm` read it for a directory without a record.
    rustix::fs::flock(&log, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        StartError::Io {
            action: "lock the supervisor log",
            source: e.into(),
        }
    })?;
    let log_err = log.try_clone().map_err(io("open the supervisor log"))?;
    let (program, args) = command.argv.split_first().ok_or(StartError::Io {
        action: "start the supervisor",
        source: std::io::Error::other("empty command"),
    })?;
    let pipe = ReadyPipe::new()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg("--root")
        .arg(root)
        .arg("--id")
        .arg(id)
        .arg("--ready-fd")
        .arg(pipe.write.as_raw_fd().to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(name) = &command.name {
        cmd.arg("--name").arg(name);
    }
    // A session of its own from its first instruction: a Ctrl-C or a hangup at the terminal of
    // `create` must not kill it half-way through its set-up.
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2),
    // which is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(io("start the supervisor"))?;
    // Only the child holds the write end now: its exit closes the pipe.
    drop(pipe.write);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let read = pipe.read;
    std::thread::spawn(move || {
        let _ = tx.send(read_message(read));
    });
    let message = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(message)) => message,
        // An unreadable answer: the supervisor may be running, and nobody would reach it.
        Ok(Err(e)) => {
            kill_and_reap(&mut child);
            return Err(e.into());
        }
        Err(_) => {
            kill_and_reap(&mut child);
            return Err(StartError::Timeout {
                after: READY_TIMEOUT,
            });
        }
    };
    match message {
        Some(ReadyMessage::Ok(_)) => {
            // Detached: it outlives us and is reparented; dropping `child` neither waits nor kills.
            drop(child);
            Ok(pid)
        }
        Some(ReadyMessage::Error(message)) => {
            reap(&mut child);
            Err(StartError::Supervisor { message })
        }
        None => {
            let status = reap(&mut child);
            Err(StartError::Died {
                status,
                log: uvm_util_tail(&log_path),
            })
        }
    }
}

/// Waits (briefly) for the supervisor to exit, then kills it; returns how it ended.
fn reap(child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                kill_and_reap(child);
                return "killed after failing".into();
            }
        }
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines of the supervisor's log.
fn uvm_util_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What a failed start takes back: the directory and the name claim.
struct Undo {
    root: PathBuf,
    id: String,
    name: Option<String>,
    dir: PathBuf,
}

impl Undo {
    fn fail(&self, err: StartError) -> StartError {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the VM directory");
            }
        }
        if let Some(name) = &self.name {
            if let Err(e) = names::release_name(&self.root, name, &self.id) {
                tracing::warn!(name, error = %e, "cannot release the name");
            }
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(root: &Path, script: &str, name: Option<&str>) -> SupervisorCommand {
        SupervisorCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()],
            root: root.to_path_buf(),
            name: name.map(Into::into),
        }
    }

    /// Everything under the root except the (empty) names directory.
    fn leftovers(root: &Path) -> Vec<PathBuf> {
        let mut left: Vec<PathBuf> = std::fs::read_dir(root)
            .expect("ls")
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with(names::NAMES_DIR))
            .collect();
        left.extend(
            std::fs::read_dir(root.join(names::NAMES_DIR))
                .expect("ls names")
                .flatten()
                .map(|e| e.path()),
        );
        left
    }

    // The script finds the fd after `--ready-fd` among its arguments and writes to it.
    const WRITE_TO_FD: &str = r#"msg='$MSG'; while [ "$1" != --ready-fd ]; do shift; done; eval 'printf "%s\n" "$msg" >&'"$2""#;

    #[test]
    fn a_supervisor_error_is_returned_verbatim_and_leaves_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let script =
            WRITE_TO_FD.replace("$MSG", r#"{"error":"creating the VM failed: no kernel"}"#);
        let err = start_supervisor(&command(root.path(), &script, Some("web"))).expect_err("fails");
        assert!(
            matches!(&err, StartError::Supervisor { message } if message == "creating the VM failed: no kernel"),
            "{err:?}"
        );
        assert_eq!(leftovers(root.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_supervisor_that_dies_silently_is_reported_with_its_log_and_leaves_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = start_supervisor(&command(root.path(), "echo last words >&2; exit 3", None))
            .expect_err("fails");
        assert!(
            matches!(&err, StartError::Died { log, .. } if log.contains("last words")),
            "{err:?}"
        );
        assert_eq!(leftovers(root.path()), Vec::<PathBuf>::new());
    }

    #[test]
    fn a_taken_name_fails_before_anything_starts() {
        let root = tempfile::tempdir().expect("tempdir");
        ensure_root(root.path()).expect("root");
        names::claim_name(root.path(), "web", "other").expect("claim");
        let err =
            start_supervisor(&command(root.path(), "exit 0", Some("web"))).expect_err("taken");
        assert!(
            matches!(&err, StartError::Name(NameError::Taken { id, .. }) if id == "other"),
            "{err:?}"
        );
        assert_eq!(leftovers(root.path()).len(), 1, "only the other VM's claim");
    }

    #[test]
    fn a_ready_supervisor_leaves_its_directory_and_log() {
        let root = tempfile::tempdir().expect("tempdir");
        let script = WRITE_TO_FD.replace("$MSG", r#"{"ok":true}"#);
        let started = start_supervisor(&command(root.path(), &script, Some("ok"))).expect("ready");
        assert!(started.dir.join(LOG_FILE).is_file());
        assert_eq!(
            names::name_owner(root.path(), "ok").as_deref(),
            Some(started.id.as_str())
        );
    }
}
