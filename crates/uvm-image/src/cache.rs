//! The image cache: content-addressed image directories, built beside their final place and
//! renamed into it. The id covers the kernel flavour and the kernel's bytes, so images of our
//! kernel and of Debian's never share a cache entry.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::flavor::check_our_vmlinux;
use crate::initramfs::{write_initramfs, Contents};
use crate::modules::{read_module_decompressed, KernelTree, ModuleFile};
use crate::{check_static, kernel, Image, ImageError, ImageSpec, KernelFlavor, GUEST_MODULES};

/// Bumped whenever the layout or contents of an image change for the same inputs, so that old
/// cached images are not reused by a newer builder.
const FORMAT_VERSION: &str = "uvm-image/2";

const VMLINUX: &str = "vmlinux";
const INITRAMFS: &str = "initramfs.cpio";

/// Prefixes of the temporary entries in `images/` and `kernels/`.
const TMP_PREFIXES: &[&str] = &[".build-", ".old-", ".vmlinux-"];

/// Left-over temporary directories older than this are from crashed builds and get removed.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Returns the image for `spec`, building it only if the cache does not already hold it.
///
/// # Errors
///
/// Any error of [`ImageSpec::check`]; [`ImageError::Read`] for an input that cannot be read;
/// [`ImageError::ModulesDepMissing`] or [`ImageError::ModuleNotFound`] when Debian's kernel
/// lacks a module the guest loads; [`ImageError::OurKernelNotElf`] or
/// [`ImageError::NoPvhEntry`] for our kernel. When it builds, also: the errors of extracting
/// Debian's `vmlinux` from its bzImage ([`ImageError::NotBzImage`],
/// [`ImageError::UnsupportedKernelCompression`], [`ImageError::KernelDecompress`],
/// [`ImageError::NotElf`]), of decompressing a module, of running `busybox --list`
/// ([`ImageError::BusyboxRun`], [`ImageError::BusyboxList`]), and of writing the image and
/// moving it into place ([`ImageError::Write`], [`ImageError::Rename`]).
pub fn ensure_image(spec: &ImageSpec) -> Result<Image, ImageError> {
    let inputs = Inputs::read(spec)?;
    let image = image_paths(&spec.cache_dir, &inputs.id);
    if image.kernel.is_file() && image.initramfs.is_file() {
        return Ok(image);
    }
    build(spec, &inputs, false)
}

/// Builds the image for `spec`, replacing any cached copy.
///
/// # Errors
///
/// As [`ensure_image`] when it builds (Debian's `vmlinux` is extracted again, not reused).
pub fn build_image(spec: &ImageSpec) -> Result<Image, ImageError> {
    let inputs = Inputs::read(spec)?;
    build(spec, &inputs, true)
}

