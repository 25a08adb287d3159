//! Compiles the gRPC contract in proto/ with a vendored protoc (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(&["proto/mergefleet/v1/cluster.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
