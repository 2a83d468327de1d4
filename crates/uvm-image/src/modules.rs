//! The kernel side of an image: which kernel version is unpacked under the kernel root, and which
//! module files the guest must load, in which order.
//!
//! The guest has no modprobe and no depmod data: its init reads `/lib/modules/uvm/load-order`
//! and `finit_module`s each file in turn. So the host resolves `modules.dep` here, dependencies
//! first, and ships the modules uncompressed.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::kernel::{decompress, Compression};
use crate::ImageError;

/// A kernel unpacked by `dpkg -x`: `boot/vmlinuz-<ver>` and `lib/modules/<ver>/`.
#[derive(Debug, Clone)]
pub(crate) struct KernelTree {
    pub(crate) vmlinuz: PathBuf,
    pub(crate) modules_dir: PathBuf,
}

impl KernelTree {
    /// Finds the one kernel version that has both a `vmlinuz` and a modules directory.
    pub(crate) fn locate(root: &Path) -> Result<KernelTree, ImageError> {
        let boot = root.join("boot");
        let entries = match fs::read_dir(&boot) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::KernelMissing {
                    root: root.to_owned(),
                })
            }
            Err(source) => return Err(ImageError::Read { path: boot, source }),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ImageError::Read {
                path: boot.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else {
                continue;
            };
            if root.join("lib/modules").join(version).is_dir() {
                versions.push(version.to_owned());
            }
        }
        versions.sort();
        match versions.as_slice() {
            [] => Err(ImageError::KernelMissing {
                root: root.to_owned(),
            }),
            [version] => Ok(KernelTree {
                vmlinuz: boot.join(format!("vmlinuz-{version}")),
                modules_dir: root.join("lib/modules").join(version),
            }),
            _ => Err(ImageError::MultipleKernels {
                root: root.to_owned(),
                versions,
            }),
        }
    }

    pub(crate) fn modules_dep(&self) -> PathBuf {
        self.modules_dir.join("modules.dep")
    }

    /// Resolves `wanted` against this tree's `modules.dep` and `modules.builtin`.
    pub(crate) fn load_order(&self, wanted: &[&str]) -> Result<Vec<ModuleFile>, ImageError> {
        let dep_path = self.modules_dep();
        let dep = match fs::read_to_string(&dep_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::ModulesDepMissing { path: dep_path })
            }
            Err(source) => {
                return Err(ImageError::Read {
                    path: dep_path,
                    source,
                })
            }
        };
        let builtin_path = self.modules_dir.join("modules.builtin");
        // A kernel with no built-in modules has no such file; that is not an error.
        let builtin = match fs::read_to_string(&builtin_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ImageError::Read {
                    path: builtin_path,
                    source,
                })
            }
        };
        let order = resolve_load_order(&dep, &builtin, wanted, &dep_path)?;
        Ok(order
            .into_iter()
            .map(|rel| ModuleFile {
                path: self.modules_dir.join(&rel),
                rel,
            })
            .collect())
    }
}

/// One module the guest loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleFile {
    /// The path as written in `modules.dep`, relative to `lib/modules/<ver>`.
    pub(crate) rel: String,
    /// The file on the host.
    pub(crate) path: PathBuf,
}

impl ModuleFile {
    /// The file name inside the guest's `/lib/modules/uvm/`: the module's own file name without
    /// any compression suffix, since it is shipped decompressed.
    pub(crate) fn guest_name(&self) -> String {
        let base = file_name(&self.rel);
        let stem = strip_compression(base).0;
        stem.to_owned()
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Splits `x.ko.xz` into (`x.ko`, Some("xz")); `x.ko` into (`x.ko`, None).
fn strip_compression(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once(".ko.") {
        Some((stem, suffix)) => (&name[..stem.len() + 3], Some(suffix)),
        None => (name, None),
    }
}

/// The module name the kernel uses for a path in `modules.dep` or `modules.builtin`:
/// `kernel/drivers/char/hw_random/virtio-rng.ko` → `virtio_rng` (the kernel treats `-` and
/// `_` alike in module names and reports `_`).
pub(crate) fn module_name(path: &str) -> String {
    let base = strip_compression(file_name(path)).0;
    base.strip_suffix(".ko").unwrap_or(base).replace('-', "_")
}

/// Orders the modules to load for `wanted`: each module after all of its dependencies, no
/// module twice, and wanted modules that are built into the kernel left out. Returns paths
/// relative to `lib/modules/<ver>`, as written in `modules.dep`.
pub(crate) fn resolve_load_order(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
    modules_dep_path: &Path,
) -> Result<Vec<String>, ImageError> {
    // name → (path, direct-or-transitive dependency paths)
    let mut deps: HashMap<String, (&str, Vec<&str>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            continue;
        }
        deps.insert(module_name(path), (path, rest.split_whitespace().collect()));
    }
    let builtin: HashSet<String> = modules_builtin
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect();

    let mut order = Vec::new();
    let mut done = HashSet::new();
    for &name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) && !deps.contains_key(&name) {
            continue;
        }
        if !deps.contains_key(&name) {
            return Err(ImageError::ModuleNotFound {
                name,
                modules_dep: modules_dep_path.to_owned(),
            });
        }
        visit(&name, &deps, &mut done, &mut HashSet::new(), &mut order);
    }
    Ok(order)
}

