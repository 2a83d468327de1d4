//! Which guest kernel an image boots, and how the default is chosen.
//!
//! - [`KernelFlavor::Ours`]: built by `scripts/build-kernel.sh` from `kernel/uvm.config` with
//!   every driver built in; its ELF `vmlinux` is used as it is and the initramfs carries no
//!   modules. Boots much faster than Debian's and takes less host memory: nothing is probed
//!   or loaded that a utility VM does not have (the side-by-side figures are in
//!   BENCHMARKS.md, "Our kernel and Debian's, from one run").
//! - [`KernelFlavor::Debian`]: Debian's `linux-image-*-amd64` unpacked by `scripts/setup.sh`;
//!   the `vmlinux` is extracted from its `vmlinuz` and the drivers ship as modules.
//!
//! The default is ours when it has been built, else Debian's; `UVM_KERNEL=ours|debian` forces
//! one, and forcing ours before it is built is an error rather than a silent fallback.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::kernel;
use crate::ImageError;

/// The environment variable that forces a kernel flavour: `ours` or `debian`.
pub const KERNEL_ENV: &str = "UVM_KERNEL";

/// Where `scripts/build-kernel.sh` points at the kernel it built last, under the cache root.
pub const OUR_KERNEL_CURRENT: &str = "kernel/ours/current";

/// Which kernel an image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFlavor {
    /// Our own kernel (`scripts/build-kernel.sh`): drivers built in, no modules.
    Ours,
    /// Debian's kernel package (`scripts/setup.sh`): drivers as modules in the initramfs.
    Debian,
}

impl KernelFlavor {
    /// The flavour's name, as `UVM_KERNEL` spells it.
    pub fn name(self) -> &'static str {
        match self {
            KernelFlavor::Ours => "ours",
            KernelFlavor::Debian => "debian",
        }
    }
}

impl fmt::Display for KernelFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KernelFlavor {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<KernelFlavor, ImageError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ours" => Ok(KernelFlavor::Ours),
            "debian" => Ok(KernelFlavor::Debian),
            _ => Err(ImageError::UnknownKernelFlavor {
                value: s.to_owned(),
            }),
        }
    }
}

/// The `vmlinux` of our kernel under the cache root: `kernel/ours/current/vmlinux`.
pub fn our_vmlinux(cache_dir: &Path) -> PathBuf {
    cache_dir.join(OUR_KERNEL_CURRENT).join("vmlinux")
}

/// Picks the flavour: `forced` (the value of `UVM_KERNEL`; empty counts as unset) if given,
/// else ours when `ours_vmlinux` exists, else Debian's. A forced `ours` that is not built is
/// [`ImageError::OurKernelMissing`].
pub(crate) fn choose(
    forced: Option<&OsStr>,
    ours_vmlinux: &Path,
) -> Result<KernelFlavor, ImageError> {
    let forced = forced.filter(|v| !v.is_empty());
    let flavor = match forced {
        Some(value) => value.to_string_lossy().parse::<KernelFlavor>()?,
        None if ours_vmlinux.is_file() => KernelFlavor::Ours,
        None => KernelFlavor::Debian,
    };
    if flavor == KernelFlavor::Ours && !ours_vmlinux.is_file() {
        return Err(ImageError::OurKernelMissing {
            path: ours_vmlinux.to_owned(),
        });
    }
    Ok(flavor)
}

/// Checks our `vmlinux` (its first bytes, or all of it): an x86-64 ELF file with a PVH entry
/// note, which is what QEMU needs to boot it directly. A note past `data` counts as missing,
/// so pass the whole file (or at least its headers and notes, which come first).
pub(crate) fn check_our_vmlinux(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    if !kernel::is_x86_64_elf(data) {
        return Err(ImageError::OurKernelNotElf {
            path: path.to_owned(),
        });
    }
    if !kernel::has_pvh_note(data) {
        return Err(ImageError::NoPvhEntry {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in [KernelFlavor::Ours, KernelFlavor::Debian] {
            assert_eq!(f.to_string().parse::<KernelFlavor>().unwrap(), f);
        }
        assert_eq!(
            " Debian ".parse::<KernelFlavor>().unwrap(),
            KernelFlavor::Debian
        );
        let err = "fedora".parse::<KernelFlavor>().unwrap_err();
        assert!(
            matches!(&err, ImageError::UnknownKernelFlavor { value } if value == "fedora"),
            "{err:?}"
        );
    }

    #[test]
    fn default_is_ours_when_built_else_debian() {
        let dir = tempfile::tempdir().unwrap();
        let vmlinux = our_vmlinux(dir.path());
        assert_eq!(choose(None, &vmlinux).unwrap(), KernelFlavor::Debian);
        assert_eq!(
            choose(Some(OsStr::new("")), &vmlinux).unwrap(),
            KernelFlavor::Debian
        );
        std::fs::create_dir_all(vmlinux.parent().unwrap()).unwrap();
        std::fs::write(&vmlinux, b"\x7fELF").unwrap();
        assert_eq!(choose(None, &vmlinux).unwrap(), KernelFlavor::Ours);
        // Forcing Debian's wins over a built kernel of ours.
        assert_eq!(
            choose(Some(OsStr::new("debian")), &vmlinux).unwrap(),
            KernelFlavor::Debian
        );
        assert_eq!(
            choose(Some(OsStr::new("ours")), &vmlinux).unwrap(),
            KernelFlavor::Ours
        );
    }

    #[test]
    fn forced_ours_that_is_not_built_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let vmlinux = our_vmlinux(dir.path());
        let err = choose(Some(OsStr::new("ours")), &vmlinux).unwrap_err();
        assert!(
            matches!(&err, ImageError::OurKernelMissing { path } if *path == vmlinux),
            "{err:?}"
        );
        assert!(err.to_string().contains("scripts/build-kernel.sh"), "{err}");
        let err = choose(Some(OsStr::new("mine")), &vmlinux).unwrap_err();
        assert!(
            matches!(err, ImageError::UnknownKernelFlavor { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn our_vmlinux_must_be_a_pvh_elf() {
        let path = Path::new("vmlinux");
        let err = check_our_vmlinux(path, b"MZ not an elf").unwrap_err();
        assert!(matches!(err, ImageError::OurKernelNotElf { .. }), "{err:?}");
        let no_note = kernel::tests::fake_elf(&[]);
        let err = check_our_vmlinux(path, &no_note).unwrap_err();
        assert!(matches!(err, ImageError::NoPvhEntry { .. }), "{err:?}");
        let pvh = kernel::tests::fake_elf(&[kernel::tests::PVH_NOTE]);
        check_our_vmlinux(path, &pvh).unwrap();
    }
}
