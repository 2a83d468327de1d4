//! Starting a process for `ExecProcess`: request validation, then pipes through `posix_spawn`
//! (`posix_spawn.rs`) or a pseudo-terminal through `std::process::Command` — never
//! `tokio::process`, whose child reaping would race with the agent's own reaper.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use rustix::pty::OpenptFlags;

use crate::error::ApiError;

/// `PATH` for processes whose request does not set one.
pub const DEFAULT_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// Bound on the number of `args` and of `env` entries.
const MAX_LIST: usize = 4096;

/// What to run: the validated fields of an `ExecRequest`.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// argv, non-empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Working directory; empty means `/`.
    pub cwd: String,
    /// Run on a new pseudo-terminal.
    pub terminal: bool,
    /// Keep a stdin pipe.
    pub stdin: bool,
    /// The terminal's initial size (rows, columns); `None` leaves 80×24.
    pub size: Option<(u16, u16)>,
    /// The file to run, resolved once ([`program_path`]) so that what the security policy
    /// decided on is what runs; `None` (or a name without `/`, when nothing was found): the
    /// spawn resolves `args[0]` itself.
    pub program: Option<String>,
}

impl ExecSpec {
    /// Checks what `exec` would reject later with a vaguer error.
    pub fn validate(&self) -> Result<(), ApiError> {
        let Some(program) = self.args.first() else {
            return Err(ApiError::invalid("args", "must not be empty"));
        };
        if program.is_empty() {
            return Err(ApiError::invalid("args", "args[0] must not be empty"));
        }
        if self.args.len() > MAX_LIST || self.env.len() > MAX_LIST {
            return Err(ApiError::invalid(
                "args",
                format!("at most {MAX_LIST} args and {MAX_LIST} env entries"),
            ));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(ApiError::invalid("args", "must not contain NUL bytes"));
        }
        for entry in &self.env {
            match entry.split_once('=') {
                Some((key, _)) if !key.is_empty() && !entry.contains('\0') => {}
                _ => {
                    return Err(ApiError::invalid(
                        "env",
                        format!("{entry:?} is not KEY=VALUE"),
                    ))
                }
            }
        }
        if self.cwd.contains('\0') {
            return Err(ApiError::invalid("cwd", "must not contain NUL bytes"));
        }
        if self.size.is_some() && !self.terminal {
            return Err(ApiError::invalid("size", "only a terminal has a size"));
        }
        Ok(())
    }
}

/// The file `spec` runs: `args[0]` resolved in the process's own `PATH` as `execvp` would,
/// made absolute against the process's working directory; `args[0]` as given when nothing of
/// that name is found (the spawn then fails, saying why).
pub fn program_path(spec: &ExecSpec) -> String {
    let program = spec.args.first().map_or("", String::as_str);
    let env = super::posix_spawn::child_env(spec);
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    match super::posix_spawn::resolve(program, path) {
        Ok(found) if found.starts_with('/') => found,
        Ok(relative) => {
            let cwd = if spec.cwd.is_empty() { "/" } else { &spec.cwd };
            format!(
                "{}/{}",
                cwd.trim_end_matches('/'),
                relative.trim_start_matches("./")
            )
        }
        Err(_) => program.to_owned(),
    }
}

/// A started process: its pid and our ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    /// The child's pid.
    pub pid: u32,
    /// Our write end of its stdin (pipe, or a duplicate of the pty master), if requested.
    pub stdin: Option<OwnedFd>,
    /// Our read end of its stdout (or the pty master).
    pub stdout: OwnedFd,
    /// Our read end of its stderr (`None` on a terminal: merged into stdout).
    pub stderr: Option<OwnedFd>,
    /// A duplicate of the pty master, to resize the terminal (`None` without one).
    pub pty: Option<OwnedFd>,
}

/// Starts `spec` (already validated). The child gets its own session; on a terminal, the pty
/// becomes its controlling terminal. The caller reaps it.
pub fn spawn(spec: &ExecSpec) -> Result<Spawned, ApiError> {
    let spawn_err = |source: io::Error| {
        let program = spec.args.first().cloned().unwrap_or_default();
        // The same errno covers the program and the directory: say which one it was.
        match workdir_problem(&spec.cwd) {
            Some(problem) => ApiError::WorkDir {
                program,
                dir: spec.cwd.clone(),
                source: problem,
            },
            None => ApiError::Spawn { program, source },
        }
    };
    if spec.terminal {
        spawn_on_terminal(spec, spawn_err)
    } else {
        super::posix_spawn::spawn_piped(spec).map_err(spawn_err)
    }
}

/// Why `dir` cannot be a working directory, if it cannot (an empty `dir` means `/`).
fn workdir_problem(dir: &str) -> Option<io::Error> {
    if dir.is_empty() {
        return None;
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => None,
        Ok(_) => Some(io::Error::from(io::ErrorKind::NotADirectory)),
        Err(e) => Some(e),
    }
}

