//! Turns Debian's `vmlinuz` (an x86 bzImage) into the uncompressed ELF `vmlinux` inside it.
//!
//! Why: QEMU boots an ELF `vmlinux` through its PVH entry note, skipping the bzImage's real-mode
//! setup and self-decompression, which under TCG are emulated instruction by instruction
//! (docs/design.md, "The real path").
//!
//! The boot protocol (Documentation/x86/boot.rst, version ≥ 2.08) says where the compressed
//! payload is: `payload_offset`/`payload_length` at 0x248/0x24c, relative to the start of the
//! protected-mode code, which follows the `(setup_sects + 1)` 512-byte setup sectors.

use std::io::{self, Read};
use std::path::Path;

use crate::ImageError;

const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

/// The compression formats a bzImage payload can use, told apart by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Xz,
    Gzip,
    Zstd,
    Lzma,
    Bzip2,
    Lz4,
    Lzo,
}

impl Compression {
    pub(crate) fn detect(data: &[u8]) -> Option<Compression> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map(|&(_, c)| c)
    }

    fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lz4 => "lz4",
            Compression::Lzo => "lzo",
        }
    }
}

/// Decompresses a single xz or gzip stream; `None` for the formats not supported. Trailing
/// bytes after the stream (the kernel build appends the uncompressed size) are ignored.
pub(crate) fn decompress(c: Compression, data: &[u8]) -> Option<io::Result<Vec<u8>>> {
    match c {
        Compression::Xz => Some(xz_decode(data)),
        Compression::Gzip => {
            let mut out = Vec::with_capacity(data.len().saturating_mul(4));
            Some(
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .map(|_| out),
            )
        }
        _ => None,
    }
}

/// Decodes one xz stream and stops at its end. (`xz2::read::XzDecoder` reports trailing bytes
/// after the stream as corruption, and a bzImage payload has four of them.)
pub(crate) fn xz_decode(data: &[u8]) -> io::Result<Vec<u8>> {
    use xz2::stream::{Action, Status, Stream};
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0)?;
    let mut out = Vec::with_capacity(data.len().saturating_mul(4));
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.len().max(1 << 20));
        }
        let (in_before, out_before) = (stream.total_in(), out.len());
        let consumed = usize::try_from(in_before).unwrap_or(usize::MAX);
        let input = data.get(consumed..).unwrap_or_default();
        if stream.process_vec(input, &mut out, Action::Finish)? == Status::StreamEnd {
            return Ok(out);
        }
        if stream.total_in() == in_before && out.len() == out_before {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the xz stream ends early",
            ));
        }
    }
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Extracts the ELF `vmlinux` from the bzImage bytes read from `path`.
pub(crate) fn extract_vmlinux(path: &Path, bzimage: &[u8]) -> Result<Vec<u8>, ImageError> {
    let not_bzimage = || ImageError::NotBzImage {
        path: path.to_owned(),
    };
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS".as_slice()) {
        return Err(not_bzimage());
    }
    let version = bzimage
        .get(PROTOCOL_VERSION..PROTOCOL_VERSION + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(not_bzimage)?;
    if version < 0x0208 {
        return Err(not_bzimage());
    }
    // A setup_sects of 0 means 4, for compatibility with ancient boot loaders.
    let setup_sects = match bzimage.get(SETUP_SECTS).copied().ok_or_else(not_bzimage)? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = u32_at(bzimage, PAYLOAD_OFFSET).ok_or_else(not_bzimage)?;
    let length = u32_at(bzimage, PAYLOAD_LENGTH).ok_or_else(not_bzimage)?;
    let start = usize::try_from(offset)
        .ok()
        .and_then(|o| pm_start.checked_add(o))
        .ok_or_else(not_bzimage)?;
    let end = usize::try_from(length)
        .ok()
        .and_then(|l| start.checked_add(l))
        .ok_or_else(not_bzimage)?;
    let payload = bzimage.get(start..end).ok_or_else(not_bzimage)?;

    let format =
        Compression::detect(payload).ok_or_else(|| ImageError::UnsupportedKernelCompression {
            path: path.to_owned(),
            format: "an unrecognised format".to_owned(),
        })?;
    let vmlinux = decompress(format, payload)
        .ok_or_else(|| ImageError::UnsupportedKernelCompression {
            path: path.to_owned(),
            format: format.name().to_owned(),
        })?
        .map_err(|source| ImageError::KernelDecompress {
            path: path.to_owned(),
            source,
        })?;
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(ImageError::NotElf {
            path: path.to_owned(),
        });
    }
    Ok(vmlinux)
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    let bytes = data.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    let bytes = data.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes);
    Some(u64::from_le_bytes(a))
}

