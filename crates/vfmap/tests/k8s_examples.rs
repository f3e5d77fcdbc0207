//! `examples/kubernetes/daemonset.yaml` carries, in its ConfigMap, a daemon config (with
//! `[kubernetes]`) and device profiles: both are read here by the daemon's own parsers, so the
//! example cannot drift from what `vfmap serve` accepts.

use std::path::Path;

/// The text of the YAML block scalar `key: |` (its lines, de-indented).
fn block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no {key} in the example"));
    let indent = header.len() - header.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_daemonsets_config_and_profiles_are_what_vfmap_serve_accepts() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/kubernetes/daemonset.yaml");
    let yaml = std::fs::read_to_string(path).unwrap();

    let config = vfmap_daemon::serve::parse_config(&block(&yaml, "vfmap.toml")).unwrap();
    assert!(
        config.kubernetes.is_some(),
        "the example's config has no [kubernetes]"
    );
    assert_eq!(
        config.profiles,
        [Path::new("/etc/vfmap/profiles.toml")],
        "the ConfigMap is mounted at /etc/vfmap"
    );

    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("profiles.toml");
    std::fs::write(&profiles, block(&yaml, "profiles.toml")).unwrap();
    let loaded = vfmap_daemon::serve::load_profiles(&[profiles]).unwrap();
    let functions: Vec<String> = loaded.functions().keys().map(|f| f.to_string()).collect();
    assert_eq!(functions, ["compress", "crypto", "storage"]);
    // The plain pod asks for resources the DaemonSet's profiles publish.
    let pod = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/kubernetes/pod.yaml"),
    )
    .unwrap();
    for f in ["crypto", "compress"] {
        assert!(pod.contains(&format!("vfmap.io/{f}: 1")), "{f}");
    }
}
