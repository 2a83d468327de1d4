//! `ExecProcess` without a terminal, through glibc's `posix_spawn`: a `clone(CLONE_VM |
//! CLONE_VFORK)` child that shares the agent's memory until it execs, so neither the agent's
//! page tables are copied nor its pages made copy-on-write as `fork` (what
//! `std::process::Command` falls back to when it must run `setsid` or `chdir` in the child)
//! does. Under TCG every copied table and every later copy-on-write fault is emulated.
//!
//! The child: its own session (`POSIX_SPAWN_SETSID`), every signal at its default disposition
//! and none blocked, the working directory set, stdin from a pipe or `/dev/null`, stdout and
//! stderr into pipes.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::pipe::PipeFlags;

use super::spawn::{ExecSpec, Spawned, DEFAULT_PATH};

/// Owns a `posix_spawn_file_actions_t`.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero value is a valid argument for `_init`, which overwrites it.
        let mut fa: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        // SAFETY: `fa` is writable and lives as long as the call.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut fa) })?;
        Ok(FileActions(fa))
    }

    fn dup2(&mut self, fd: &OwnedFd, target: i32) -> io::Result<()> {
        // SAFETY: `self.0` was initialised by `_init`; `fd` stays open until the spawn.
        check(unsafe {
            libc::posix_spawn_file_actions_adddup2(&mut self.0, fd.as_raw_fd(), target)
        })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: as above; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised by `_init`, destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Owns a `posix_spawnattr_t`.
struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    /// New session, default dispositions for every signal, empty signal mask.
    fn for_exec() -> io::Result<Self> {
        // SAFETY: an all-zero value is a valid argument for `_init`, which overwrites it.
        let mut attr: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
        // SAFETY: `attr` is writable and lives as long as the call.
        check(unsafe { libc::posix_spawnattr_init(&mut attr) })?;
        let mut this = Attributes(attr);
        // SAFETY: zeroed sigset_t values are filled/emptied before use; `this.0` is initialised.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            add_glibc_internal_signals(&mut all);
            libc::sigemptyset(&mut none);
            check(libc::posix_spawnattr_setsigdefault(&mut this.0, &all))?;
            check(libc::posix_spawnattr_setsigmask(&mut this.0, &none))?;
            // glibc's flags are a `short`; libc declares SETSID as one and the others as `int`.
            let flags = libc::POSIX_SPAWN_SETSID
                | c_short(libc::POSIX_SPAWN_SETSIGDEF)
                | c_short(libc::POSIX_SPAWN_SETSIGMASK);
            check(libc::posix_spawnattr_setflags(&mut this.0, flags))?;
        }
        Ok(this)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised by `_init`, destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// glibc's `sigfillset` leaves out the two signals it keeps for itself (32 and 33), and its
/// `posix_spawn` child then sets those to SIG_IGN — which survives the exec, so every process
/// would start with them ignored. Naming them in the defaults set makes them SIG_DFL like the
/// rest. `sigaddset` refuses them, so the bits are set directly: bit n-1 of the first word is
/// signal n in glibc's layout (`unsigned long __val[16]`).
fn add_glibc_internal_signals(set: &mut libc::sigset_t) {
    const _: () = assert!(std::mem::size_of::<libc::sigset_t>() == 128);
    let first: *mut u64 = std::ptr::from_mut(set).cast();
    // SAFETY: sigset_t is 128 bytes of `unsigned long` words on x86-64 glibc (asserted above),
    // so its first 8 bytes are an aligned u64 we may write.
    unsafe { *first |= (1 << 31) | (1 << 32) };
}

/// A `posix_spawnattr_setflags` flag as glibc's `short` (the values are small constants).
fn c_short(flag: i32) -> libc::c_short {
    libc::c_short::try_from(flag).expect("posix_spawn flags fit a short")
}

/// posix_spawn's functions return an errno value instead of setting `errno`.
fn check(ret: i32) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

/// The child's environment: the request's entries (a later one replaces an earlier one with
/// the same key), plus `PATH` when the request has none.
pub(crate) fn child_env(spec: &ExecSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(spec.env.len() + 1);
    for entry in &spec.env {
        if let Some((key, value)) = entry.split_once('=') {
            match env.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value.to_owned(),
                None => env.push((key.to_owned(), value.to_owned())),
            }
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    env
}

/// `program` as `execvp` would find it in the child's `PATH`: as given when it holds a `/`,
/// else the first executable regular file of that name in a `PATH` directory.
pub(crate) fn resolve(program: &str, path: &str) -> io::Result<String> {
    if program.contains('/') {
        return Ok(program.to_owned());
    }
    let mut denied = false;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{dir}/{program}");
        match rustix::fs::stat(candidate.as_str()) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {
                match rustix::fs::access(candidate.as_str(), rustix::fs::Access::EXEC_OK) {
                    Ok(()) => return Ok(candidate),
                    Err(_) => denied = true,
                }
            }
            _ => {}
        }
    }
    Err(if denied {
        io::Error::from(io::ErrorKind::PermissionDenied)
    } else {
        io::Error::from(io::ErrorKind::NotFound)
    })
}

