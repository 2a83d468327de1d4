//! Builds the utility VM's boot files: an uncompressed ELF `vmlinux` and an uncompressed newc
//! initramfs holding the agent as `/init` and busybox-static. The kernel is one of two flavours
//! ([`KernelFlavor`]): ours, built by `scripts/build-kernel.sh` with every driver built in
//! (the initramfs then carries no modules), or Debian's package, whose `vmlinux` is extracted
//! from its `vmlinuz` and whose drivers go into the initramfs as modules, with their load order.
//!
//! Images are content-addressed: `$cache/images/<id>/{vmlinux,initramfs.cpio}` where `<id>`
//! is a SHA-256 over every input (flavour, kernel bytes, agent, busybox, module files, format
//! version), so a rebuilt agent or kernel yields a new image and an unchanged one is reused.
//! Images are built in a temporary directory beside their final place and renamed into it, so
//! a crash never leaves a half-written image behind.
//!
//! Where the inputs come from: `scripts/setup.sh` downloads and unpacks Debian's kernel package
//! and installs busybox-static; `scripts/build-kernel.sh` builds our kernel; `make agent` builds
//! the agent.

#![warn(missing_docs)]

mod cache;
mod error;
mod flavor;
mod initramfs;
mod kernel;
mod modules;

use std::env;
use std::path::{Path, PathBuf};

pub use cache::{build_image, ensure_image};
pub use error::ImageError;
pub use flavor::{our_vmlinux, KernelFlavor, KERNEL_ENV, OUR_KERNEL_CURRENT};
pub use initramfs::{GUEST_MODULE_DIR, LOAD_ORDER_FILE};

/// The kernel modules the guest loads at boot with Debian's kernel (with their dependencies,
/// resolved from `modules.dep`). Debian builds all of these as modules; any that a kernel builds
/// in is skipped. Our kernel builds them all in (`kernel/uvm.config`) and gets none.
pub const GUEST_MODULES: &[&str] = &[
    // The PCI transport of every virtio device on q35: without it no virtio device appears.
    "virtio_pci",
    // The MMIO transport of every virtio device on microvm (devices announced on the kernel
    // command line as `virtio_mmio.device=…`, which a module still receives).
    "virtio_mmio",
    // The host↔guest channel (vhost-user-vsock-pci / vhost-vsock-pci): the agent's link.
    "vmw_vsock_virtio_transport",
    // virtio-blk disks (the scratch disk, layers, hot-plugged disks).
    "virtio_blk",
    // virtio-scsi controller and the SCSI disk driver for the scsi-hd disks behind it.
    "virtio_scsi",
    "sd_mod",
    // virtio-net NICs.
    "virtio_net",
    // Memory balloon: the host reclaims guest memory and reads memory statistics.
    "virtio_balloon",
    // virtio-mem: memory hot-plug (UpdateMemory).
    "virtio_mem",
    // virtio-serial: console / fallback channel to the host.
    "virtio_console",
    // virtio-rng: entropy from the host, so the guest CRNG is ready early.
    "virtio_rng",
    // Shared directories over 9p (virtio transport and the filesystem).
    "9pnet_virtio",
    "9p",
    // Filesystems for container layers and scratch space.
    "ext4",
    // ext4/jbd2 want crc32c through the crypto API (a soft dependency that modules.dep does
    // not list and that the guest, without modprobe, cannot resolve): metadata_csum needs it.
    "crc32c_generic",
    "overlay",
];

/// Where an image's inputs are and where images are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Which kernel the image boots.
    pub kernel: KernelFlavor,
    /// [`KernelFlavor::Debian`]: the root of the unpacked kernel package (`dpkg -x`): holds
    /// `boot/vmlinuz-<ver>` and `lib/modules/<ver>/`.
    pub kernel_root: PathBuf,
    /// [`KernelFlavor::Ours`]: the ELF `vmlinux` built by `scripts/build-kernel.sh`
    /// (by default `<cache>/kernel/ours/current/vmlinux`, see [`our_vmlinux`]).
    pub our_vmlinux: PathBuf,
    /// The agent binary, installed as `/init`. Must be static.
    pub agent: PathBuf,
    /// busybox, installed as `/bin/busybox` with one symlink per applet. Must be static.
    pub busybox: PathBuf,
    /// The cache root; images go to `images/<id>/` under it.
    pub cache_dir: PathBuf,
}

/// A built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// SHA-256 (hex) over all inputs.
    pub id: String,
    /// The uncompressed ELF kernel, booted through its PVH entry.
    pub kernel: PathBuf,
    /// The newc initramfs (uncompressed).
    pub initramfs: PathBuf,
}