/// Whether `data` starts like a 64-bit little-endian x86-64 ELF file (`e_machine` 62).
pub(crate) fn is_x86_64_elf(data: &[u8]) -> bool {
    const EM_X86_64: u16 = 62;
    data.starts_with(b"\x7fELF\x02\x01") && u16_at(data, 0x12) == Some(EM_X86_64)
}

/// Whether the ELF file in `data` has the note QEMU boots a `vmlinux` through: name `Xen`,
/// type `XEN_ELFNOTE_PHYS32_ENTRY` (18), in a `PT_NOTE` segment (CONFIG_PVH writes it).
pub(crate) fn has_pvh_note(data: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(data, 0x20), u16_at(data, 0x36), u16_at(data, 0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let Some(ph) = phoff.checked_add(i * usize::from(phentsize)) else {
            return false;
        };
        if u32_at(data, ph) != Some(PT_NOTE) {
            return false;
        }
        // p_offset at +8, p_filesz at +32 in an Elf64_Phdr.
        let segment = u64_at(data, ph + 8)
            .zip(u64_at(data, ph + 32))
            .and_then(|(off, len)| {
                let off = usize::try_from(off).ok()?;
                data.get(off..off.checked_add(usize::try_from(len).ok()?)?)
            });
        segment.is_some_and(|notes| has_note(notes, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY))
    })
}

