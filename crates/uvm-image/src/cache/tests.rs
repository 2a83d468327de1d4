//! Whole-image tests on a synthetic kernel tree: what goes into the initramfs, and when the
//! cache is reused or rebuilt.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::initramfs::tests::parse;
use crate::kernel::tests::{fake_bzimage, fake_elf, xz, PVH_NOTE};

const VERSION: &str = "6.1.0-99-amd64";
const VMLINUX_BYTES: &[u8] = b"\x7fELF\x02\x01 the pretend kernel";

/// A kernel root with every module of GUEST_MODULES present (one xz-compressed, two built in)
/// and a `virtio` dependency chain, a built kernel of ours (an ELF with the PVH note), plus a
/// fake busybox and agent. The spec picks Debian's kernel.
struct Fixture {
    _dir: tempfile::TempDir,
    spec: ImageSpec,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("kernel");
    let mods = root.join("lib/modules").join(VERSION);
    fs::create_dir_all(root.join("boot")).unwrap();
    fs::create_dir_all(mods.join("kernel/virtio")).unwrap();
    fs::write(
        root.join(format!("boot/vmlinuz-{VERSION}")),
        fake_bzimage(&xz(VMLINUX_BYTES)),
    )
    .unwrap();

    let builtin = ["ext4", "overlay"];
    let mut dep = String::from(
        "kernel/virtio/virtio_ring.ko:\nkernel/virtio/virtio.ko: kernel/virtio/virtio_ring.ko\n",
    );
    fs::write(mods.join("kernel/virtio/virtio_ring.ko"), b"ring").unwrap();
    fs::write(mods.join("kernel/virtio/virtio.ko"), b"virtio").unwrap();
    for name in GUEST_MODULES.iter().filter(|n| !builtin.contains(n)) {
        if *name == "virtio_rng" {
            // Compressed, and spelled with a dash like the real file.
            let rel = "kernel/virtio/virtio-rng.ko.xz";
            fs::write(mods.join(rel), xz(b"rng module")).unwrap();
            dep.push_str(&format!(
                "{rel}: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko\n"
            ));
        } else {
            let rel = format!("kernel/virtio/{name}.ko");
            fs::write(mods.join(&rel), format!("{name} module")).unwrap();
            dep.push_str(&format!(
                "{rel}: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko\n"
            ));
        }
    }
    fs::write(mods.join("modules.dep"), dep).unwrap();
    let builtin: String = builtin
        .iter()
        .map(|b| format!("kernel/fs/{b}.ko\n"))
        .collect();
    fs::write(mods.join("modules.builtin"), builtin).unwrap();

    let busybox = dir.path().join("busybox");
    fs::write(&busybox, "#!/bin/sh\necho sh\necho mount\necho insmod\n").unwrap();
    fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).unwrap();
    let agent = dir.path().join("uvm-agent");
    fs::write(&agent, b"\x7fELF\x02\x01 agent v1").unwrap();

    let our_vmlinux = crate::our_vmlinux(&dir.path().join("cache"));
    fs::create_dir_all(our_vmlinux.parent().unwrap()).unwrap();
    fs::write(&our_vmlinux, fake_elf(&[PVH_NOTE])).unwrap();

    let spec = ImageSpec {
        kernel: KernelFlavor::Debian,
        kernel_root: root,
        our_vmlinux,
        agent,
        busybox,
        cache_dir: dir.path().join("cache"),
    };
    Fixture { _dir: dir, spec }
}

