//! The initramfs: an uncompressed newc cpio archive, written entry by entry with the `cpio`
//! crate so that device nodes and ownership need no root and no staging directory.
//!
//! Uncompressed because the guest pays for decompression on every boot and the host for the
//! bytes only once: under TCG, inflating a gzip archive is a large share of the boot
//! (measured side by side, BENCHMARKS.md, "Where the kernel's time went"), while the bytes it inflates to are
//! copied into guest memory by QEMU at host speed.
//!
//! Layout (what the agent, as PID 1, can count on):
//! ```text
//! /init                      the agent (0755)
//! /bin/busybox               busybox-static, plus one symlink per applet in /bin
//! /sbin -> bin, /usr/bin -> ../bin, /usr/sbin -> ../bin   so `#!/usr/bin/env` and friends work
//! /dev/console               char 5:1: the kernel opens it for init's stdio before /dev is mounted
//! /proc /sys /dev /tmp /run /etc /root   mount points and the usual empty directories
//! /lib/modules/uvm/*.ko      the modules, uncompressed        (Debian's kernel only)
//! /lib/modules/uvm/load-order   one file name per line, dependencies first   (idem)
//! ```
//! With our kernel (every driver built in) there is no `/lib/modules` at all: the agent reads
//! a missing load order as "nothing to load".

use std::io::{self, Write};

/// Everything that goes into the archive, already read into memory.
#[derive(Debug)]
pub(crate) struct Contents<'a> {
    pub(crate) agent: &'a [u8],
    pub(crate) busybox: &'a [u8],
    pub(crate) applets: &'a [String],
    /// (file name in `/lib/modules/uvm`, uncompressed bytes), in load order; `None` for a
    /// kernel without modules: then no module directory and no load-order file.
    pub(crate) modules: Option<&'a [(String, Vec<u8>)]>,
}

/// Where the guest finds its modules and their load order.
pub const GUEST_MODULE_DIR: &str = "/lib/modules/uvm";
/// The file, inside [`GUEST_MODULE_DIR`], listing the module files in load order.
pub const LOAD_ORDER_FILE: &str = "load-order";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// A newc archive being written: hands out inode numbers and writes the trailer at the end.
struct Archive<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> Archive<W> {
    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        self.entry_dev(name, mode, nlink, data, (0, 0))
    }

    fn entry_dev(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        data: &[u8],
        (major, minor): (u32, u32),
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry larger than 4 GiB"))?;
        self.next_ino += 1;
        // mtime stays 0: the archive depends on its inputs only.
        let mut w = cpio::NewcBuilder::new(name)
            .ino(self.next_ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(nlink)
            .rdev_major(major)
            .rdev_minor(minor)
            .write(&mut self.out, size);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    }

    fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, 2, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    fn finish(self) -> io::Result<W> {
        cpio::newc::trailer(self.out)
    }
}

/// Writes the uncompressed newc archive for `contents` into `out`.
pub(crate) fn write_initramfs<W: Write>(contents: &Contents<'_>, out: W) -> io::Result<W> {
    let mut a = Archive { out, next_ino: 0 };
    // Parents before children: the kernel's unpacker does not create missing directories.
    let with_modules = contents.modules.is_some();
    for dir in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
        "usr",
    ] {
        if with_modules || dir != "lib/modules" {
            a.dir(dir)?;
        }
    }
    let module_dir = GUEST_MODULE_DIR.trim_start_matches('/');
    if with_modules {
        a.dir(module_dir)?;
    }
    a.symlink("sbin", "bin")?;
    a.symlink("usr/bin", "../bin")?;
    a.symlink("usr/sbin", "../bin")?;
    a.entry_dev("dev/console", S_IFCHR | 0o600, 1, &[], (5, 1))?;
    a.file("init", 0o755, contents.agent)?;
    a.file("bin/busybox", 0o755, contents.busybox)?;
    for applet in contents.applets {
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        a.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    if let Some(modules) = contents.modules {
        let mut order = String::new();
        for (name, bytes) in modules {
            a.file(&format!("{module_dir}/{name}"), 0o644, bytes)?;
            order.push_str(name);
            order.push('\n');
        }
        a.file(
            &format!("{module_dir}/{LOAD_ORDER_FILE}"),
            0o644,
            order.as_bytes(),
        )?;
    }
    a.finish()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Read;

    /// One parsed archive entry.
    #[derive(Debug)]
    pub(crate) struct Parsed {
        pub(crate) mode: u32,
        pub(crate) rdev: (u32, u32),
        pub(crate) data: Vec<u8>,
    }

    /// Reads a newc archive back with the `cpio` crate's reader, keyed by entry name.
    pub(crate) fn parse(mut archive: &[u8]) -> (Vec<String>, HashMap<String, Parsed>) {
        let mut names = Vec::new();
        let mut map = HashMap::new();
        loop {
            let mut reader = cpio::NewcReader::new(archive).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_owned();
            let mode = reader.entry().mode();
            let rdev = (reader.entry().rdev_major(), reader.entry().rdev_minor());
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            archive = reader.finish().unwrap();
            names.push(name.clone());
            assert!(map.insert(name, Parsed { mode, rdev, data }).is_none());
        }
        (names, map)
    }

    #[test]
    fn archive_round_trips() {
        let applets = vec!["sh".to_owned(), "mount".to_owned(), "busybox".to_owned()];
        let modules = vec![
            ("virtio_ring.ko".to_owned(), b"ring".to_vec()),
            ("virtio.ko".to_owned(), b"virtio".to_vec()),
        ];
        let contents = Contents {
            agent: b"\x7fELF agent",
            busybox: b"\x7fELF busybox",
            applets: &applets,
            modules: Some(&modules),
        };
        let archive = write_initramfs(&contents, Vec::new()).unwrap();
        let (names, map) = parse(&archive);

        let init = &map["init"];
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, b"\x7fELF agent");
        let console = &map["dev/console"];
        assert_eq!(console.mode & 0o170_000, S_IFCHR);
        assert_eq!(console.rdev, (5, 1));
        assert_eq!(map["bin/sh"].mode & 0o170_000, S_IFLNK);
        assert_eq!(map["bin/sh"].data, b"busybox");
        // The `busybox` applet would overwrite the binary with a link to itself.
        assert_eq!(map["bin/busybox"].mode, S_IFREG | 0o755);
        assert_eq!(map["lib/modules/uvm/virtio.ko"].data, b"virtio");
        assert_eq!(
            map["lib/modules/uvm/load-order"].data,
            b"virtio_ring.ko\nvirtio.ko\n"
        );
        for dir in [
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "etc",
            "root",
            "lib/modules/uvm",
        ] {
            assert_eq!(map[dir].mode & 0o170_000, S_IFDIR, "{dir}");
        }
        // Every entry's parent directory comes before it.
        for (i, name) in names.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                let p = names.iter().position(|n| n == parent);
                assert!(p.is_some_and(|p| p < i), "{parent} not before {name}");
            }
        }
    }

    #[test]
    fn no_modules_means_no_module_directory() {
        let applets = vec!["sh".to_owned()];
        let contents = Contents {
            agent: b"\x7fELF agent",
            busybox: b"\x7fELF busybox",
            applets: &applets,
            modules: None,
        };
        let (names, map) = parse(&write_initramfs(&contents, Vec::new()).unwrap());
        assert_eq!(map["init"].data, b"\x7fELF agent");
        assert!(map.contains_key("lib"));
        assert!(
            !names.iter().any(|n| n.starts_with("lib/modules")),
            "{names:?}"
        );
    }
}
