//! The state root: where every long-lived VM has its directory (`<root>/<id>/`) and where names are
//! claimed (`<root>/names/<name>`). `--root`, else `UVMCTL_ROOT`, else `/run/uvmctl` for root and
//! `$XDG_RUNTIME_DIR/uvmctl` for everyone else. The root is ours and mode 0700: no other user
//! reaches a VM's socket or record.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The environment variable that overrides the default root.
pub const ROOT_ENV: &str = "UVMCTL_ROOT";

/// The mode of the root and of every directory in it.
pub const DIR_MODE: u32 = 0o700;

/// The root cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// No root was given and none can be derived.
    #[error("no state root: pass --root or set {ROOT_ENV} (or XDG_RUNTIME_DIR)")]
    Unset,
    /// The path exists but is not a directory.
    #[error("state root {} is not a directory", path.display())]
    NotADirectory {
        /// The root.
        path: PathBuf,
    },
    /// The directory belongs to another user.
    #[error("state root {} is owned by uid {owner}, not by us (uid {uid})", path.display())]
    NotOurs {
        /// The root.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        uid: u32,
    },
    /// Creating or inspecting it failed.
    #[error("cannot {action} state root {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The root to use: `explicit` (a `--root` flag), else [`ROOT_ENV`], else the default for our uid.
pub fn resolve_root(explicit: Option<&Path>) -> Result<PathBuf, RootError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(ROOT_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/run/uvmctl"));
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|dir| PathBuf::from(dir).join("uvmctl"))
        .ok_or(RootError::Unset)
}

/// Creates `root` (mode 0700) if missing, and checks that it is a directory we own; tightens its
/// mode to 0700 if it is looser. Returns the path.
pub fn ensure_root(root: &Path) -> Result<PathBuf, RootError> {
    let io = |action, source| RootError::Io {
        action,
        path: root.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(root)
    {
        Ok(()) => {}
        // An existing non-directory: say so below rather than "file exists".
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create", e)),
    }
    check_root(root)?;
    let meta = std::fs::metadata(root).map_err(|e| io("inspect", e))?;
    if meta.mode() & 0o777 != DIR_MODE {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| io("restrict the mode of", e))?;
    }
    for sub in [crate::names::NAMES_DIR] {
        match std::fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(root.join(sub))
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create the names directory in", e)),
        }
    }
    Ok(root.to_path_buf())
}

/// Checks, without creating anything, that `root` is a directory owned by our effective uid
/// (symbolic links are not followed: a link planted by someone else is not our directory).
pub fn check_root(root: &Path) -> Result<(), RootError> {
    let meta = std::fs::symlink_metadata(root).map_err(|source| RootError::Io {
        action: "inspect",
        path: root.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(RootError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(RootError::NotOurs {
            path: root.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_refused_as_not_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            ensure_root(&file),
            Err(RootError::NotADirectory { path }) if path == file
        ));
    }

    #[test]
    fn a_symlink_to_our_directory_is_not_taken_as_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(matches!(
            check_root(&link),
            Err(RootError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("theirs");
        std::fs::create_dir(&root).expect("mkdir");
        let me = rustix::process::geteuid();
        let (path, other) = if me.is_root() {
            // As root: give a directory to `nobody`.
            let nobody = rustix::fs::Uid::from_raw(65534);
            rustix::fs::chown(&root, Some(nobody), None).expect("chown");
            (root.clone(), 65534)
        } else {
            // As anyone else: `/` belongs to root.
            (PathBuf::from("/"), 0)
        };
        let err = ensure_root(&path).expect_err("not ours");
        assert!(
            matches!(&err, RootError::NotOurs { owner, .. } if *owner == other),
            "{err:?}"
        );
    }

    #[test]
    fn a_new_root_is_created_0700_and_a_loose_one_is_tightened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("a/b");
        ensure_root(&root).expect("root");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join(crate::names::NAMES_DIR)), 0o700);
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_root(&root).expect("root again");
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        let flag = Path::new("/tmp/flag-root");
        assert_eq!(resolve_root(Some(flag)).expect("root"), flag);
    }
}
