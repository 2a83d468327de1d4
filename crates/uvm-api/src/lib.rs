//! # uvm-api — the public gRPC API of one uvmctl utility VM
//!
//! The contract is `proto/uvm/v1/uvm.proto` (package `uvm.v1`): one `VmService` per VM, served by
//! that VM's supervisor on `<root>/<id>/api.sock`. This crate holds what every Rust side of it
//! shares:
//!
//! - [`v1`]: the messages, the client ([`v1::vm_service_client::VmServiceClient`]) and the server
//!   trait ([`v1::vm_service_server::VmService`]), generated at build time by tonic and prost
//!   (the proto is parsed by protox, so no `protoc` is needed);
//! - [`transport`]: [`connect`] to a socket, [`serve`] on one, with the contract's message-size
//!   limit ([`MAX_MESSAGE_BYTES`]) and the `uvm-vm-id` check;
//! - [`status`]: how every typed error of the controller becomes a gRPC status, plus the API's own
//!   errors ([`ApiError`]);
//! - [`convert`]: the controller's types as API messages (`From`), and the few client inputs the
//!   server validates (`TryFrom`).
//!
//! Other languages generate their client from the same file, e.g. Python with
//! `python -m grpc_tools.protoc -I crates/uvm-api/proto --python_out=. --grpc_python_out=.
//! uvm/v1/uvm.proto` (the package is then `uvm.v1`, modules `uvm_pb2` and `uvm_pb2_grpc`). Such a
//! client must send the `:authority` `localhost`, which [`connect`] does: the server's HTTP/2
//! stack refuses the socket path that grpcio sends by default with `PROTOCOL_ERROR`, so a grpcio
//! channel needs the option `("grpc.default_authority", "localhost")`.

#![warn(missing_docs)]

pub mod convert;
pub mod status;
pub mod transport;

/// The generated messages, client and server of proto package `uvm.v1`; their documentation is
/// the proto's.
#[expect(
    clippy::allow_attributes,
    reason = "tonic's generated code carries its own #[allow]s; it is not ours to lint"
)]
pub mod v1 {
    tonic::include_proto!("uvm.v1");
}

pub use status::{controller_status, ApiError, STATE_METADATA};
pub use transport::{
    client, connect, connect_client, serve, server, ConnectError, VmIdCheck, MAX_MESSAGE_BYTES,
    VM_ID_METADATA,
};