/// The agent's path relative to the cargo `target` directory (what `make agent` produces).
const AGENT_IN_TARGET: &str = "x86_64-unknown-linux-gnu/agent/uvm-agent";

impl ImageSpec {
    /// The default spec, checked: cache `$UVMCTL_CACHE`, else `$XDG_CACHE_HOME/uvmctl`, else
    /// `$HOME/.cache/uvmctl`; kernel: `$UVM_KERNEL` (`ours` or `debian`) if set, else ours
    /// when `<cache>/kernel/ours/current/vmlinux` exists, else Debian's from
    /// `<cache>/kernel/debian`; busybox `/bin/busybox`; agent `$UVM_AGENT`, else
    /// `target/x86_64-unknown-linux-gnu/agent/uvm-agent` in the nearest `target` directory
    /// above the running executable.
    ///
    /// # Errors
    ///
    /// [`ImageError::NoCacheDir`] when no cache directory can be named,
    /// [`ImageError::UnknownKernelFlavor`] for a bad `$UVM_KERNEL`, [`ImageError::CurrentExe`]
    /// or [`ImageError::NoTargetDir`] when the default agent path cannot be found, and any
    /// error of [`ImageSpec::check`].
    pub fn from_env() -> Result<ImageSpec, ImageError> {
        ImageSpec::from_env_with(None)
    }

