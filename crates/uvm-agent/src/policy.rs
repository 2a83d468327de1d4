//! The security policy in force, and the input document each decided request gives it
//! (`docs/policy.md`). Without a policy every request is allowed and no input is built.

use std::sync::Mutex;

use serde_json::{json, Value};
use uvm_agent_proto::agent::{
    disk_location, MountDiskRequest, OpenReadRequest, OpenWriteRequest, ShareTransport,
};
use uvm_policy::{FragmentLoad, Policy, Rule};
use uvm_util::lock;

use crate::error::ApiError;
use crate::process::ExecSpec;
use crate::{info, warn};

/// The agent's policy, set once by `SetPolicy`, added to by fragments.
#[derive(Debug, Default)]
pub struct Guard {
    policy: Mutex<Option<Policy>>,
}

impl Guard {
    /// Puts `text` in force; refused when it does not compile or a policy is set already.
    pub fn set(&self, text: &str) -> Result<(), ApiError> {
        let policy = Policy::compile(text)?;
        let mut slot = lock(&self.policy);
        if slot.is_some() {
            return Err(ApiError::PolicySet);
        }
        *slot = Some(policy);
        info!("security policy in force");
        Ok(())
    }

    /// Adds a fragment to the policy in force.
    pub fn add_fragment(&self, text: &str) -> Result<(), ApiError> {
        let mut slot = lock(&self.policy);
        let policy = slot.as_mut().ok_or(ApiError::NoPolicy)?;
        match policy.add_fragment(text) {
            Ok(FragmentLoad::Added) => {
                info!(
                    "policy fragment added ({} in force)",
                    policy.fragments().count()
                );
                Ok(())
            }
            Ok(FragmentLoad::AlreadyLoaded) => Ok(()),
            Err(e) => {
                warn!("policy fragment refused: {e}");
                Err(e.into())
            }
        }
    }

    /// Whether a policy is in force.
    pub fn enforced(&self) -> bool {
        lock(&self.policy).is_some()
    }

    /// Decides a request of class `rule`; `input` builds its input document, only when a
    /// policy is in force, and outside the lock (it may look at the file system). A denial is
    /// logged in the guest.
    pub fn check(&self, rule: Rule, input: impl FnOnce() -> Value) -> Result<(), ApiError> {
        // A policy is set once, at start, before any decided request: none now is none later.
        if !self.enforced() {
            return Ok(());
        }
        let input = input();
        let mut slot = lock(&self.policy);
        let Some(policy) = slot.as_mut() else {
            return Ok(());
        };
        policy.decide(rule, &input).map_err(|denial| {
            warn!("{denial}");
            ApiError::Denied(denial)
        })
    }
}

/// The last component of a path (`/bin/echo` → `echo`).
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The input of [`Rule::Exec`]: `path` is the file the agent will execute, `dir` its directory.
pub fn exec_input(spec: &ExecSpec) -> Value {
    let program = spec.args.first().map_or("", |a| base_name(a));
    let path = spec
        .program
        .clone()
        .unwrap_or_else(|| crate::process::program_path(spec));
    let dir = match path.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((dir, _)) => dir,
        None => "",
    };
    json!({
        "args": spec.args,
        "program": program,
        "dir": dir,
        "path": path,
        "env": spec.env,
        "cwd": if spec.cwd.is_empty() { "/" } else { spec.cwd.as_str() },
        "terminal": spec.terminal,
        "stdin": spec.stdin,
    })
}

/// The input of [`Rule::Signal`], with the target process's argv.
pub fn signal_input(exec_id: &str, signal: i32, args: &[String]) -> Value {
    json!({
        "exec_id": exec_id,
        "signal": signal,
        "args": args,
        "program": args.first().map_or("", |a| base_name(a)),
    })
}

/// The input of [`Rule::MountDisk`].
pub fn mount_disk_input(req: &MountDiskRequest) -> Value {
    let location = match req.location.as_ref().and_then(|l| l.kind.as_ref()) {
        Some(disk_location::Kind::Scsi(scsi)) => {
            json!({"scsi": {"controller": scsi.controller, "lun": scsi.lun}})
        }
        Some(disk_location::Kind::VirtioBlkSerial(serial)) => {
            json!({ "virtio_blk_serial": serial })
        }
        // Refused by the request's own checks, after the policy.
        _ => json!({}),
    };
    json!({
        "guest_path": req.guest_path,
        "read_only": req.read_only,
        "fs_type": req.fs_type,
        "options": req.options,
        "partition": req.partition,
        "location": location,
    })
}

/// The input of [`Rule::MountShare`].
pub fn mount_share_input(
    tag: &str,
    transport: Result<ShareTransport, i32>,
    guest_path: &str,
    read_only: bool,
) -> Value {
    let transport = match transport {
        Ok(ShareTransport::VIRTIO_FS) => "virtiofs",
        Ok(ShareTransport::NINE_P) => "9p",
        Err(_) => "",
    };
    json!({"tag": tag, "transport": transport, "guest_path": guest_path, "read_only": read_only})
}

/// The input of [`Rule::UnmountDisk`] and [`Rule::UnmountShare`].
pub fn unmount_input(guest_path: &str) -> Value {
    json!({ "guest_path": guest_path })
}

