//! Compiles `proto/uvm/v1/uvm.proto` into the prost messages and the tonic client and server, in
//! `OUT_DIR`. protox parses the proto in pure Rust (with the well-known types built in), so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/uvm/v1/uvm.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    // Paths relative to the include directory: the same layout Python's grpc_tools.protoc uses
    // (`-I crates/uvm-api/proto uvm/v1/uvm.proto`).
    let descriptors = protox::compile(["uvm/v1/uvm.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
