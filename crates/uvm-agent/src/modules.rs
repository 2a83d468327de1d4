//! Kernel module loading at boot: `/lib/modules/uvm/load-order` names one `.ko` file per line,
//! in dependency order, all in `/lib/modules/uvm/`; each is loaded with `finit_module(2)`.
//!
//! A missing load-order file means there is nothing to load. A module that is already loaded
//! (`EEXIST`) is fine; any other failure is logged and loading continues with the next one —
//! a missing driver shows up later as a missing device, with the reason in the log.

use std::ffi::CStr;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

use crate::{info, warn};

/// Where the image puts the modules and their load order.
pub const MODULE_DIR: &str = "/lib/modules/uvm";
/// The load-order file name inside [`MODULE_DIR`].
pub const LOAD_ORDER_FILE: &str = "load-order";

/// `MODULE_INIT_COMPRESSED_FILE` (Linux 5.17+): the kernel decompresses the module itself.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Why a module was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// A load-order line is not a plain file name.
    #[error("load-order line {line}: {name:?} is not a plain module file name")]
    InvalidName {
        /// 1-based line number.
        line: usize,
        /// The offending text.
        name: String,
    },
    /// The load-order file exists but cannot be read.
    #[error("cannot read the module load order {path}")]
    ReadLoadOrder {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The module file cannot be opened.
    #[error("cannot open module {path}")]
    Open {
        /// The module file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the module.
    #[error("finit_module({name}) failed")]
    Init {
        /// The module file name.
        name: String,
        /// The kernel's answer.
        #[source]
        source: Errno,
    },
}

/// What [`load_all`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Modules loaded now.
    pub loaded: usize,
    /// Modules that were already loaded (built in or loaded before).
    pub already_loaded: usize,
    /// Modules that failed (each failure was logged).
    pub failed: usize,
}

/// Parses a load-order file: one module file name per line; blank lines and `#` comments are
/// skipped, surrounding whitespace is ignored. Names with a `/` or that are `.`/`..` are
/// rejected (the load order may only name files in its own directory).
pub fn parse_load_order(text: &str) -> Vec<Result<String, ModuleError>> {
    text.lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let name = raw.trim();
            if name.is_empty() || name.starts_with('#') {
                return None;
            }
            if name.contains('/') || name.contains('\0') || name == "." || name == ".." {
                return Some(Err(ModuleError::InvalidName {
                    line: i + 1,
                    name: name.to_owned(),
                }));
            }
            Some(Ok(name.to_owned()))
        })
        .collect()
}

/// Flags for `finit_module` given the module file name.
fn init_flags(name: &str) -> ModuleInitFlags {
    if [".xz", ".zst", ".gz"].iter().any(|ext| name.ends_with(ext)) {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    }
}

/// Loads every module named in `dir/load-order`, in order; never fails as a whole.
pub fn load_all(dir: &Path) -> LoadReport {
    let mut report = LoadReport::default();
    let order_path = dir.join(LOAD_ORDER_FILE);
    let text = match std::fs::read_to_string(&order_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!("no {} — no kernel modules to load", order_path.display());
            return report;
        }
        Err(source) => {
            let e = ModuleError::ReadLoadOrder {
                path: order_path,
                source,
            };
            warn!("{}", uvm_util::error_chain(&e));
            report.failed += 1;
            return report;
        }
    };
    for entry in parse_load_order(&text) {
        match entry.and_then(|name| load_one(dir, &name)) {
            Ok(true) => report.loaded += 1,
            Ok(false) => report.already_loaded += 1,
            Err(e) => {
                warn!("{}", uvm_util::error_chain(&e));
                report.failed += 1;
            }
        }
    }
    report
}

/// Loads one module; `Ok(false)` when it was already loaded.
fn load_one(dir: &Path, name: &str) -> Result<bool, ModuleError> {
    let path = dir.join(name);
    let file = File::open(&path).map_err(|source| ModuleError::Open {
        path: path.clone(),
        source,
    })?;
    let no_params: &CStr = c"";
    match finit_module(&file, no_params, init_flags(name)) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(source) => Err(ModuleError::Init {
            name: name.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_skips_blanks_and_comments_and_rejects_paths() {
        let text = "  virtio.ko \n\n# comment\nvirtio_ring.ko\n../evil.ko\nvsock.ko.xz\r\n..\n";
        let parsed = parse_load_order(text);
        assert_eq!(parsed.len(), 5);
        assert!(matches!(&parsed[0], Ok(n) if n == "virtio.ko"));
        assert!(matches!(&parsed[1], Ok(n) if n == "virtio_ring.ko"));
        assert!(matches!(
            &parsed[2],
            Err(ModuleError::InvalidName { line: 5, name }) if name == "../evil.ko"
        ));
        assert!(matches!(&parsed[3], Ok(n) if n == "vsock.ko.xz"));
        assert!(matches!(
            &parsed[4],
            Err(ModuleError::InvalidName { line: 7, .. })
        ));
    }

    #[test]
    fn compressed_modules_ask_the_kernel_to_decompress() {
        assert_eq!(init_flags("a.ko"), ModuleInitFlags::empty());
        assert_eq!(init_flags("a.ko.xz").bits(), MODULE_INIT_COMPRESSED_FILE);
        assert_eq!(init_flags("a.ko.zst").bits(), MODULE_INIT_COMPRESSED_FILE);
    }

    #[test]
    fn a_missing_load_order_loads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_all(dir.path()), LoadReport::default());
    }

    #[test]
    fn a_missing_module_file_is_counted_and_loading_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOAD_ORDER_FILE), "nope.ko\n../x.ko\n").expect("write");
        let report = load_all(dir.path());
        assert_eq!(
            report,
            LoadReport {
                loaded: 0,
                already_loaded: 0,
                failed: 2
            }
        );
        assert!(matches!(
            load_one(dir.path(), "nope.ko"),
            Err(ModuleError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        ));
    }
}