/// The input of [`Rule::WriteFile`].
pub fn write_file_input(req: &OpenWriteRequest) -> Value {
    json!({"path": req.path, "mode": req.mode, "size": req.size})
}

/// The input of [`Rule::ReadFile`].
pub fn read_file_input(req: &OpenReadRequest) -> Value {
    json!({"path": req.path, "max_size": req.max_size})
}

#[cfg(test)]
mod tests {
    use super::*;

    const SANDBOX: &str = include_str!("../../../examples/policies/sandbox.rego");

    fn spec(args: &[&str]) -> ExecSpec {
        ExecSpec {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..ExecSpec::default()
        }
    }

    #[test]
    fn without_a_policy_everything_is_allowed_and_no_input_is_built() {
        let guard = Guard::default();
        assert!(!guard.enforced());
        guard
            .check(Rule::Exec, || panic!("no input without a policy"))
            .expect("allowed");
    }

    #[test]
    fn a_denial_is_permission_denied_naming_the_rule() {
        let guard = Guard::default();
        guard.set(SANDBOX).expect("sandbox compiles");
        let err = guard
            .check(Rule::Exec, || exec_input(&spec(&["/bin/sh", "-c", "id"])))
            .expect_err("sh is denied");
        assert_eq!(err.code(), uvm_agent_proto::ttrpc::Code::PERMISSION_DENIED);
        assert!(err.to_string().contains("uvmctl.policy.exec"), "{err}");
        let err = guard
            .check(Rule::WriteFile, || {
                write_file_input(&OpenWriteRequest {
                    path: "/tmp/x".into(),
                    ..OpenWriteRequest::default()
                })
            })
            .expect_err("copy in is denied");
        assert!(err.to_string().contains("write_file"), "{err}");
    }

    #[test]
    fn a_policy_is_set_once_and_one_that_does_not_compile_is_invalid() {
        let guard = Guard::default();
        let bad = guard
            .set("package uvmctl.policy\nexec if {")
            .expect_err("bad");
        assert_eq!(bad.code(), uvm_agent_proto::ttrpc::Code::INVALID_ARGUMENT);
        assert!(!guard.enforced());
        guard.set(SANDBOX).expect("sandbox");
        assert!(matches!(guard.set(SANDBOX), Err(ApiError::PolicySet)));
    }

    #[test]
    fn a_fragment_needs_a_policy_and_adds_to_it() {
        let guard = Guard::default();
        let open_to_fragments =
            format!("{SANDBOX}\nload_fragment if startswith(input.package, \"fragment.\")\n");
        let fragment = "package fragment.tools\nexec if input.program == \"ls\"";
        assert!(matches!(
            guard.add_fragment(fragment),
            Err(ApiError::NoPolicy)
        ));
        guard.set(&open_to_fragments).expect("sandbox");
        let ls = || exec_input(&spec(&["ls", "/"]));
        assert!(guard.check(Rule::Exec, ls).is_err());
        guard.add_fragment(fragment).expect("fragment");
        guard.add_fragment(fragment).expect("the same again");
        guard.check(Rule::Exec, ls).expect("ls allowed now");
        let refused = guard
            .add_fragment("package elsewhere\nexec := true")
            .expect_err("this policy loads fragment.* only");
        assert_eq!(
            refused.code(),
            uvm_agent_proto::ttrpc::Code::PERMISSION_DENIED
        );
    }

    #[test]
    fn an_allowed_name_found_first_in_a_path_outside_the_system_directories_is_denied() {
        let dir = tempfile::tempdir().expect("dir");
        let echo = dir.path().join("echo");
        std::fs::write(&echo, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&echo, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let mut spec = spec(&["echo", "hi"]);
        spec.env = vec![format!("PATH={}:/bin", dir.path().display())];
        spec.program = Some(crate::process::program_path(&spec));
        let input = exec_input(&spec);
        assert_eq!(input["path"], echo.display().to_string());
        assert_eq!(input["dir"], dir.path().display().to_string());
        let guard = Guard::default();
        guard.set(SANDBOX).expect("sandbox");
        assert!(guard.check(Rule::Exec, || input).is_err());
    }

    #[test]
    fn a_relative_program_is_made_absolute_against_the_working_directory() {
        let mut spec = spec(&["bin/echo"]);
        spec.cwd = "/".into();
        assert_eq!(crate::process::program_path(&spec), "/bin/echo");
        spec.args = vec!["./bin/echo".into()];
        assert_eq!(crate::process::program_path(&spec), "/bin/echo");
    }

    #[test]
    fn the_exec_input_names_the_program_and_the_file_to_run() {
        let input = exec_input(&spec(&["/usr/bin/env", "true"]));
        assert_eq!(input["program"], "env");
        assert_eq!(input["path"], "/usr/bin/env");
        assert_eq!(input["dir"], "/usr/bin");
        assert_eq!(exec_input(&spec(&["/init"]))["dir"], "/");
        assert_eq!(exec_input(&spec(&["no-such-program"]))["dir"], "");
        assert_eq!(input["cwd"], "/");
        assert_eq!(input["args"], json!(["/usr/bin/env", "true"]));
    }
}
