//! # uvm-api — the public gRPC API of one uvmctl utility VM
//!
//! The contract is `proto/uvm/v1/uvm.proto` (package `uvm.v1`): one `VmService` per VM, served by
//! that VM's supervisor on `<root>/<id>/api.sock`. [`v1`] holds its messages, client and server,
//! generated at build time by tonic and prost (the proto is parsed by protox, so no `protoc` is
//! needed).

/// The generated messages, client and server of proto package `uvm.v1`; their documentation is
/// the proto's.
pub mod v1 {
    tonic::include_proto!("uvm.v1");
}
