//! Hybrid vsock addressing on the host (the `CONNECT` exchange itself lives in
//! `uvm_agent_proto::hybrid_vsock`): guest → host connections to port P arrive on `<uds>_<P>`.

use std::path::{Path, PathBuf};

use uvm::GuestError;
use uvm_agent_proto::hybrid_vsock::{self, HybridVsockError};

/// The unix socket path on which guest connections to host `port` arrive.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to guest `port` through the hybrid socket `uds`, mapping failures to guest errors.
pub(crate) async fn connect(uds: &Path, port: u32) -> Result<tokio::net::UnixStream, GuestError> {
    hybrid_vsock::connect(uds, port).await.map_err(|e| match e {
        HybridVsockError::Connect { source, .. } => GuestError::Io {
            operation: "connect to the vsock proxy",
            source,
        },
        HybridVsockError::Io(source) => GuestError::Io {
            operation: "CONNECT exchange with the vsock proxy",
            source,
        },
        HybridVsockError::Closed { .. } => GuestError::ConnectionLost,
        refused @ HybridVsockError::Refused { .. } => GuestError::Protocol {
            message: refused.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_paths_append_the_port() {
        assert_eq!(
            host_port_path(Path::new("/tmp/x/vsock.sock"), 1025),
            PathBuf::from("/tmp/x/vsock.sock_1025")
        );
    }
}
