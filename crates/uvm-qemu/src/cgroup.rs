//! Where a VM's processes are placed: its own cgroup ([`uvm_cgroup::VmCgroup`]) when the host
//! lets us make one, else nowhere in particular (with the reason, so that what needs a cgroup
//! is refused as unsupported instead of pretending).

use std::io;
use std::time::Duration;

use uvm::HostError;
use uvm_cgroup::{CgroupError, Layout, VmCgroup};

/// How long release waits for a killed cgroup to empty.
pub(crate) const EMPTY_WAIT: Duration = Duration::from_secs(5);

/// A VM's placement.
#[derive(Debug)]
pub(crate) enum Placement {
    /// Its own cgroup.
    Cgroup(VmCgroup),
    /// None, and why (for the warning at create and `inspect`).
    Uncontained(String),
}

impl Placement {
    /// Makes the cgroup `<parent>/<name>`, or says why there is none: no parent configured, no
    /// cgroups mounted, or the host refused (not root, a read-only cgroupfs).
    ///
    /// # Errors
    /// Anything else: the cgroup exists already, or a name that is not plain.
    pub(crate) fn make(parent: Option<&str>, name: &str) -> Result<Placement, HostError> {
        let Some(parent) = parent else {
            return Ok(Placement::Uncontained(
                "cgroups are off (QemuConfig::cgroup_parent)".to_owned(),
            ));
        };
        let made = Layout::detect().and_then(|layout| VmCgroup::create(&layout, parent, name));
        match made {
            Ok(cg) => Ok(Placement::Cgroup(cg)),
            Err(e) if refused(&e) => {
                let why = uvm_util::error_chain(&e);
                tracing::warn!(reason = %why, "the VM runs without a cgroup of its own");
                Ok(Placement::Uncontained(why))
            }
            Err(e) => Err(host_error("make the VM's cgroup", e)),
        }
    }

    /// `v1 /uvmctl/<name>`, or `none: <why>`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Placement::Cgroup(cg) => {
                format!("{} {}", cg.version(), cg.relative_path().display())
            }
            Placement::Uncontained(why) => format!("none: {why}"),
        }
    }

    /// The cgroup, if any.
    pub(crate) fn cgroup(&self) -> Option<&VmCgroup> {
        match self {
            Placement::Cgroup(cg) => Some(cg),
            Placement::Uncontained(_) => None,
        }
    }

    /// The cgroup, or Unsupported for `operation` (its reason was logged at create).
    pub(crate) fn require(&self, operation: &'static str) -> Result<&VmCgroup, HostError> {
        self.cgroup().ok_or(HostError::Unsupported {
            backend: "qemu",
            operation,
        })
    }

    /// [`release`] of the cgroup, if any.
    pub(crate) fn release(&self) -> Result<(), HostError> {
        self.cgroup().map_or(Ok(()), release)
    }
}

/// Kills whatever is still in the cgroup and removes it. Blocking (it waits for the cgroup to
/// empty). Retryable.
pub(crate) fn release(cg: &VmCgroup) -> Result<(), HostError> {
    let left = cg.pids();
    if !left.is_empty() {
        tracing::warn!(pids = ?left, "processes left in the VM's cgroup: killing them");
    }
    // A process that forked while the cgroup was being frozen escapes one pass, not several.
    for _ in 0..KILL_PASSES {
        cg.kill_all()
            .map_err(|e| host_error("kill what is left in the VM's cgroup", e))?;
        if cg.pids().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cg.remove(EMPTY_WAIT)
        .map_err(|e| host_error("remove the VM's cgroup", e))
}

/// Kill passes over a cgroup before waiting for it to empty.
const KILL_PASSES: usize = 5;

/// Whether the host simply does not let us have a cgroup (not a failure of ours).
fn refused(e: &CgroupError) -> bool {
    match e {
        CgroupError::NotMounted => true,
        CgroupError::Io { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
        ),
        CgroupError::InvalidName { .. }
        | CgroupError::Exists { .. }
        | CgroupError::NoController { .. }
        | CgroupError::NoGroup { .. }
        | CgroupError::InUse { .. }
        | CgroupError::InvalidValue { .. }
        | CgroupError::Busy { .. } => false,
    }
}

pub(crate) fn host_error(operation: &'static str, e: CgroupError) -> HostError {
    match e {
        CgroupError::InvalidName { what, value } => HostError::InvalidInput {
            what,
            message: format!("{value:?} is not a plain relative cgroup path"),
        },
        CgroupError::NoGroup { name } => HostError::NotFound {
            what: "cpu group",
            name,
        },
        CgroupError::InvalidValue { what, value } => HostError::InvalidInput {
            what,
            message: format!("{value} is not valid"),
        },
        other => HostError::Failed {
            operation,
            source: Box::new(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_parent_means_no_cgroup_and_resource_operations_are_unsupported() {
        let p = Placement::make(None, "vm").expect("placement");
        assert!(p.cgroup().is_none());
        assert!(matches!(
            p.require("update_cpu_limits"),
            Err(HostError::Unsupported {
                operation: "update_cpu_limits",
                ..
            })
        ));
        p.release().expect("nothing to release");
    }

    #[test]
    fn the_host_refusing_is_not_an_error_but_a_taken_name_is() {
        let denied = CgroupError::Io {
            operation: "make",
            path: "/sys/fs/cgroup/uvmctl".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(refused(&denied));
        assert!(refused(&CgroupError::NotMounted));
        assert!(!refused(&CgroupError::Exists { path: "/x".into() }));
        assert!(matches!(
            Placement::make(Some("../up"), "vm"),
            Err(HostError::InvalidInput { .. })
        ));
    }
}
