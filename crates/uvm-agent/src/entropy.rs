//! Seeding the guest's entropy pool with the host's random bytes from `Handshake`: they are
//! mixed into `/dev/urandom` and credited with `RNDADDENTROPY`, so that the guest's CRNG is
//! ready long before it would be from interrupt timing alone (hcsshim does the same).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;

/// `RNDADDENTROPY = _IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong =
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()) as libc::c_ulong;

nix::ioctl_write_ptr_bad!(
    /// `ioctl(fd, RNDADDENTROPY, struct rand_pool_info *)`.
    ///
    /// # Safety
    ///
    /// `data` must point to a complete `struct rand_pool_info` (see [`rand_pool_info`]).
    rnd_add_entropy,
    RNDADDENTROPY,
    libc::c_int
);

/// A `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` holding `seed`,
/// crediting 8 bits per byte, as `c_int` words (so it is suitably aligned).
pub fn rand_pool_info(seed: &[u8]) -> Vec<libc::c_int> {
    let bits = libc::c_int::try_from(seed.len().saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    let size = libc::c_int::try_from(seed.len()).unwrap_or(libc::c_int::MAX);
    let mut words = vec![bits, size];
    words.extend(seed.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        libc::c_int::from_ne_bytes(word)
    }));
    words
}

/// Adds and credits `seed`; without the privilege to credit, it is still mixed in.
pub fn seed(seed: &[u8]) -> std::io::Result<()> {
    if seed.is_empty() {
        return Ok(());
    }
    let mut urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    let info = rand_pool_info(seed);
    // SAFETY: `info` is a complete `struct rand_pool_info` whose `buf_size` (info[1]) matches
    // the bytes that follow the two header ints, it outlives the call, and the kernel only
    // reads from it; the fd is an open /dev/urandom.
    let credited = unsafe { rnd_add_entropy(urandom.as_raw_fd(), info.as_ptr()) };
    match credited {
        Ok(_) => Ok(()),
        Err(_) => urandom.write_all(seed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_code_matches_the_kernel_header() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
    }

    #[test]
    fn pool_info_has_header_and_padded_words() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info.len(), 4);
        assert_eq!(info[0], 40);
        assert_eq!(info[1], 5);
        assert_eq!(info[2], libc::c_int::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], libc::c_int::from_ne_bytes([5, 0, 0, 0]));
    }
}