/// `spec` on a new pseudo-terminal, through `std::process::Command`: making the pty the
/// controlling terminal (`TIOCSCTTY`) takes code in the child, which `posix_spawn` cannot run.
fn spawn_on_terminal(
    spec: &ExecSpec,
    spawn_err: impl Fn(io::Error) -> ApiError,
) -> Result<Spawned, ApiError> {
    let program = spec
        .program
        .as_deref()
        .filter(|p| p.contains('/'))
        .unwrap_or(&spec.args[0]);
    let mut cmd = Command::new(program);
    cmd.arg0(&spec.args[0])
        .args(&spec.args[1..])
        .env_clear()
        .envs(super::posix_spawn::child_env(spec));
    cmd.current_dir(if spec.cwd.is_empty() { "/" } else { &spec.cwd });
    let (master, slave) = open_pty().map_err(|source| ApiError::Pty { source })?;
    if let Some(size) = spec.size {
        resize(&master, size).map_err(|source| ApiError::Resize { source })?;
    }
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|source| ApiError::Pty { source });
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(slave));
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe system calls setsid(2) and ioctl(2) (rustix calls the kernel
    // directly: no allocation, no locks).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            Ok(())
        });
    }
    // Every copy of the master before the child exists: a failure after the spawn would
    // leave a child nobody tracks.
    let stdin = if spec.stdin {
        Some(dup(&master)?)
    } else {
        None
    };
    let pty = dup(&master)?;
    let child = cmd.spawn().map_err(spawn_err)?;
    // `cmd` holds the parent's copies of the slave: drop them so that EOF (EIO on the
    // master) arrives once the child's side closes.
    drop(cmd);
    Ok(Spawned {
        pid: child.id(),
        stdin,
        pty: Some(pty),
        stdout: master,
        stderr: None,
    })
}

/// Sets the size of the terminal whose master is `pty` to (rows, columns); the kernel sends
/// SIGWINCH to its foreground process group when the size changes.
pub fn resize(pty: &OwnedFd, (rows, cols): (u16, u16)) -> io::Result<()> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(pty, size)?)
}

/// A new pty pair, both ends close-on-exec, 80×24.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let slave = match rustix::pty::ioctl_tiocgptpeer(&master, flags) {
        Ok(slave) => slave,
        // Before Linux 4.13: open the slave by name.
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())?;
            rustix::fs::open(
                name.as_c_str(),
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?
        }
    };
    let size = rustix::termios::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, size)?;
    Ok((master, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> ExecSpec {
        ExecSpec {
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            ..ExecSpec::default()
        }
    }

    #[test]
    fn validation_rejects_what_exec_would() {
        assert!(matches!(
            spec(&[]).validate(),
            Err(ApiError::InvalidArgument { field: "args", .. })
        ));
        assert!(matches!(
            spec(&[""]).validate(),
            Err(ApiError::InvalidArgument { field: "args", .. })
        ));
        assert!(matches!(
            spec(&["a\0b"]).validate(),
            Err(ApiError::InvalidArgument { field: "args", .. })
        ));
        let mut bad_env = spec(&["true"]);
        bad_env.env = vec!["NOEQUALS".into()];
        assert!(matches!(
            bad_env.validate(),
            Err(ApiError::InvalidArgument { field: "env", .. })
        ));
        bad_env.env = vec!["=x".into()];
        assert!(matches!(
            bad_env.validate(),
            Err(ApiError::InvalidArgument { field: "env", .. })
        ));
        let mut ok = spec(&["true"]);
        ok.env = vec!["A=".into(), "B=c=d".into()];
        assert!(matches!(ok.validate(), Ok(())));
    }

    #[test]
    fn a_missing_or_non_directory_workdir_is_named_as_such_piped_or_on_a_terminal() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let file = file.path().to_str().expect("utf-8").to_owned();
        for (dir, kind) in [
            ("/nonexistent/dir", io::ErrorKind::NotFound),
            (file.as_str(), io::ErrorKind::NotADirectory),
        ] {
            for terminal in [false, true] {
                let s = ExecSpec {
                    cwd: dir.to_owned(),
                    terminal,
                    ..spec(&["true"])
                };
                let err = spawn(&s).expect_err("cannot start");
                assert!(
                    matches!(&err, ApiError::WorkDir { dir: d, source, .. } if d == dir && source.kind() == kind),
                    "{dir} (terminal: {terminal}): {err:?}"
                );
            }
        }
        // A missing program in a good directory is still the program's fault.
        let s = ExecSpec {
            cwd: "/".into(),
            ..spec(&["/nonexistent/program"])
        };
        assert!(matches!(spawn(&s), Err(ApiError::Spawn { .. })));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_with_not_found() {
        let err = spawn(&spec(&["/nonexistent/program"])).expect_err("cannot start");
        assert!(matches!(
            &err,
            ApiError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound
        ));
    }
}
