//! Shared by the tests that boot real kernels under QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static guest binary `name` (built by `scripts/vm/build-static`), or why a VM test cannot
/// run here. Without `VFMAP_REQUIRE_VM` the caller skips and says why; with it, it fails.
pub fn guest_binary(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::var_os("VFMAP_GUEST_BIN").map_or_else(
        || repo_root().join("target/x86_64-unknown-linux-gnu/release"),
        |vfmap| {
            PathBuf::from(vfmap)
                .parent()
                .map(Path::to_owned)
                .unwrap_or_default()
        },
    );
    let bin = dir.join(name);
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(
            "qemu-system-x86_64 is not installed (scripts/install-deps installs it)".into(),
        );
    }
    if !std::fs::read_dir("/boot")
        .map_err(|e| e.to_string())?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    {
        return Err("no kernel in /boot (scripts/install-deps installs linux-image-amd64)".into());
    }
    if !bin.exists() {
        return Err(format!(
            "no static guest binary at {} (run scripts/vm/build-static)",
            bin.display()
        ));
    }
    Ok(bin)
}

/// `Some(binary)`, or `None` after printing why the test is skipped; panics instead when
/// `VFMAP_REQUIRE_VM` is set (as `scripts/test` does).
pub fn require_guest_binary(name: &str) -> Option<PathBuf> {
    match guest_binary(name) {
        Ok(bin) => Some(bin),
        Err(why) if std::env::var_os("VFMAP_REQUIRE_VM").is_none() => {
            eprintln!("skipped: {why}");
            None
        }
        Err(why) => panic!("VFMAP_REQUIRE_VM is set but {why}"),
    }
}