/// Post-order walk: every dependency (with its own dependencies) before the module itself.
/// `modules.dep` already lists the transitive closure, but in no order guaranteed to suit a
/// loader that goes front to back; recursing through each dependency's own line makes the
/// result right whatever that order is.
fn visit(
    name: &str,
    deps: &HashMap<String, (&str, Vec<&str>)>,
    done: &mut HashSet<String>,
    in_progress: &mut HashSet<String>,
    order: &mut Vec<String>,
) {
    if done.contains(name) || !in_progress.insert(name.to_owned()) {
        // Already placed, or a cycle (which depmod never writes): nothing more to do.
        return;
    }
    if let Some((path, dependencies)) = deps.get(name) {
        for dep in dependencies {
            visit(&module_name(dep), deps, done, in_progress, order);
        }
        order.push((*path).to_owned());
    }
    in_progress.remove(name);
    done.insert(name.to_owned());
}

/// Reads a module file as the guest needs it: decompressed, so that `finit_module` takes it
/// whatever the kernel's `MODULE_DECOMPRESS` setting.
pub(crate) fn read_module_decompressed(path: &Path) -> Result<Vec<u8>, ImageError> {
    let raw = fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_owned(),
        source,
    })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let format = match strip_compression(name).1 {
        None => return Ok(raw),
        Some("xz") => Compression::Xz,
        Some("gz") => Compression::Gzip,
        Some(_) => {
            return Err(ImageError::UnsupportedModuleCompression {
                path: path.to_owned(),
            })
        }
    };
    let decoded =
        decompress(format, &raw).ok_or_else(|| ImageError::UnsupportedModuleCompression {
            path: path.to_owned(),
        })?;
    decoded.map_err(|source| ImageError::ModuleDecompress {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/unrelated.ko:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio_balloon.ko\nkernel/fs/ext4/ext4.ko\n";

    fn resolve(wanted: &[&str]) -> Result<Vec<String>, ImageError> {
        resolve_load_order(DEP, BUILTIN, wanted, Path::new("modules.dep"))
    }

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|p| module_name(p) == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn dependencies_come_first_without_duplicates() {
        let order = resolve(&[
            "virtio_pci",
            "virtio_blk",
            "vmw_vsock_virtio_transport",
            "virtio_balloon",
            "virtio_rng",
        ])
        .unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        let unique: HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "duplicates in {names:?}");
        assert_eq!(names.len(), 10, "{names:?}");
        for (module, dep) in [
            ("virtio_pci", "virtio"),
            ("virtio_pci", "virtio_ring"),
            ("virtio_pci", "virtio_pci_modern_dev"),
            ("virtio_blk", "virtio"),
            (
                "vmw_vsock_virtio_transport",
                "vmw_vsock_virtio_transport_common",
            ),
            ("vmw_vsock_virtio_transport_common", "vsock"),
            ("virtio_rng", "virtio_ring"),
            ("virtio", "virtio_ring"),
        ] {
            assert!(
                pos(&order, dep) < pos(&order, module),
                "{dep} after {module}"
            );
        }
        assert!(!names.contains(&"unrelated".to_owned()));
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let order = resolve(&["virtio_balloon", "ext4", "virtio_blk"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko"
            ]
        );
    }

    #[test]
    fn unknown_module_is_a_typed_error() {
        let err = resolve(&["virtio_pci", "no_such_driver"]).unwrap_err();
        assert!(
            matches!(&err, ImageError::ModuleNotFound { name, .. } if name == "no_such_driver"),
            "{err:?}"
        );
    }

    #[test]
    fn names_and_guest_file_names() {
        assert_eq!(module_name("kernel/a/virtio-rng.ko.xz"), "virtio_rng");
        assert_eq!(module_name("kernel/a/9p.ko"), "9p");
        let m = ModuleFile {
            rel: "kernel/a/virtio-rng.ko.zst".into(),
            path: PathBuf::new(),
        };
        assert_eq!(m.guest_name(), "virtio-rng.ko");
    }

    #[test]
    fn compressed_modules_are_decompressed_and_zstd_refused() {
        let dir = tempfile::tempdir().unwrap();
        let xz = dir.path().join("m.ko.xz");
        fs::write(&xz, crate::kernel::tests::xz(b"\x7fELF module")).unwrap();
        assert_eq!(read_module_decompressed(&xz).unwrap(), b"\x7fELF module");
        let zst = dir.path().join("m.ko.zst");
        fs::write(&zst, b"whatever").unwrap();
        let err = read_module_decompressed(&zst).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsupportedModuleCompression { .. }),
            "{err:?}"
        );
        let plain = dir.path().join("m.ko");
        fs::write(&plain, b"plain").unwrap();
        assert_eq!(read_module_decompressed(&plain).unwrap(), b"plain");
    }

    #[test]
    fn locate_needs_exactly_one_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let err = KernelTree::locate(dir.path()).unwrap_err();
        assert!(matches!(err, ImageError::KernelMissing { .. }), "{err:?}");
        for v in ["6.1.0-1-amd64", "6.1.0-2-amd64"] {
            fs::create_dir_all(dir.path().join("boot")).unwrap();
            fs::write(dir.path().join(format!("boot/vmlinuz-{v}")), b"").unwrap();
            fs::create_dir_all(dir.path().join("lib/modules").join(v)).unwrap();
        }
        let err = KernelTree::locate(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ImageError::MultipleKernels { versions, .. } if versions.len() == 2),
            "{err:?}"
        );
        fs::remove_dir_all(dir.path().join("lib/modules/6.1.0-1-amd64")).unwrap();
        let tree = KernelTree::locate(dir.path()).unwrap();
        assert!(tree.vmlinuz.ends_with("boot/vmlinuz-6.1.0-2-amd64"));
        let err = tree.load_order(&["virtio_pci"]).unwrap_err();
        assert!(
            matches!(err, ImageError::ModulesDepMissing { .. }),
            "{err:?}"
        );
    }
}