fn image_paths(cache_dir: &Path, id: &str) -> Image {
    let dir = cache_dir.join("images").join(id);
    Image {
        id: id.to_owned(),
        kernel: dir.join(VMLINUX),
        initramfs: dir.join(INITRAMFS),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    fs::read(path).map_err(|source| ImageError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every input of an image, read once: hashed for the id and, on a miss, built from.
struct Inputs {
    id: String,
    /// SHA-256 (hex) over the kernel alone: names the shared `kernels/<kernel_id>.vmlinux`.
    kernel_id: String,
    agent: Vec<u8>,
    busybox: Vec<u8>,
    kernel: KernelInput,
}

/// The kernel side of the inputs, per flavour.
enum KernelInput {
    /// Debian's: the bzImage to extract the vmlinux from, and the modules the guest loads.
    Debian {
        vmlinuz_path: PathBuf,
        vmlinuz: Vec<u8>,
        /// The module files in load order with their bytes as stored on the host.
        modules: Vec<(ModuleFile, Vec<u8>)>,
    },
    /// Ours: the ELF vmlinux itself (already checked), and no modules.
    Ours { vmlinux: Vec<u8> },
}

impl Inputs {
    fn read(spec: &ImageSpec) -> Result<Inputs, ImageError> {
        spec.check()?;
        let agent = read(&spec.agent)?;
        check_static(&spec.agent, &agent)?;
        let busybox = read(&spec.busybox)?;
        check_static(&spec.busybox, &busybox)?;
        let kernel = match spec.kernel {
            KernelFlavor::Debian => {
                let tree = KernelTree::locate(&spec.kernel_root)?;
                let vmlinuz = read(&tree.vmlinuz)?;
                let modules = tree
                    .load_order(GUEST_MODULES)?
                    .into_iter()
                    .map(|m| read(&m.path).map(|bytes| (m, bytes)))
                    .collect::<Result<Vec<_>, _>>()?;
                KernelInput::Debian {
                    vmlinuz_path: tree.vmlinuz,
                    vmlinuz,
                    modules,
                }
            }
            KernelFlavor::Ours => {
                let vmlinux = read(&spec.our_vmlinux)?;
                check_our_vmlinux(&spec.our_vmlinux, &vmlinux)?;
                KernelInput::Ours { vmlinux }
            }
        };

        let flavor = spec.kernel.name().as_bytes();
        let kernel_id = match &kernel {
            // Unchanged from before flavours existed, so that the extracted kernel is reused.
            KernelInput::Debian { vmlinuz, .. } => {
                hash(&[("format", FORMAT_VERSION.as_bytes()), ("vmlinuz", vmlinuz)])
            }
            KernelInput::Ours { vmlinux } => hash(&[
                ("format", FORMAT_VERSION.as_bytes()),
                ("flavor", flavor),
                ("vmlinux", vmlinux),
            ]),
        };
        let mut fields = vec![
            ("format", FORMAT_VERSION.as_bytes()),
            ("agent", &agent),
            ("busybox", &busybox),
            ("flavor", flavor),
            ("kernel", kernel_id.as_bytes()),
        ];
        if let KernelInput::Debian { modules, .. } = &kernel {
            for (m, bytes) in modules {
                fields.push(("module", m.rel.as_bytes()));
                fields.push(("bytes", bytes));
            }
        }
        let id = hash(&fields);
        Ok(Inputs {
            id,
            kernel_id,
            agent,
            busybox,
            kernel,
        })
    }
}

/// SHA-256 (hex) over tagged, length-prefixed fields, so that no two field lists hash alike.
fn hash(fields: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (tag, data) in fields {
        h.update(tag.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds into `images/.build-*`, then renames it to `images/<id>`.
fn build(spec: &ImageSpec, inputs: &Inputs, force: bool) -> Result<Image, ImageError> {
    let images = spec.cache_dir.join("images");
    fs::create_dir_all(&images).map_err(|source| ImageError::Write {
        path: images.clone(),
        source,
    })?;
    remove_stale(&images);
    remove_stale(&spec.cache_dir.join("kernels"));
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&images)
        .map_err(|source| ImageError::Write {
            path: images.clone(),
            source,
        })?;

    // Temporary directories are created 0700; an image is as readable as its inputs.
    set_mode(tmp.path(), 0o755)?;
    place_vmlinux(spec, inputs, &tmp.path().join(VMLINUX), force)?;

    let applets = busybox_applets(&spec.busybox)?;
    let modules = match &inputs.kernel {
        KernelInput::Debian { modules, .. } => Some(
            modules
                .iter()
                .map(|(m, _)| {
                    read_module_decompressed(&m.path).map(|bytes| (m.guest_name(), bytes))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        KernelInput::Ours { .. } => None,
    };
    let contents = Contents {
        agent: &inputs.agent,
        busybox: &inputs.busybox,
        applets: &applets,
        modules: modules.as_deref(),
    };
    let initramfs = tmp.path().join(INITRAMFS);
    write_synced(&initramfs, |w| write_initramfs(&contents, w).map(drop))?;
    set_mode(&initramfs, 0o644)?;

    let image = image_paths(&spec.cache_dir, &inputs.id);
    let complete = |image: &Image| image.kernel.is_file() && image.initramfs.is_file();
    let final_dir = &images.join(&inputs.id);
    if final_dir.exists() {
        if complete(&image) && !force {
            // Another builder finished the same image meanwhile, and a VM may already be using
            // it: keep it (ours is dropped with `tmp`).
            return Ok(image);
        }
        // A forced rebuild, or a damaged image: move the old directory aside first (rename
        // cannot replace a non-empty directory, but can replace an empty one, which gives a
        // unique name). Between the two renames there is no image, never half of one.
        let old = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(&images)
            .map_err(|source| ImageError::Write {
                path: images.clone(),
                source,
            })?
            .keep();
        rename(final_dir, &old)?;
        // Best effort: a failure leaves a stale directory that a later build removes.
        let _ = fs::remove_dir_all(&old);
    }
    let built = tmp.keep();
    if let Err(source) = fs::rename(&built, final_dir) {
        let _ = fs::remove_dir_all(&built);
        // Another builder may have put the same image in place meanwhile: it is as good as ours.
        if complete(&image) {
            return Ok(image);
        }
        return Err(ImageError::Rename {
            from: built,
            to: final_dir.to_owned(),
            source,
        });
    }
    Ok(image)
}

/// Puts the vmlinux at `dest`. The extracted kernel (~65 MB for Debian's) depends on the
/// vmlinuz only, so images share one copy per kernel, `kernels/<kernel_id>.vmlinux`, through
/// hard links: a rebuilt agent then costs a new initramfs, not another kernel. `force`
/// re-extracts it (images already linked to the old copy keep it). Our kernel goes the same
/// way, written from the very bytes that were hashed (not linked to the build's output, which
/// a rebuild may replace meanwhile).
fn place_vmlinux(
    spec: &ImageSpec,
    inputs: &Inputs,
    dest: &Path,
    force: bool,
) -> Result<(), ImageError> {
    let kernels = spec.cache_dir.join("kernels");
    let shared = kernels.join(format!("{}.vmlinux", inputs.kernel_id));
    if force || !shared.is_file() {
        let extracted;
        let vmlinux: &[u8] = match &inputs.kernel {
            KernelInput::Debian {
                vmlinuz_path,
                vmlinuz,
                ..
            } => {
                extracted = kernel::extract_vmlinux(vmlinuz_path, vmlinuz)?;
                &extracted
            }
            KernelInput::Ours { vmlinux } => vmlinux,
        };
        fs::create_dir_all(&kernels).map_err(|source| ImageError::Write {
            path: kernels.clone(),
            source,
        })?;
        let tmp = tempfile::Builder::new()
            .prefix(".vmlinux-")
            .tempfile_in(&kernels)
            .map_err(|source| ImageError::Write {
                path: kernels.clone(),
                source,
            })?;
        write_file_synced(tmp.as_file(), tmp.path(), |w| w.write_all(vmlinux))?;
        // Temporary files are created 0600; the kernel is no secret (and QEMU may run as
        // another user).
        set_mode(tmp.path(), 0o644)?;
        tmp.persist(&shared).map_err(|e| ImageError::Rename {
            from: e.file.path().to_owned(),
            to: shared.clone(),
            source: e.error,
        })?;
    }
    // Hard links need one filesystem that supports them; otherwise fall back to a copy.
    if fs::hard_link(&shared, dest).is_err() {
        fs::copy(&shared, dest).map_err(|source| ImageError::Write {
            path: dest.to_owned(),
            source,
        })?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        ImageError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::rename(from, to).map_err(|source| ImageError::Rename {
        from: from.to_owned(),
        to: to.to_owned(),
        source,
    })
}

/// Writes a file and syncs it to disk, so that once renamed into place it is complete even
/// after a power loss.
fn write_synced(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&fs::File>) -> std::io::Result<()>,
) -> Result<(), ImageError> {
    let file = fs::File::create(path).map_err(|source| ImageError::Write {
        path: path.to_owned(),
        source,
    })?;
    write_file_synced(&file, path, write)
}

fn write_file_synced(
    file: &fs::File,
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&fs::File>) -> std::io::Result<()>,
) -> Result<(), ImageError> {
    let err = |source| ImageError::Write {
        path: path.to_owned(),
        source,
    };
    let mut w = BufWriter::new(file);
    write(&mut w).map_err(err)?;
    w.flush().map_err(err)?;
    drop(w);
    file.sync_all().map_err(err)
}

/// The applet names `busybox --list` prints (one per line).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|source| ImageError::BusyboxRun {
            path: busybox.to_owned(),
            source,
        })?;
    let applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if !out.status.success() || applets.is_empty() {
        return Err(ImageError::BusyboxList {
            path: busybox.to_owned(),
            status: out.status.to_string(),
        });
    }
    Ok(applets)
}

/// Removes temporary entries (`.build-*`, `.old-*`, `.vmlinux-*`) left by crashed builds. Recent ones may belong to
/// a build still running in another process, so only old ones go.
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !TMP_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(path)
            } else {
                fs::remove_file(path)
            };
        }
    }
}

#[cfg(test)]
mod tests;