fn ino(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

fn mtime(path: &Path) -> SystemTime {
    fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn image_holds_init_console_busybox_and_modules() {
    let f = fixture();
    let image = ensure_image(&f.spec).unwrap();
    assert_eq!(image.id.len(), 64);
    assert!(image.id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        image.kernel,
        f.spec
            .cache_dir
            .join("images")
            .join(&image.id)
            .join("vmlinux")
    );
    assert_eq!(fs::read(&image.kernel).unwrap(), VMLINUX_BYTES);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&image.kernel), 0o644);
    assert_eq!(mode(&image.initramfs), 0o644);
    assert_eq!(mode(image.kernel.parent().unwrap()), 0o755);

    let (_, map) = parse(&fs::read(&image.initramfs).unwrap());
    assert_eq!(map["init"].data, b"\x7fELF\x02\x01 agent v1");
    assert_eq!(map["init"].mode, 0o100_755);
    assert_eq!(map["dev/console"].mode & 0o170_000, 0o020_000);
    assert_eq!(map["dev/console"].rdev, (5, 1));
    assert_eq!(map["bin/insmod"].data, b"busybox");
    assert_eq!(
        map["lib/modules/uvm/virtio_pci.ko"].data,
        b"virtio_pci module"
    );
    // Shipped decompressed, under the plain .ko name.
    assert_eq!(map["lib/modules/uvm/virtio-rng.ko"].data, b"rng module");

    let order = String::from_utf8(map["lib/modules/uvm/load-order"].data.clone()).unwrap();
    let order: Vec<&str> = order.lines().collect();
    assert_eq!(&order[..2], ["virtio_ring.ko", "virtio.ko"]);
    assert!(order.contains(&"vmw_vsock_virtio_transport.ko"));
    assert!(
        !order.contains(&"ext4.ko"),
        "built-in module shipped: {order:?}"
    );
    for name in &order {
        assert!(
            map.contains_key(&format!("lib/modules/uvm/{name}")),
            "{name}"
        );
    }
    // Nothing but the image itself is left in the cache.
    let entries: Vec<_> = fs::read_dir(f.spec.cache_dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, [std::ffi::OsString::from(&image.id)]);
}

#[test]
fn cache_hit_reuses_and_changed_agent_rebuilds() {
    let f = fixture();
    let first = ensure_image(&f.spec).unwrap();
    let (kernel_mtime, initramfs_mtime) = (mtime(&first.kernel), mtime(&first.initramfs));
    std::thread::sleep(Duration::from_millis(20));

    let again = ensure_image(&f.spec).unwrap();
    assert_eq!(again, first);
    assert_eq!(mtime(&again.kernel), kernel_mtime);
    assert_eq!(mtime(&again.initramfs), initramfs_mtime);

    fs::write(&f.spec.agent, b"\x7fELF\x02\x01 agent v2").unwrap();
    let second = ensure_image(&f.spec).unwrap();
    assert_ne!(second.id, first.id);
    let (_, map) = parse(&fs::read(&second.initramfs).unwrap());
    assert_eq!(map["init"].data, b"\x7fELF\x02\x01 agent v2");
    // The old image is still there for VMs that use it.
    assert!(first.initramfs.is_file());
    // Both images share one copy of the kernel.
    assert_eq!(ino(&second.kernel), ino(&first.kernel));

    // A forced rebuild writes new files under the same id.
    let rebuilt = build_image(&f.spec).unwrap();
    assert_eq!(rebuilt, second);
    assert!(mtime(&rebuilt.initramfs) >= mtime(&first.initramfs));
    assert!(rebuilt.kernel.is_file() && rebuilt.initramfs.is_file());
    // ... including a freshly extracted kernel; the older image keeps its copy.
    assert_ne!(ino(&rebuilt.kernel), ino(&first.kernel));
    assert_eq!(fs::read(&first.kernel).unwrap(), VMLINUX_BYTES);
}

#[test]
fn a_half_built_image_is_not_reused() {
    let f = fixture();
    let image = ensure_image(&f.spec).unwrap();
    // As if a build had been interrupted after the kernel: ensure_image must rebuild.
    fs::remove_file(&image.initramfs).unwrap();
    let again = ensure_image(&f.spec).unwrap();
    assert_eq!(again, image);
    assert!(again.initramfs.is_file());
}

#[test]
fn dynamic_busybox_is_refused() {
    let f = fixture();
    let mut elf = vec![0u8; 0x40 + 56];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    elf[0x40..0x44].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
    fs::write(&f.spec.busybox, elf).unwrap();
    let err = ensure_image(&f.spec).unwrap_err();
    assert!(
        matches!(&err, ImageError::NotStatic { path } if *path == f.spec.busybox),
        "{err:?}"
    );
}

#[test]
fn missing_wanted_module_is_a_typed_error() {
    let f = fixture();
    let dep = f
        .spec
        .kernel_root
        .join("lib/modules")
        .join(VERSION)
        .join("modules.dep");
    let text = fs::read_to_string(&dep).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.contains("virtio_blk"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&dep, text).unwrap();
    let err = ensure_image(&f.spec).unwrap_err();
    assert!(
        matches!(&err, ImageError::ModuleNotFound { name, .. } if name == "virtio_blk"),
        "{err:?}"
    );
}

