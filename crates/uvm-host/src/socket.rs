//! Unix sockets as `/proc/net/unix` shows them: whether one is listening, without connecting to
//! it.

use std::path::Path;

/// Whether a unix socket bound at `path` is listening (`__SO_ACCEPTCON` in `/proc/net/unix`),
/// without connecting to it (vhost-device-vsock serves a single frontend connection).
pub fn unix_socket_listening(path: &Path) -> std::io::Result<bool> {
    let table = std::fs::read_to_string("/proc/net/unix")?;
    Ok(listening_in(&table, path))
}

/// `/proc/net/unix` lines: `Num RefCount Protocol Flags Type St Inode Path`.
fn listening_in(table: &str, path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_ascii_whitespace();
        let flags = fields.nth(3);
        let bound = fields.nth(3);
        bound == Some(path.as_ref())
            && flags
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|f| f & SO_ACCEPTCON != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Num       RefCount Protocol Flags    Type St Inode Path\n\
        0000000000000000: 00000002 00000000 00010000 0001 01 12345 /tmp/uvm-a/vhost.sock\n\
        0000000000000000: 00000002 00000000 00000000 0001 01 12346 /tmp/uvm-b/vhost.sock\n\
        0000000000000000: 00000003 00000000 00000000 0001 03  9999\n";

    #[test]
    fn listening_needs_the_accept_flag_on_that_path() {
        assert!(listening_in(TABLE, Path::new("/tmp/uvm-a/vhost.sock")));
        // Bound but not yet listening.
        assert!(!listening_in(TABLE, Path::new("/tmp/uvm-b/vhost.sock")));
        assert!(!listening_in(TABLE, Path::new("/tmp/uvm-c/vhost.sock")));
    }

    #[test]
    fn this_machine_lists_listening_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        assert!(!unix_socket_listening(&path).expect("read /proc/net/unix"));
        let _l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert!(unix_socket_listening(&path).expect("read /proc/net/unix"));
    }
}