/// Walks the ELF notes in `notes` (each: namesz, descsz, type, then name and descriptor, both
/// padded to 4 bytes) looking for one with `name` and `ty`.
fn has_note(mut notes: &[u8], name: &[u8], ty: u32) -> bool {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while let (Some(namesz), Some(descsz), Some(note_ty)) =
        (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
    {
        let (Ok(namesz), Ok(descsz)) = (usize::try_from(namesz), usize::try_from(descsz)) else {
            return false;
        };
        let Some(name_end) = namesz.checked_add(12) else {
            return false;
        };
        let Some(note_name) = notes.get(12..name_end) else {
            return false;
        };
        if note_ty == ty && note_name.strip_suffix(b"\0").unwrap_or(note_name) == name {
            return true;
        }
        let next = align4(name_end)
            .and_then(|d| d.checked_add(descsz))
            .and_then(align4);
        match next.and_then(|n| notes.get(n..)) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

/// Whether `data` is an ELF executable that needs a dynamic loader (has a `PT_INTERP` program
/// header). Anything that is not a 64-bit little-endian ELF (a `#!` script, say) is not.
pub(crate) fn is_dynamic_elf(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    // e_ident: magic, EI_CLASS = 2 (64-bit), EI_DATA = 1 (little-endian).
    if !data.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let u16_at = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        data.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        phoff
            .checked_add(i * usize::from(phentsize))
            .and_then(|at| u32_at(data, at))
            == Some(PT_INTERP)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal bzImage: boot header fields plus an xz (or other) payload after the setup.
    pub(crate) fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm_start = (usize::from(setup_sects) + 1) * 512;
        let payload_offset = 0x100usize;
        let mut img = vec![0u8; pm_start + payload_offset];
        img[SETUP_SECTS] = setup_sects;
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4]
            .copy_from_slice(&(payload_offset as u32).to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        img.extend_from_slice(payload);
        // Like the kernel build: the uncompressed size follows the stream.
        img.extend_from_slice(&1234u32.to_le_bytes());
        img.extend_from_slice(&[0u8; 64]);
        img
    }

    /// The PVH entry note: (name, type, descriptor).
    pub(crate) const PVH_NOTE: (&str, u32, &[u8]) = ("Xen", 18, &[0, 0, 0, 1, 0, 0, 0, 0]);

    /// A minimal x86-64 ELF file with one `PT_LOAD` header and one `PT_NOTE` segment holding
    /// `notes` (after an unrelated GNU note, as in a real vmlinux).
    pub(crate) fn fake_elf(notes: &[(&str, u32, &[u8])]) -> Vec<u8> {
        fn note(out: &mut Vec<u8>, name: &str, ty: u32, desc: &[u8]) {
            let mut name = name.as_bytes().to_vec();
            name.push(0);
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&name);
            out.resize(out.len().next_multiple_of(4), 0);
            out.extend_from_slice(desc);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        let mut segment = Vec::new();
        note(&mut segment, "GNU", 3, b"build-id-bytes..");
        for (name, ty, desc) in notes {
            note(&mut segment, name, *ty, desc);
        }
        let (phoff, phentsize, phnum) = (0x40usize, 56usize, 2usize);
        let notes_at = phoff + phentsize * phnum;
        let mut elf = vec![0u8; notes_at];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&(phentsize as u16).to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());
        elf[phoff..phoff + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let note_ph = phoff + phentsize;
        elf[note_ph..note_ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        elf[note_ph + 8..note_ph + 16].copy_from_slice(&(notes_at as u64).to_le_bytes());
        elf[note_ph + 32..note_ph + 40].copy_from_slice(&(segment.len() as u64).to_le_bytes());
        elf.extend_from_slice(&segment);
        elf.extend_from_slice(b"pretend kernel text");
        elf
    }

    pub(crate) fn xz(data: &[u8]) -> Vec<u8> {
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 1);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn extracts_an_xz_payload() {
        let elf = b"\x7fELF\x02\x01 pretend kernel".repeat(100);
        let img = fake_bzimage(&xz(&elf));
        let out = extract_vmlinux(Path::new("vmlinuz"), &img).unwrap();
        assert_eq!(out, elf);
    }

    #[test]
    fn extracts_a_gzip_payload() {
        let elf = b"\x7fELF\x02\x01 pretend kernel".repeat(100);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&elf).unwrap();
        let img = fake_bzimage(&enc.finish().unwrap());
        assert_eq!(extract_vmlinux(Path::new("vmlinuz"), &img).unwrap(), elf);
    }

    #[test]
    fn zstd_payload_is_a_typed_error() {
        let img = fake_bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
        let err = extract_vmlinux(Path::new("vmlinuz"), &img).unwrap_err();
        assert!(
            matches!(&err, ImageError::UnsupportedKernelCompression { format, .. } if format == "zstd"),
            "{err:?}"
        );
    }

    #[test]
    fn non_elf_payload_is_rejected() {
        let img = fake_bzimage(&xz(b"not an elf at all"));
        let err = extract_vmlinux(Path::new("vmlinuz"), &img).unwrap_err();
        assert!(matches!(err, ImageError::NotElf { .. }), "{err:?}");
    }

    #[test]
    fn garbage_is_not_a_bzimage() {
        let err = extract_vmlinux(Path::new("x"), &[0u8; 4096]).unwrap_err();
        assert!(matches!(err, ImageError::NotBzImage { .. }), "{err:?}");
        let err = extract_vmlinux(Path::new("x"), b"short").unwrap_err();
        assert!(matches!(err, ImageError::NotBzImage { .. }), "{err:?}");
    }

    #[test]
    fn finds_the_pvh_note() {
        assert!(is_x86_64_elf(&fake_elf(&[])));
        assert!(!has_pvh_note(&fake_elf(&[])));
        assert!(has_pvh_note(&fake_elf(&[PVH_NOTE])));
        // Same type, other owner: not the PVH entry.
        assert!(!has_pvh_note(&fake_elf(&[("Linux", 18, &[1, 2, 3, 4])])));
        // A truncated file (the note segment past its end) has no note, and does not panic.
        let elf = fake_elf(&[PVH_NOTE]);
        assert!(!has_pvh_note(&elf[..elf.len() - 30]));
        assert!(!has_pvh_note(b"\x7fELF\x02\x01"));
        assert!(!is_x86_64_elf(b"#!/bin/sh"));
    }

    #[test]
    fn detects_dynamic_elf() {
        let mut elf = vec![0u8; 0x40 + 2 * 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert!(!is_dynamic_elf(&elf));
        elf[0x40 + 56..0x40 + 60].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        assert!(is_dynamic_elf(&elf));
        assert!(!is_dynamic_elf(b"#!/bin/busybox sh\n"));
    }
}
