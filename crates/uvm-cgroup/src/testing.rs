//! What the unit tests share: fake cgroupfs trees.

use crate::layout::{Layout, V1Hierarchy};

/// A v1 layout of one directory per hierarchy under a temporary directory, each hierarchy
/// named by its comma-separated controllers (`"cpu,cpuacct"`).
pub(crate) fn fake_v1(hierarchies: &[&str]) -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().expect("tempdir");
    let hierarchies = hierarchies
        .iter()
        .map(|name| {
            let mount = dir.path().join(name);
            std::fs::create_dir(&mount).expect("hierarchy");
            V1Hierarchy {
                mount,
                controllers: name.split(',').map(str::to_owned).collect(),
            }
        })
        .collect();
    (dir, Layout::V1 { hierarchies })
}
