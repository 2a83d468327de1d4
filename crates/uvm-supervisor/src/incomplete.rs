//! VM directories without a record: a `create` under way (its supervisor has not written
//! `vm.json` yet), or one killed before its supervisor got that far — which leaves the directory
//! and the name claim behind with nobody to remove them.
//!
//! The two are told apart by the lock on `supervisor.log`: the starter takes it before the
//! supervisor starts, and the supervisor holds it (the log is its stdout) for as long as it
//! lives. A directory whose log is unlocked, or that has no log, belongs to nobody:
//! [`remove_abandoned`] removes it with its name claims.

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use crate::names::{self, NameError, NAMES_DIR};
use crate::record::LOG_FILE;

/// Who a record-less VM directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// A supervisor (or its starter) holds it: the VM is being created.
    Creating,
    /// Nobody: a `create` died before its supervisor wrote the record.
    Abandoned,
}

impl Incomplete {
    /// The state `ps` shows for it.
    pub fn shown(self) -> &'static str {
        match self {
            Incomplete::Creating => "Creating",
            Incomplete::Abandoned => "Abandoned (create died; `rm` cleans it)",
        }
    }
}

/// A record-less VM directory could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum IncompleteError {
    /// Its supervisor still runs.
    #[error("VM {id} is being created (it has no record yet): wait for its `create` to finish")]
    Creating {
        /// The VM.
        id: String,
    },
    /// Releasing a name claim failed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Removing the directory failed.
    #[error("cannot remove {}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Whether anyone holds the record-less directory `dir`. The answer holds while the returned
/// probe is kept (it keeps a shared lock, which a starter's lock would wait behind).
fn probe(dir: &Path) -> (Incomplete, Option<std::fs::File>) {
    let Ok(log) = std::fs::File::open(dir.join(LOG_FILE)) else {
        // No log: the create died before it could start a supervisor.
        return (Incomplete::Abandoned, None);
    };
    match rustix::fs::flock(
        log.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockShared,
    ) {
        Ok(()) => (Incomplete::Abandoned, Some(log)),
        Err(_) => (Incomplete::Creating, None),
    }
}

/// Who the record-less directory `dir` belongs to.
pub fn incomplete(dir: &Path) -> Incomplete {
    probe(dir).0
}

/// The names claimed for VM `id`.
pub fn names_of(root: &Path, id: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join(NAMES_DIR)) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| names::name_owner(root, name).as_deref() == Some(id))
        .collect();
    out.sort();
    out
}

/// Removes the record-less directory of VM `id` and its name claims, unless someone still
/// holds it.
pub fn remove_abandoned(root: &Path, id: &str) -> Result<(), IncompleteError> {
    let dir = root.join(id);
    let (state, _probe) = probe(&dir);
    if state == Incomplete::Creating {
        return Err(IncompleteError::Creating { id: id.into() });
    }
    // The names first: a claim left pointing at a removed VM would block the name for good.
    for name in names_of(root, id) {
        names::release_name(root, &name, id)?;
    }
    crate::sweep_dead_vm(&dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(IncompleteError::Io { path: dir, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(id: &str, name: &str, log: bool) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        crate::root::ensure_root(root.path()).expect("root");
        std::fs::create_dir(root.path().join(id)).expect("vm dir");
        if log {
            std::fs::write(root.path().join(id).join(LOG_FILE), b"").expect("log");
        }
        names::claim_name(root.path(), name, id).expect("claim");
        root
    }

    #[test]
    fn a_locked_log_is_a_create_under_way_and_is_not_removed() {
        let root = root_with("0123456789abcdef", "web", true);
        let log =
            std::fs::File::open(root.path().join("0123456789abcdef").join(LOG_FILE)).expect("open");
        rustix::fs::flock(&log, rustix::fs::FlockOperation::LockExclusive).expect("lock");
        let dir = root.path().join("0123456789abcdef");
        assert_eq!(incomplete(&dir), Incomplete::Creating);
        let err = remove_abandoned(root.path(), "0123456789abcdef").expect_err("held");
        assert!(matches!(err, IncompleteError::Creating { .. }), "{err:?}");
        assert!(dir.is_dir());
        assert_eq!(names_of(root.path(), "0123456789abcdef"), ["web"]);
        // Its holder gone, it is abandoned and goes with its name.
        drop(log);
        assert_eq!(incomplete(&dir), Incomplete::Abandoned);
        remove_abandoned(root.path(), "0123456789abcdef").expect("removed");
        assert!(!dir.exists());
        assert_eq!(names::name_owner(root.path(), "web"), None);
    }

    #[test]
    fn a_directory_without_a_log_is_abandoned_and_another_vms_claim_stays() {
        let root = root_with("00000000000000aa", "mine", false);
        names::claim_name(root.path(), "theirs", "00000000000000bb").expect("claim");
        remove_abandoned(root.path(), "00000000000000aa").expect("removed");
        assert!(!root.path().join("00000000000000aa").exists());
        assert_eq!(names::name_owner(root.path(), "mine"), None);
        assert_eq!(
            names::name_owner(root.path(), "theirs").as_deref(),
            Some("00000000000000bb")
        );
    }
}
