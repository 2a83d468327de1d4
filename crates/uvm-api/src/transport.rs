//! gRPC over a unix socket: the client's [`connect`] and the server's [`serve`], both with the
//! message-size limit of the contract ([`MAX_MESSAGE_BYTES`]), and the `uvm-vm-id` check
//! ([`VmIdCheck`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Status};

use crate::status::ApiError;
use crate::v1::vm_service_client::VmServiceClient;
use crate::v1::vm_service_server::{VmService, VmServiceServer};

/// The largest message either side accepts, in bytes (16 MiB), as `uvm.proto` documents.
///
/// tonic's default is 4 MiB for receiving and unbounded for sending. 16 MiB leaves room for any
/// request the API has (a policy document, a 1 MiB data chunk with headroom) while bounding what
/// one message can make the supervisor allocate. A larger message is refused with `OUT_OF_RANGE`
/// ("decoded message length too large") and only that call fails.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The gRPC metadata key a client may set to the full VM id it means (see [`VmIdCheck`]).
pub const VM_ID_METADATA: &str = "uvm-vm-id";

/// The URI tonic is given for a unix-socket channel. Only its authority is sent (as `:authority`),
/// and `localhost` is what gRPC's own unix-socket clients (C core, Python) send.
const UDS_URI: &str = "http://localhost";

/// Connecting to a VM's API socket failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the VM API at {}", path.display())]
pub struct ConnectError {
    /// The socket path.
    pub path: PathBuf,
    /// What went wrong (the `io::Error` is in its source chain).
    #[source]
    pub source: tonic::transport::Error,
}

/// Opens a channel to the API socket at `path`: tonic over a tokio [`UnixStream`]. Connects now,
/// so a missing socket or a dead supervisor is an error here rather than at the first call. The
/// channel reconnects to the same path by itself if the connection drops.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    let path = path.as_ref().to_path_buf();
    let socket = Arc::new(path.clone());
    let connector = tower::service_fn(move |_: Uri| {
        let socket = Arc::clone(&socket);
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(&*socket).await?)) }
    });
    Endpoint::from_static(UDS_URI)
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError { path, source })
}

/// A client on `channel` that accepts messages up to the contract's [`MAX_MESSAGE_BYTES`].
///
/// What it sends is not limited here on purpose: tonic reports a client-side encoding refusal as
/// an HTTP/2 reset (`INTERNAL`, "h2 protocol error"), while the server refuses the same message
/// with a clear `OUT_OF_RANGE` status naming the size and the limit.
pub fn client(channel: Channel) -> VmServiceClient<Channel> {
    VmServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// [`connect`] and [`client`] in one step.
pub async fn connect_client(
    path: impl AsRef<Path>,
) -> Result<VmServiceClient<Channel>, ConnectError> {
    Ok(client(connect(path).await?))
}

/// `service` as a tonic service with the contract's message-size limit in both directions and the
/// [`VmIdCheck`] for `vm_id`; what [`serve`] serves, for callers that build their own server.
pub fn server<S: VmService>(
    service: S,
    vm_id: &str,
) -> InterceptedService<VmServiceServer<S>, VmIdCheck> {
    let inner = VmServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    InterceptedService::new(inner, VmIdCheck::new(vm_id))
}

/// Serves `service` (the API of VM `vm_id`) on `listener` until `shutdown` resolves; then stops
/// accepting, lets calls in flight finish, and returns. A malformed or oversized message fails
/// only its own call: the server keeps serving.
pub async fn serve<S: VmService>(
    listener: UnixListener,
    service: S,
    vm_id: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(server(service, vm_id))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// Refuses a call whose `uvm-vm-id` metadata names another VM than the one served, with
/// `NOT_FOUND` ([`ApiError::UnknownVm`]); a call without it passes. This guards a client that
/// resolved a name to a socket path against reaching a different VM at that path.
#[derive(Debug, Clone)]
pub struct VmIdCheck {
    id: Arc<str>,
}

impl VmIdCheck {
    /// A check for the VM `id`.
    pub fn new(id: &str) -> VmIdCheck {
        VmIdCheck { id: Arc::from(id) }
    }
}

impl Interceptor for VmIdCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get(VM_ID_METADATA) else {
            return Ok(request);
        };
        if value.as_bytes() == self.id.as_bytes() {
            return Ok(request);
        }
        Err(ApiError::UnknownVm {
            requested: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            served: self.id.to_string(),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn request_with_id(id: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(id) = id {
            request
                .metadata_mut()
                .insert(VM_ID_METADATA, id.parse().expect("ASCII id"));
        }
        request
    }

    #[test]
    fn vm_id_check_passes_without_the_metadata_and_with_the_served_id() {
        let mut check = VmIdCheck::new("vm-1");
        assert!(check.call(request_with_id(None)).is_ok());
        assert!(check.call(request_with_id(Some("vm-1"))).is_ok());
    }

    #[test]
    fn vm_id_check_refuses_another_id_with_not_found_naming_both() {
        let mut check = VmIdCheck::new("vm-1");
        let status = check
            .call(request_with_id(Some("vm-2")))
            .expect_err("another VM's id");
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("vm-1"), "{}", status.message());
        assert!(status.message().contains("vm-2"), "{}", status.message());
    }
}
