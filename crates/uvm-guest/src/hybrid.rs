//! Hybrid vsock (Firecracker / vhost-device-vsock): reaching a guest port through a host unix socket.
//!
//! Host → guest: connect to the unix socket, write `CONNECT <port>\n`, read `OK <host port>\n`;
//! from then on the stream is the guest connection. Guest → host: a guest connecting to host port P
//! lands on the unix socket `<uds>_<P>`, which the host must be listening on beforehand.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use uvm::GuestError;

/// Longest acceptable reply line to `CONNECT` (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

/// The unix socket path on which guest connections to host `port` arrive.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to guest `port` through the hybrid socket `uds`.
///
/// The reply is read byte by byte so that no byte of the guest's stream is consumed here.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, GuestError> {
    let io = |operation| move |source| GuestError::Io { operation, source };
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(io("connect to the vsock proxy"))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io("send CONNECT"))?;
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(io("read the CONNECT reply"))?;
        if n == 0 {
            // The proxy closes the connection when nobody listens on the guest port.
            return Err(GuestError::ConnectionLost);
        }
        if byte[0] == b'\n' {
            break;
        }
        reply.push(byte[0]);
        if reply.len() > MAX_REPLY {
            return Err(GuestError::Protocol {
                message: format!("CONNECT reply longer than {MAX_REPLY} bytes"),
            });
        }
    }
    if reply.starts_with(b"OK ") {
        Ok(stream)
    } else {
        Err(GuestError::Protocol {
            message: format!(
                "unexpected CONNECT reply {:?}",
                String::from_utf8_lossy(&reply)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn proxy_replying(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 32];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(reply).await;
            let _ = s.write_all(b"guest bytes").await;
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        (dir, uds)
    }

    #[tokio::test]
    async fn connect_consumes_exactly_the_ok_line() {
        let (_dir, uds) = proxy_replying(b"OK 1234\n").await;
        let mut s = connect(&uds, 1024).await.expect("connect");
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).await.expect("guest bytes follow");
        assert_eq!(&buf, b"guest bytes");
    }

    #[tokio::test]
    async fn a_refusing_proxy_is_a_protocol_error() {
        let (_dir, uds) = proxy_replying(b"NO\n").await;
        let err = connect(&uds, 1024).await.expect_err("refused");
        assert!(matches!(err, GuestError::Protocol { .. }));
    }

    #[tokio::test]
    async fn an_endless_reply_is_cut_off() {
        let (_dir, uds) = proxy_replying(&[b'A'; 200]).await;
        let err = connect(&uds, 1024).await.expect_err("too long");
        assert!(matches!(err, GuestError::Protocol { .. }));
    }

    #[test]
    fn host_port_paths_append_the_port() {
        assert_eq!(
            host_port_path(Path::new("/tmp/x/vsock.sock"), 1025),
            PathBuf::from("/tmp/x/vsock.sock_1025")
        );
    }
}
