//! The one error type of image building: every variant names the file it is about, and the
//! ones a user can fix say which command fixes them.

use std::path::PathBuf;

/// Why an image could not be located, built or reused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No cache directory: none of `UVMCTL_CACHE`, `XDG_CACHE_HOME`, `HOME` is set.
    #[error("no cache directory: set UVMCTL_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,

    /// The running executable's path could not be determined (to find the agent next to it).
    #[error("cannot determine the path of the running executable to locate the agent")]
    CurrentExe {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The running executable is not under a cargo `target` directory, so there is no default
    /// agent path.
    #[error(
        "cannot locate the agent: {exe} is not inside a cargo `target` directory; set UVM_AGENT"
    )]
    NoTargetDir {
        /// The running executable.
        exe: PathBuf,
    },

    /// The agent binary does not exist.
    #[error(
        "the agent binary {path} does not exist; build it with `make agent` (or set UVM_AGENT)"
    )]
    AgentMissing {
        /// Where the agent was expected.
        path: PathBuf,
    },

    /// No kernel under the kernel root.
    #[error("no Debian kernel (boot/vmlinuz-<ver> with lib/modules/<ver>) under {root}; run scripts/setup.sh")]
    KernelMissing {
        /// The kernel root that was searched.
        root: PathBuf,
    },

    /// More than one kernel version under the kernel root: which one to boot is ambiguous.
    #[error("more than one kernel under {root} ({versions:?}); keep one (scripts/setup.sh unpacks exactly one)")]
    MultipleKernels {
        /// The kernel root that was searched.
        root: PathBuf,
        /// The kernel versions found there.
        versions: Vec<String>,
    },

    /// `modules.dep` is missing: Debian's package does not ship it, `depmod` makes it.
    #[error("{path} does not exist; run scripts/setup.sh (it runs depmod on the unpacked kernel)")]
    ModulesDepMissing {
        /// Where `modules.dep` was expected.
        path: PathBuf,
    },

    /// busybox does not exist.
    #[error("busybox {path} does not exist; run scripts/setup.sh (it installs busybox-static)")]
    BusyboxMissing {
        /// Where busybox was expected.
        path: PathBuf,
    },

    /// A binary meant for the guest needs a dynamic loader, which the initramfs does not have.
    #[error("{path} is dynamically linked, but the initramfs has no shared libraries; use a static build (busybox-static, `make agent`)")]
    NotStatic {
        /// The dynamically linked binary.
        path: PathBuf,
    },

    /// Reading a file or directory failed.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Writing a file or directory failed.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Moving a finished image into place failed.
    #[error("cannot move {from} to {to}")]
    Rename {
        /// What was being moved.
        from: PathBuf,
        /// Where it was being moved to.
        to: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The kernel image has no x86 boot protocol header.
    #[error("{path} is not an x86 bzImage (no `HdrS` boot header, or a protocol older than 2.08)")]
    NotBzImage {
        /// The kernel image.
        path: PathBuf,
    },

    /// The bzImage's payload is compressed with a format this crate does not decode.
    #[error(
        "the kernel payload in {path} is compressed with {format}; only xz and gzip are supported"
    )]
    UnsupportedKernelCompression {
        /// The kernel image.
        path: PathBuf,
        /// The compression found (or "an unrecognised format").
        format: String,
    },

    /// Decompressing the kernel payload failed.
    #[error("cannot decompress the kernel payload in {path}")]
    KernelDecompress {
        /// The kernel image.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },

    /// The decompressed kernel is not an ELF file, so QEMU could not boot it through PVH.
    #[error("the kernel decompressed from {path} is not an ELF vmlinux")]
    NotElf {
        /// The kernel image it was decompressed from.
        path: PathBuf,
    },

    /// `UVM_KERNEL` names no kernel flavour.
    #[error("UVM_KERNEL={value:?} is neither `ours` nor `debian`")]
    UnknownKernelFlavor {
        /// The value of `UVM_KERNEL`.
        value: String,
    },

    /// Our kernel (`KernelFlavor::Ours`) has not been built.
    #[error("our guest kernel {path} does not exist; build it with scripts/build-kernel.sh (or set UVM_KERNEL=debian)")]
    OurKernelMissing {
        /// Where our `vmlinux` was expected.
        path: PathBuf,
    },

    /// Our kernel is not a 64-bit little-endian ELF file.
    #[error("{path} is not an x86-64 ELF vmlinux; rebuild it with scripts/build-kernel.sh")]
    OurKernelNotElf {
        /// Our `vmlinux`.
        path: PathBuf,
    },

    /// The ELF kernel has no PVH entry note, so QEMU cannot boot it directly.
    #[error("{path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), so QEMU cannot boot it as an ELF; it needs CONFIG_PVH=y")]
    NoPvhEntry {
        /// The ELF kernel.
        path: PathBuf,
    },

    /// A wanted module is neither a module in `modules.dep` nor built into the kernel.
    #[error("kernel module {name} is neither listed in {modules_dep} nor built in")]
    ModuleNotFound {
        /// The module's name.
        name: String,
        /// The `modules.dep` it was looked up in.
        modules_dep: PathBuf,
    },

    /// A module file is compressed with a format this crate does not decode.
    #[error("kernel module {path} is compressed with a format uvm-image does not decode (xz and gzip are supported)")]
    UnsupportedModuleCompression {
        /// The module file.
        path: PathBuf,
    },

    /// Decompressing a module failed.
    #[error("cannot decompress kernel module {path}")]
    ModuleDecompress {
        /// The module file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },

    /// `busybox --list` could not be run.
    #[error("cannot run `{path} --list` to enumerate the busybox applets")]
    BusyboxRun {
        /// The busybox binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// `busybox --list` ran but failed.
    #[error("`{path} --list` failed ({status}) or printed no applets")]
    BusyboxList {
        /// The busybox binary.
        path: PathBuf,
        /// Its exit status, as text.
        status: String,
    },

    /// A file is too large for a newc cpio entry (4 GiB).
    #[error("{path} is too large for a cpio archive entry")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}
