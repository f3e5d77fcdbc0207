//! Generates the gRPC code of the vendored kubelet APIs (proto/, see proto/NOTICE) with
//! tonic-prost-build and protoc (Debian's protobuf-compiler; `PROTOC` overrides the path).
//!
//! The vendored files are kept byte-for-byte as upstream ships them. They import gogoproto
//! options, which only steer Go code generation; a copy without them is written to OUT_DIR and
//! compiled from there, so gogo.proto is not needed.

use std::path::{Path, PathBuf};

const PROTOS: [&str; 2] = [
    "deviceplugin/v1beta1/api.proto",
    "podresources/v1/api.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("proto");
    let mut files = Vec::new();
    for rel in PROTOS {
        let src = Path::new("proto").join(rel);
        println!("cargo:rerun-if-changed={}", src.display());
        let text = std::fs::read_to_string(&src)?;
        let dst = out.join(rel);
        std::fs::create_dir_all(dst.parent().ok_or("proto path without a parent")?)?;
        std::fs::write(&dst, without_gogoproto(&text))?;
        files.push(dst);
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &[out])?;
    Ok(())
}

/// The proto text without the gogoproto import, file options and field options.
fn without_gogoproto(text: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("import \"github.com/gogo/protobuf/gogoproto/gogo.proto\"")
            || trimmed.starts_with("option (gogoproto.")
        {
            continue;
        }
        match (line.find(" [(gogoproto."), line.rfind("];")) {
            (Some(start), Some(end)) if end > start => {
                kept.push_str(&line[..start]);
                kept.push_str(&line[end + 1..]);
            }
            _ => kept.push_str(line),
        }
        kept.push('\n');
    }
    kept
}