/// Starts `spec` (validated, no terminal) with stdio pipes.
pub(crate) fn spawn_piped(spec: &ExecSpec) -> io::Result<Spawned> {
    let env = child_env(spec);
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = match spec.program.as_deref() {
        Some(resolved) if resolved.contains('/') => resolved.to_owned(),
        _ => resolve(&spec.args[0], path_var)?,
    };
    let program = cstring(&program)?;
    let argv: Vec<CString> = spec
        .args
        .iter()
        .map(|a| cstring(a))
        .collect::<io::Result<_>>()?;
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<io::Result<_>>()?;
    let cwd = cstring(if spec.cwd.is_empty() { "/" } else { &spec.cwd })?;
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(std::ptr::null_mut());

    // Our ends stay close-on-exec; the child's ends are dup2'ed onto 0-2, which clears it there.
    let (stdin_ours, stdin_child) = if spec.stdin {
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
        (Some(w), r)
    } else {
        let null = rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        (None, null)
    };
    let (stdout_ours, stdout_child) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    let (stderr_ours, stderr_child) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;

    let mut actions = FileActions::new()?;
    actions.chdir(&cwd)?;
    actions.dup2(&stdin_child, 0)?;
    actions.dup2(&stdout_child, 1)?;
    actions.dup2(&stderr_child, 2)?;
    let attr = Attributes::for_exec()?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: `program`, `argv`, `envp` (NUL-terminated
    // arrays of NUL-terminated strings that outlive the call), the initialised actions and
    // attributes. glibc's child runs on its own stack and only makes system calls before exec.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attr.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    })?;
    drop((stdin_child, stdout_child, stderr_child));
    Ok(Spawned {
        pid: u32::try_from(pid)
            .map_err(|_| io::Error::other("posix_spawn returned a negative pid"))?,
        stdin: stdin_ours,
        stdout: stdout_ours,
        stderr: Some(stderr_ours),
        pty: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    fn spec(args: &[&str]) -> ExecSpec {
        ExecSpec {
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            ..ExecSpec::default()
        }
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    }

    fn reap(pid: u32) -> i32 {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        match nix::sys::wait::waitpid(pid, None).unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_child_gets_its_cwd_env_stdio_session_and_default_signals() {
        let mut s = spec(&[
            "sh",
            "-c",
            "pwd; echo \"$FOO $PATH\"; cat; echo err >&2; \
             [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] && echo leader; \
             grep -E '^Sig(Ign|Blk)' /proc/self/status",
        ]);
        s.env = vec!["FOO=old".into(), "FOO=bar".into()];
        s.cwd = "/tmp".into();
        s.stdin = true;
        let spawned = spawn_piped(&s).unwrap();
        let mut stdin = std::fs::File::from(spawned.stdin.unwrap());
        stdin.write_all(b"from stdin\n").unwrap();
        drop(stdin);
        let out = read_all(spawned.stdout);
        let err = read_all(spawned.stderr.unwrap());
        assert_eq!(reap(spawned.pid), 0);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "/tmp");
        // The last FOO wins; PATH is the default when the request sets none.
        assert_eq!(lines[1], format!("bar {DEFAULT_PATH}"));
        assert_eq!(lines[2], "from stdin");
        assert_eq!(lines[3], "leader", "not a session leader: {out}");
        // Nothing ignored (the test harness ignores SIGPIPE) and nothing blocked.
        assert_eq!(lines[4], "SigBlk:\t0000000000000000", "{out}");
        assert_eq!(lines[5], "SigIgn:\t0000000000000000", "{out}");
        assert_eq!(err, "err\n");
    }

    #[test]
    fn without_stdin_the_child_reads_dev_null() {
        let spawned = spawn_piped(&spec(&["sh", "-c", "cat; echo done"])).unwrap();
        assert!(spawned.stdin.is_none());
        assert_eq!(read_all(spawned.stdout), "done\n");
        assert_eq!(reap(spawned.pid), 0);
    }

    #[test]
    fn a_missing_program_or_cwd_is_not_found_and_nothing_runs() {
        for s in [
            spec(&["no-such-program-anywhere"]),
            spec(&["/nonexistent/program"]),
            ExecSpec {
                cwd: "/nonexistent/dir".into(),
                ..spec(&["true"])
            },
        ] {
            let err = spawn_piped(&s).expect_err("cannot start");
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{s:?}: {err}");
        }
    }

    #[test]
    fn resolve_follows_path_like_execvp() {
        assert_eq!(resolve("./x", "/bin").unwrap(), "./x");
        let found = resolve("sh", "/nonexistent:/bin:/usr/bin").unwrap();
        assert!(found == "/bin/sh" || found == "/usr/bin/sh", "{found}");
        assert_eq!(
            resolve("sh", "/nonexistent").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // A directory of that name is skipped, not "found".
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sh")).unwrap();
        let path = format!("{}:/bin", dir.path().display());
        assert_eq!(resolve("sh", &path).unwrap(), "/bin/sh");
    }
}