#[test]
fn stale_temporary_directories_are_removed() {
    let f = fixture();
    let images = f.spec.cache_dir.join("images");
    let kernels = f.spec.cache_dir.join("kernels");
    let stale = images.join(".build-crashed");
    let fresh = images.join(".build-running");
    let stale_kernel = kernels.join(".vmlinux-crashed");
    fs::create_dir_all(&stale).unwrap();
    fs::create_dir_all(&fresh).unwrap();
    fs::create_dir_all(&kernels).unwrap();
    fs::write(&stale_kernel, b"half a kernel").unwrap();
    let old = SystemTime::now() - 2 * STALE_AFTER;
    fs::File::open(&stale).unwrap().set_modified(old).unwrap();
    fs::File::open(&stale_kernel)
        .unwrap()
        .set_modified(old)
        .unwrap();
    build_image(&f.spec).unwrap();
    assert!(!stale.exists());
    assert!(!stale_kernel.exists());
    assert!(fresh.exists());
}

#[test]
fn concurrent_builders_agree_and_leave_no_debris() {
    let f = fixture();
    let images: Vec<Image> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| ensure_image(&f.spec))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    assert!(images.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fs::read(&images[0].kernel).unwrap(), VMLINUX_BYTES);
    assert!(images[0].initramfs.is_file());
    for dir in ["images", "kernels"] {
        let debris: Vec<_> = fs::read_dir(f.spec.cache_dir.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(debris.is_empty(), "{dir}: {debris:?}");
    }
}

fn ours_spec(f: &Fixture) -> ImageSpec {
    ImageSpec {
        kernel: KernelFlavor::Ours,
        ..f.spec.clone()
    }
}

#[test]
fn our_kernel_image_has_no_modules() {
    let f = fixture();
    let spec = ours_spec(&f);
    let image = ensure_image(&spec).unwrap();
    // The vmlinux is used as it is.
    assert_eq!(
        fs::read(&image.kernel).unwrap(),
        fs::read(&spec.our_vmlinux).unwrap()
    );
    let (names, map) = parse(&fs::read(&image.initramfs).unwrap());
    assert_eq!(map["init"].data, b"\x7fELF\x02\x01 agent v1");
    assert_eq!(map["dev/console"].rdev, (5, 1));
    let modules: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".ko") || n.starts_with("lib/modules"))
        .collect();
    assert!(modules.is_empty(), "modules in our image: {modules:?}");
    assert!(!map.contains_key("lib/modules/uvm/load-order"));
}

#[test]
fn flavours_never_share_an_image() {
    let f = fixture();
    let debian = ensure_image(&f.spec).unwrap();
    let ours = ensure_image(&ours_spec(&f)).unwrap();
    assert_ne!(debian.id, ours.id);
    assert_ne!(debian.kernel, ours.kernel);
    assert_eq!(fs::read(&debian.kernel).unwrap(), VMLINUX_BYTES);
    // Both stay usable, each with its own kernel.
    assert_eq!(ensure_image(&f.spec).unwrap(), debian);
    assert_eq!(ensure_image(&ours_spec(&f)).unwrap(), ours);

    // A rebuilt kernel of ours is a new image; the old one stays for VMs that use it.
    let mut other = fake_elf(&[PVH_NOTE]);
    other.extend_from_slice(b" rebuilt");
    fs::write(&f.spec.our_vmlinux, &other).unwrap();
    let rebuilt = ensure_image(&ours_spec(&f)).unwrap();
    assert_ne!(rebuilt.id, ours.id);
    assert_eq!(fs::read(&rebuilt.kernel).unwrap(), other);
    assert_ne!(fs::read(&ours.kernel).unwrap(), other);
}

#[test]
fn our_kernel_without_pvh_entry_is_refused() {
    let f = fixture();
    fs::write(&f.spec.our_vmlinux, fake_elf(&[])).unwrap();
    let err = ensure_image(&ours_spec(&f)).unwrap_err();
    assert!(
        matches!(&err, ImageError::NoPvhEntry { path } if *path == f.spec.our_vmlinux),
        "{err:?}"
    );
    fs::remove_file(&f.spec.our_vmlinux).unwrap();
    let err = ensure_image(&ours_spec(&f)).unwrap_err();
    assert!(
        matches!(err, ImageError::OurKernelMissing { .. }),
        "{err:?}"
    );
    // Debian's kernel does not need ours.
    ensure_image(&f.spec).unwrap();
}