    /// [`ImageSpec::from_env`] with the kernel flavour given by the caller (a `--kernel` flag)
    /// instead of `$UVM_KERNEL` or the default choice.
    ///
    /// # Errors
    ///
    /// As [`ImageSpec::from_env`].
    pub fn from_env_with(kernel: Option<KernelFlavor>) -> Result<ImageSpec, ImageError> {
        let cache_dir = default_cache_dir(|k| env::var_os(k))?;
        let our_vmlinux = flavor::our_vmlinux(&cache_dir);
        let kernel = match kernel {
            Some(k) => k,
            None => flavor::choose(env::var_os(KERNEL_ENV).as_deref(), &our_vmlinux)?,
        };
        let agent = match env::var_os("UVM_AGENT").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => {
                let exe = env::current_exe().map_err(|source| ImageError::CurrentExe { source })?;
                agent_for_exe(&exe)?
            }
        };
        let spec = ImageSpec {
            kernel,
            kernel_root: cache_dir.join("kernel/debian"),
            our_vmlinux,
            agent,
            busybox: PathBuf::from("/bin/busybox"),
            cache_dir,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks that the inputs exist (cheaply: no hashing, no reading of big files), with an
    /// error naming the command that produces whatever is missing.
    ///
    /// # Errors
    ///
    /// [`ImageError::AgentMissing`], [`ImageError::BusyboxMissing`] or
    /// [`ImageError::OurKernelMissing`] for a missing input; [`ImageError::NotStatic`] for a
    /// dynamically linked agent or busybox; [`ImageError::OurKernelNotElf`] when our kernel is
    /// not an x86-64 ELF file; [`ImageError::KernelMissing`],
    /// [`ImageError::MultipleKernels`] or [`ImageError::Read`] when Debian's kernel cannot be
    /// located under [`ImageSpec::kernel_root`].
    pub fn check(&self) -> Result<(), ImageError> {
        if !self.agent.is_file() {
            return Err(ImageError::AgentMissing {
                path: self.agent.clone(),
            });
        }
        if !self.busybox.is_file() {
            return Err(ImageError::BusyboxMissing {
                path: self.busybox.clone(),
            });
        }
        // The ELF and program headers are at the start of the file.
        for path in [&self.agent, &self.busybox] {
            check_static(path, &read_prefix(path, 64 * 1024)?)?;
        }
        match self.kernel {
            KernelFlavor::Debian => {
                modules::KernelTree::locate(&self.kernel_root)?;
            }
            KernelFlavor::Ours => {
                if !self.our_vmlinux.is_file() {
                    return Err(ImageError::OurKernelMissing {
                        path: self.our_vmlinux.clone(),
                    });
                }
                // The ELF and program headers come first; the PVH note is checked on the
                // whole file when the image is built.
                if !kernel::is_x86_64_elf(&read_prefix(&self.our_vmlinux, 64)?) {
                    return Err(ImageError::OurKernelNotElf {
                        path: self.our_vmlinux.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Refuses a dynamically linked binary: the initramfs has no loader and no libraries.
fn check_static(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    if kernel::is_dynamic_elf(data) {
        return Err(ImageError::NotStatic {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn read_prefix(path: &Path, len: u64) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(len).read_to_end(&mut data))
        .map_err(|source| ImageError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(data)
}

/// `$UVMCTL_CACHE`, else `$XDG_CACHE_HOME/uvmctl`, else `$HOME/.cache/uvmctl` (empty values
/// count as unset, as in the XDG spec).
/// The cache directory [`ImageSpec::from_env`] uses: `$UVMCTL_CACHE`, else
/// `$XDG_CACHE_HOME/uvmctl`, else `$HOME/.cache/uvmctl`.
pub fn cache_dir_from_env() -> Result<PathBuf, ImageError> {
    default_cache_dir(|k| env::var_os(k))
}

fn default_cache_dir(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<PathBuf, ImageError> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = get("UVMCTL_CACHE") {
        return Ok(dir);
    }
    if let Some(dir) = get("XDG_CACHE_HOME") {
        return Ok(dir.join("uvmctl"));
    }
    get("HOME")
        .map(|home| home.join(".cache/uvmctl"))
        .ok_or(ImageError::NoCacheDir)
}

/// The agent path for a program running from `exe`: the nearest ancestor named `target`.
fn agent_for_exe(exe: &Path) -> Result<PathBuf, ImageError> {
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.file_name().is_some_and(|n| n == "target"))
        .map(|target| target.join(AGENT_IN_TARGET))
        .ok_or_else(|| ImageError::NoTargetDir {
            exe: exe.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn cache_dir_precedence() {
        fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        }
        let all = [
            ("UVMCTL_CACHE", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(default_cache_dir(env(&all)).unwrap(), Path::new("/c"));
        let xdg = [
            ("UVMCTL_CACHE", ""),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            default_cache_dir(env(&xdg)).unwrap(),
            Path::new("/x/uvmctl")
        );
        let home = [("HOME", "/h")];
        assert_eq!(
            default_cache_dir(env(&home)).unwrap(),
            Path::new("/h/.cache/uvmctl")
        );
        let err = default_cache_dir(env(&[])).unwrap_err();
        assert!(matches!(err, ImageError::NoCacheDir), "{err:?}");
    }

    #[test]
    fn agent_is_found_from_the_target_directory() {
        let agent = agent_for_exe(Path::new("/w/main/target/debug/deps/uvm_image-123")).unwrap();
        assert_eq!(
            agent,
            Path::new("/w/main/target/x86_64-unknown-linux-gnu/agent/uvm-agent")
        );
        let err = agent_for_exe(Path::new("/usr/local/bin/uvmctl")).unwrap_err();
        assert!(matches!(err, ImageError::NoTargetDir { .. }), "{err:?}");
    }

    #[test]
    fn check_names_the_missing_input() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("exists");
        std::fs::write(&file, b"x").unwrap();
        let spec = ImageSpec {
            kernel: KernelFlavor::Debian,
            kernel_root: dir.path().join("kernel"),
            our_vmlinux: dir.path().join("ours/vmlinux"),
            agent: dir.path().join("no-agent"),
            busybox: file.clone(),
            cache_dir: dir.path().join("cache"),
        };
        let err = spec.check().unwrap_err();
        assert!(matches!(err, ImageError::AgentMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("make agent"), "{err}");
        let spec = ImageSpec {
            agent: file.clone(),
            busybox: dir.path().join("no-busybox"),
            ..spec
        };
        let err = spec.check().unwrap_err();
        assert!(matches!(err, ImageError::BusyboxMissing { .. }), "{err:?}");
        let spec = ImageSpec {
            busybox: file,
            ..spec
        };
        let err = spec.check().unwrap_err();
        assert!(matches!(err, ImageError::KernelMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("scripts/setup.sh"), "{err}");
        let spec = ImageSpec {
            kernel: KernelFlavor::Ours,
            ..spec
        };
        let err = spec.check().unwrap_err();
        assert!(
            matches!(err, ImageError::OurKernelMissing { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("scripts/build-kernel.sh"), "{err}");
        std::fs::create_dir_all(spec.our_vmlinux.parent().unwrap()).unwrap();
        std::fs::write(&spec.our_vmlinux, b"MZ a PE file").unwrap();
        let err = spec.check().unwrap_err();
        assert!(matches!(err, ImageError::OurKernelNotElf { .. }), "{err:?}");
        std::fs::write(&spec.our_vmlinux, kernel::tests::fake_elf(&[])).unwrap();
        spec.check().unwrap();
    }
}
