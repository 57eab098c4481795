// Generates the peer protocol (proto/cachefs.proto) with a vendored protoc: no apt step.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/cachefs.proto");
    // Chunk data as `bytes::Bytes`: received and sent without extra copies.
    tonic_prost_build::configure().bytes(".").compile_protos(&["proto/cachefs.proto"], &["proto"])?;
    Ok(())
}
