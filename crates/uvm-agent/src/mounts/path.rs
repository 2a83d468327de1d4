//! The check every guest mount path passes before anything is made or mounted there.
//!
//! A mount hides what is under it, so the host may not mount over the guest's pseudo
//! filesystems (`/proc`, `/sys`, `/dev`, which the agent itself reads and serves processes
//! from) or over the agent's own files (`/init`, and `/`, which holds it). The check is on the
//! text; callers that create the path re-check its canonical form, so a symlink planted in the
//! guest cannot redirect a mount onto a refused place.

use std::path::{Component, Path, PathBuf};

use uvm_agent_proto::MAX_PATH_BYTES;

use crate::error::ApiError;

/// Trees no mount may cover (the path itself or anything under it).
const PROTECTED_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];
/// Paths no mount may cover exactly: the root (it holds everything) and the agent's binary.
const PROTECTED_PATHS: [&str; 2] = ["/", "/init"];

/// `path` as a mount point, when it is acceptable: absolute, at most `PATH_MAX` bytes, without
/// NUL or `..` components, not at or under `/proc`, `/sys` or `/dev`, and neither `/` nor the
/// agent's own `/init`. `.` components and repeated slashes are dropped from the result.
///
/// # Errors
/// [`ApiError::InvalidArgument`] on the field `guest_path`, saying which rule it breaks.
pub fn check_mount_path(path: &str) -> Result<PathBuf, ApiError> {
    let refuse = |reason: String| Err(ApiError::invalid("guest_path", reason));
    if path.is_empty() {
        return refuse("must not be empty".to_owned());
    }
    if path.len() > MAX_PATH_BYTES {
        return refuse(format!(
            "{} bytes, at most {MAX_PATH_BYTES} allowed",
            path.len()
        ));
    }
    if path.contains('\0') {
        return refuse(format!("{path:?} contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return refuse(format!("{path:?} is not absolute"));
    }
    let mut clean = PathBuf::from("/");
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => clean.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return refuse(format!("{path:?} contains \"..\""));
            }
        }
    }
    if let Some(tree) = PROTECTED_TREES
        .iter()
        .find(|tree| clean.starts_with(Path::new(tree)))
    {
        return refuse(format!(
            "{path:?} is at or under {tree}, which the agent needs"
        ));
    }
    if PROTECTED_PATHS.iter().any(|p| clean == Path::new(p)) {
        return refuse(format!("{path:?} would hide the agent's own files"));
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(path: &str) -> String {
        match check_mount_path(path) {
            Err(ApiError::InvalidArgument {
                field: "guest_path",
                reason,
            }) => reason,
            other => panic!("{path:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn relative_empty_nul_and_dotdot_paths_are_refused() {
        assert!(refused("").contains("empty"));
        assert!(refused("mnt/x").contains("not absolute"));
        assert!(refused("/mnt/\0x").contains("NUL"));
        assert!(refused("/mnt/../proc").contains(".."));
        assert!(refused("/mnt/x/..").contains(".."));
        assert!(refused(&format!("/{}", "a".repeat(MAX_PATH_BYTES))).contains("at most"));
    }

    #[test]
    fn pseudo_filesystems_and_the_agents_files_are_refused() {
        for path in [
            "/proc",
            "/proc/1",
            "/sys",
            "/sys/fs/cgroup",
            "/dev",
            "/dev/shm",
            "//dev/./pts",
        ] {
            assert!(refused(path).contains("which the agent needs"), "{path}");
        }
        for path in ["/", "/init", "//", "/./init"] {
            assert!(refused(path).contains("agent's own files"), "{path}");
        }
    }

    #[test]
    fn ordinary_paths_pass_normalised() {
        assert_eq!(
            check_mount_path("/mnt/data").unwrap(),
            Path::new("/mnt/data")
        );
        assert_eq!(
            check_mount_path("//mnt/./data/").unwrap(),
            Path::new("/mnt/data")
        );
        // Only whole components count: these merely start with a protected name.
        assert_eq!(check_mount_path("/device").unwrap(), Path::new("/device"));
        assert_eq!(check_mount_path("/init.d").unwrap(), Path::new("/init.d"));
        assert_eq!(
            check_mount_path("/srv/proc").unwrap(),
            Path::new("/srv/proc")
        );
    }
}
