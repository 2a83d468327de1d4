//! Host side of *hybrid vsock* (vhost-device-vsock, Firecracker, Cloud Hypervisor): the guest's
//! vsock is a unix socket on the host; a host→guest connection is opened by connecting to it,
//! writing `CONNECT <port>\n` and reading `OK <host-port>\n`, after which the stream carries
//! the guest connection — here, the agent's ttrpc API.
//!
//! The reply is read one byte at a time, so not a byte of the ttrpc stream after it is
//! consumed, and it is bounded ([`MAX_REPLY`]). A guest port nobody listens on yields no reply
//! or a closed stream, depending on the proxy: wrap [`connect_agent`] in a timeout.
//!
//! The other way, guest → host connections to host port P arrive on the unix socket
//! `<uds>_<P>` ([`host_port_path`]), where the host listens before the guest connects.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::agent_ttrpc::AgentClient;
use crate::ttrpc::r#async::transport::Socket;
use crate::ttrpc::r#async::Client;
use crate::AGENT_VSOCK_PORT;

/// Bound on the `OK <port>\n` reply.
pub const MAX_REPLY: usize = 32;

/// Why the hybrid vsock connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    /// The unix socket could not be connected.
    #[error("cannot connect to the hybrid vsock socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the `CONNECT` exchange failed.
    #[error("hybrid vsock CONNECT exchange failed")]
    Io(#[source] std::io::Error),
    /// The proxy closed the stream before answering (nobody listens on the guest port).
    #[error("the stream closed before the reply to CONNECT {port}")]
    Closed {
        /// The guest port asked for.
        port: u32,
    },
    /// The proxy answered something other than `OK <port>`.
    #[error("unexpected reply to CONNECT {port}: {reply:?}")]
    Refused {
        /// The guest port asked for.
        port: u32,
        /// What came back (lossily decoded, bounded).
        reply: String,
    },
}

/// The unix socket path on which guest connections to host `port` arrive.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Runs the `CONNECT <port>` exchange on an open stream; returns the host-side port number of
/// the `OK` reply. On success the stream is the guest connection.
pub async fn handshake<S>(stream: &mut S, port: u32) -> Result<u32, HybridVsockError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(HybridVsockError::Io)?;
    let mut reply = Vec::with_capacity(MAX_REPLY);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(HybridVsockError::Io)?;
        if n == 0 {
            return Err(HybridVsockError::Closed { port });
        }
        if byte[0] == b'\n' {
            break;
        }
        reply.push(byte[0]);
        if reply.len() >= MAX_REPLY {
            return Err(HybridVsockError::Refused {
                port,
                reply: String::from_utf8_lossy(&reply).into_owned(),
            });
        }
    }
    let text = String::from_utf8_lossy(&reply);
    text.trim_end_matches('\r')
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| HybridVsockError::Refused {
            port,
            reply: text.into_owned(),
        })
}

/// Connects to `uds` (the hybrid vsock unix socket) and opens guest port `port`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, HybridVsockError> {
    let mut stream =
        UnixStream::connect(uds)
            .await
            .map_err(|source| HybridVsockError::Connect {
                path: uds.to_owned(),
                source,
            })?;
    handshake(&mut stream, port).await?;
    Ok(stream)
}

/// An API client over a stream already connected to the agent (after [`handshake`], or any
/// other transport).
pub fn client_from_stream(stream: UnixStream) -> AgentClient {
    AgentClient::new(Client::new(Socket::from(stream)))
}

/// Connects to the agent's API ([`AGENT_VSOCK_PORT`]) through the hybrid vsock socket `uds`.
/// Must be called inside a tokio runtime (the client runs a connection task).
pub async fn connect_agent(uds: &Path) -> Result<AgentClient, HybridVsockError> {
    let stream = connect(uds, AGENT_VSOCK_PORT).await?;
    Ok(client_from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// A fake proxy end answering `reply` and then sending `after`.
    async fn exchange(
        reply: &'static [u8],
        after: &'static [u8],
    ) -> (Result<u32, HybridVsockError>, Vec<u8>) {
        let (mut host, mut proxy) = tokio::io::duplex(256);
        let proxy_task = tokio::spawn(async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while proxy.read(&mut byte).await.expect("read") == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            proxy.write_all(reply).await.expect("write");
            proxy.write_all(after).await.expect("write");
            line
        });
        let result = handshake(&mut host, 1024).await;
        let line = proxy_task.await.expect("proxy");
        assert_eq!(line, b"CONNECT 1024");
        let mut rest = vec![0u8; after.len()];
        if result.is_ok() {
            host.read_exact(&mut rest).await.expect("rest");
        }
        (result, rest)
    }

    #[test]
    fn host_port_paths_append_the_port() {
        assert_eq!(
            host_port_path(Path::new("/tmp/x/vsock.sock"), 1025),
            PathBuf::from("/tmp/x/vsock.sock_1025")
        );
    }

    #[test]
    fn ok_reply_yields_the_port_and_leaves_the_stream_untouched() {
        let (result, rest) = run(exchange(b"OK 1073741824\n", b"\x00\x00ttrpc"));
        assert!(matches!(result, Ok(1_073_741_824)));
        assert_eq!(rest, b"\x00\x00ttrpc");
    }

    #[test]
    fn other_replies_are_refusals() {
        let (result, _) = run(exchange(b"NO\n", b""));
        assert!(
            matches!(result, Err(HybridVsockError::Refused { port: 1024, reply }) if reply == "NO")
        );
        let (result, _) = run(exchange(&[b'x'; 64], b""));
        assert!(matches!(result, Err(HybridVsockError::Refused { .. })));
    }

    #[test]
    fn a_closed_stream_is_reported() {
        let result = run(async {
            let (mut host, mut proxy) = tokio::io::duplex(64);
            let proxy_task = tokio::spawn(async move {
                let mut line = [0u8; 13];
                proxy.read_exact(&mut line).await.expect("CONNECT line");
                // Dropping `proxy` closes the stream without a reply.
            });
            let result = handshake(&mut host, 1024).await;
            proxy_task.await.expect("proxy");
            result
        });
        assert!(matches!(
            result,
            Err(HybridVsockError::Closed { port: 1024 })
        ));
    }
}
