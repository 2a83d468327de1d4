//! The guest link's hybrid vsock connections: `uvm_agent_proto::hybrid_vsock` (which owns the
//! addressing and the `CONNECT` exchange), with its failures as guest errors.

use std::path::Path;

use uvm::GuestError;
use uvm_agent_proto::hybrid_vsock::{self, HybridVsockError};

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
