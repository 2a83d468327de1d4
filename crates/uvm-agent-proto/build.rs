//! Generates the protobuf messages and the async ttrpc client/server for
//! `proto/agent.proto` into `OUT_DIR`, with ttrpc-codegen's pure-Rust parser
//! (no `protoc` needed).

use std::io::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto/agent.proto");

    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;

    // Our own module index: `include!`d from lib.rs, whose `mod` items then
    // resolve relative to OUT_DIR.
    let mut index = std::fs::File::create(out_dir.join("generated.rs"))?;
    writeln!(index, "pub mod agent;")?;
    writeln!(index, "pub mod agent_ttrpc;")?;
    Ok(())
}
