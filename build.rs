//! Compiles `proto/` with protox (pure Rust: no `protoc` on the machine) and
//! generates the tonic/prost code. The encoded descriptor set is written to
//! `OUT_DIR` by hand because `compile_fds` does not write one, and reflection
//! needs it.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["fanout/v1/fanout.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fanout_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
