//! The checks of a guest path the host asks to mount something at (disks and shares alike):
//! absolute and normalised, not under the kernel's own trees (`/proc`, `/sys`, `/dev`), and
//! neither in nor over the agent's own files (a directory holding them included: a mount there
//! would hide them).

use std::path::{Path, PathBuf};

use crate::error::ApiError;
use crate::files::check_path;
use crate::modules::MODULE_DIR;

/// Trees a mount may not go into: the kernel's views the agent and every process rely on.
pub const KERNEL_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];
/// The agent's own files: a mount on them, or on a directory above them, would hide them.
pub const AGENT_FILES: [&str; 2] = ["/init", MODULE_DIR];

/// `path` as a mount point: [`check_path`]'s rules (absolute, normalised, no NUL, bounded, not
/// `/`), then [`check_mount_point_rules`].
///
/// # Errors
/// [`ApiError::InvalidArgument`] (field `field`) naming the rule `path` breaks.
pub fn check_mount_point(field: &'static str, path: &str) -> Result<PathBuf, ApiError> {
    let checked = check_path(field, path)?;
    check_mount_point_rules(field, &checked)?;
    Ok(checked)
}

/// The rules beyond the path's syntax, for a path already checked — also for the same path
/// once its symlinks are resolved, so a link cannot lead a mount into `/proc`.
///
/// # Errors
/// [`ApiError::InvalidArgument`] (field `field`) naming the rule `path` breaks.
pub fn check_mount_point_rules(field: &'static str, path: &Path) -> Result<(), ApiError> {
    if path == Path::new("/") {
        return Err(ApiError::invalid(field, "\"/\" cannot be mounted over"));
    }
    if let Some(tree) = KERNEL_TREES.iter().find(|t| path.starts_with(t)) {
        return Err(ApiError::invalid(
            field,
            format!(
                "{} is in {tree}, which belongs to the kernel",
                path.display()
            ),
        ));
    }
    if let Some(own) = AGENT_FILES
        .iter()
        .find(|f| Path::new(f).starts_with(path) || path.starts_with(f))
    {
        return Err(ApiError::invalid(
            field,
            format!("{} would cover the agent's own {own}", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(path: &str) -> String {
        match check_mount_point("guest_path", path) {
            Err(ApiError::InvalidArgument {
                field: "guest_path",
                reason,
            }) => reason,
            other => panic!("{path:?}: {other:?}"),
        }
    }

    #[test]
    fn relative_unnormalised_and_root_paths_are_refused() {
        for bad in [
            "",
            "mnt/d",
            "/",
            "/mnt/../proc",
            "/mnt//d",
            "/mnt/./d",
            "/mnt/d/",
            "/a\0b",
        ] {
            refused(bad);
        }
    }

    #[test]
    fn the_kernels_trees_are_refused_at_any_depth_but_look_alikes_pass() {
        for bad in ["/proc", "/proc/1", "/sys/fs/cgroup", "/dev", "/dev/shm"] {
            assert!(refused(bad).contains("belongs to the kernel"), "{bad}");
        }
        for good in ["/procs", "/sysroot", "/devices/x", "/mnt/proc"] {
            check_mount_point("guest_path", good).expect(good);
        }
    }

    #[test]
    fn the_agents_files_and_their_parents_are_refused() {
        for bad in [
            "/init",
            "/lib",
            "/lib/modules",
            "/lib/modules/uvm",
            "/lib/modules/uvm/x",
        ] {
            let reason = refused(bad);
            assert!(reason.contains("the agent's own"), "{bad}: {reason}");
        }
        for good in ["/initrd", "/lib/firmware", "/mnt/init", "/run/disks/a"] {
            check_mount_point("guest_path", good).expect(good);
        }
    }
}
