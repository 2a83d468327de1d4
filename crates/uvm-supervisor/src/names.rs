//! VM ids and names, and how a user's `ID` argument finds a VM.
//!
//! An id is 16 random hex digits, the name of its directory `<root>/<id>`. A name is claimed by
//! creating `<root>/names/<name>` with `O_EXCL` (its content: the id), so of two `create`s racing
//! for one name exactly one wins. An `ID` argument resolves as docker resolves it: a full id, else
//! a name, else a unique prefix of an id.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The directory of the name claims, under the root.
pub const NAMES_DIR: &str = "names";

/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// A name or an id could not be used or found.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The name has characters or a length we do not accept.
    #[error("invalid VM name {name:?}: use 1 to {MAX_NAME_LEN} of [a-zA-Z0-9_.-], starting with a letter or digit")]
    Invalid {
        /// The name.
        name: String,
    },
    /// Another VM has the name.
    #[error("the name {name:?} is already in use by VM {id}")]
    Taken {
        /// The name.
        name: String,
        /// The VM that has it (empty if unreadable).
        id: String,
    },
    /// Nothing matches.
    #[error("no such VM: {query}")]
    NotFound {
        /// What the user asked for.
        query: String,
    },
    /// More than one id starts with the prefix.
    #[error("{query:?} is ambiguous: it matches VMs {}", matches.join(", "))]
    Ambiguous {
        /// What the user asked for.
        query: String,
        /// The ids it matches.
        matches: Vec<String>,
    },
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A fresh VM id: 16 hex digits from the kernel's random source.
pub fn new_id() -> Result<String, NameError> {
    let mut bytes = [0u8; 8];
    let path = Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|source| NameError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `name` is acceptable as a VM name (docker's rule).
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn claim_path(root: &Path, name: &str) -> PathBuf {
    root.join(NAMES_DIR).join(name)
}

/// Claims `name` for VM `id`: exactly one of several concurrent claims of one name succeeds.
pub fn claim_name(root: &Path, name: &str, id: &str) -> Result<(), NameError> {
    if !valid_name(name) {
        return Err(NameError::Invalid { name: name.into() });
    }
    let path = claim_path(root, name);
    let io = |action, source| NameError::Io {
        action,
        path: path.clone(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(NameError::Taken {
                name: name.into(),
                id: name_owner(root, name).unwrap_or_default(),
            })
        }
        Err(e) => return Err(io("claim the name", e)),
    };
    file.write_all(id.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write the name claim", e))
}

/// The id that claimed `name`, if any.
pub fn name_owner(root: &Path, name: &str) -> Option<String> {
    if !valid_name(name) {
        return None;
    }
    std::fs::read_to_string(claim_path(root, name)).ok()
}

/// Releases `name` if VM `id` holds it (a claim of another VM is left alone).
pub fn release_name(root: &Path, name: &str, id: &str) -> Result<(), NameError> {
    if name_owner(root, name).as_deref() != Some(id) {
        return Ok(());
    }
    let path = claim_path(root, name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NameError::Io {
            action: "release the name",
            path,
            source,
        }),
    }
}

/// The ids of the VMs under `root` (every directory except the names).
pub fn list_ids(root: &Path) -> Result<Vec<String>, NameError> {
    let entries = std::fs::read_dir(root).map_err(|source| NameError::Io {
        action: "list",
        path: root.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != NAMES_DIR && !name.starts_with('.'))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Resolves `query` among `ids` (with `owner_of_name` giving the id a name was claimed by): a
/// full id, else a name, else a unique id prefix.
pub fn resolve_among(
    query: &str,
    ids: &[String],
    owner_of_name: impl Fn(&str) -> Option<String>,
) -> Result<String, NameError> {
    if query.is_empty() {
        return Err(NameError::NotFound {
            query: query.into(),
        });
    }
    if ids.iter().any(|id| id == query) {
        return Ok(query.into());
    }
    if let Some(id) = owner_of_name(query).filter(|id| ids.contains(id)) {
        return Ok(id);
    }
    let matches: Vec<String> = ids
        .iter()
        .filter(|id| id.starts_with(query))
        .cloned()
        .collect();
    match matches.as_slice() {
        [] => Err(NameError::NotFound {
            query: query.into(),
        }),
        [one] => Ok(one.clone()),
        _ => Err(NameError::Ambiguous {
            query: query.into(),
            matches,
        }),
    }
}

/// Resolves `query` to a VM id under `root`.
pub fn resolve(root: &Path, query: &str) -> Result<String, NameError> {
    let ids = list_ids(root)?;
    resolve_among(query, &ids, |name| name_owner(root, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_ambiguous_prefix_is_refused_naming_every_match() {
        let all = ids(&["abc123", "abd456", "ff00"]);
        let err = resolve_among("ab", &all, |_| None).expect_err("ambiguous");
        assert!(
            matches!(&err, NameError::Ambiguous { matches, .. } if matches == &ids(&["abc123", "abd456"])),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_and_empty_queries_are_not_found() {
        let all = ids(&["abc123"]);
        for q in ["zz", "", "abc1234"] {
            assert!(
                matches!(
                    resolve_among(q, &all, |_| None),
                    Err(NameError::NotFound { .. })
                ),
                "{q:?}"
            );
        }
    }

    #[test]
    fn a_full_id_wins_then_a_name_then_a_unique_prefix() {
        let all = ids(&["abc123", "abd456"]);
        // A name that is also a prefix of another id: the name wins, as in docker.
        let owner = |n: &str| (n == "abd").then(|| "abc123".to_string());
        assert_eq!(resolve_among("abd", &all, owner).expect("name"), "abc123");
        assert_eq!(resolve_among("abd456", &all, owner).expect("id"), "abd456");
        assert_eq!(resolve_among("abc", &all, owner).expect("prefix"), "abc123");
        // A name whose VM directory is gone does not resolve.
        let stale = |_: &str| Some("gone".to_string());
        assert!(matches!(
            resolve_among("x", &all, stale),
            Err(NameError::NotFound { .. })
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "-a", ".a", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(name), "{name:?}");
        }
        for name in ["a", "web-1", "A.b_c", &"x".repeat(64)] {
            assert!(valid_name(name), "{name:?}");
        }
    }

    #[test]
    fn a_name_is_claimed_once_and_released_only_by_its_owner() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(NAMES_DIR)).expect("names");
        claim_name(root.path(), "web", "id1").expect("claim");
        let err = claim_name(root.path(), "web", "id2").expect_err("taken");
        assert!(
            matches!(&err, NameError::Taken { name, id } if name == "web" && id == "id1"),
            "{err:?}"
        );
        release_name(root.path(), "web", "id2").expect("not ours: no-op");
        assert_eq!(name_owner(root.path(), "web").as_deref(), Some("id1"));
        release_name(root.path(), "web", "id1").expect("release");
        assert_eq!(name_owner(root.path(), "web"), None);
        claim_name(root.path(), "web", "id2").expect("free again");
    }

    #[test]
    fn racing_claims_of_one_name_have_exactly_one_winner() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(NAMES_DIR)).expect("names");
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let root = root.path();
                    s.spawn(move || claim_name(root, "race", &format!("id{i}")).is_ok())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().expect("thread")))
                .sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn ids_are_16_hex_digits_and_differ() {
        let (a, b) = (new_id().expect("id"), new_id().expect("id"));
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
