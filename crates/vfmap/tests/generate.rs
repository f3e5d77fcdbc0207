//! `vfmap generate` (hidden, for packaging): man pages and shell completions come from the
//! CLI definition, cover every visible subcommand, and never show `generate` itself.

use std::process::{Command, Output};

fn vfmap(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(args)
        .output()
        .expect("run vfmap");
    assert!(
        output.status.success(),
        "vfmap {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The subcommands `vfmap <path> --help` lists, but `help`.
fn listed_subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let help = String::from_utf8(vfmap(&args).stdout).unwrap();
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// The man page names `vfmap <path>` and each of its subcommands, recursively, should have.
fn expected_pages(path: &[&str], pages: &mut Vec<String>) {
    pages.push(format!("{}.1", path.join("-")));
    for sub in listed_subcommands(&path[1..]) {
        let mut deeper = path.to_vec();
        deeper.push(&sub);
        expected_pages(&deeper, pages);
    }
}

#[test]
fn man_pages_cover_every_visible_subcommand_and_no_hidden_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man");
    vfmap(&["generate", "man", out.to_str().unwrap()]);
    let mut pages: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    let mut expected = Vec::new();
    expected_pages(&["vfmap"], &mut expected);
    expected.sort();
    assert_eq!(pages, expected);
    for page in [
        "vfmap.1",
        "vfmap-serve.1",
        "vfmap-vm-add.1",
        "vfmap-attach.1",
    ] {
        assert!(pages.iter().any(|p| p == page), "no {page}");
    }
    let root = std::fs::read_to_string(out.join("vfmap.1")).unwrap();
    assert!(root.contains("\n.TH vfmap 1 "), "no title line in vfmap.1");
    assert!(root.contains(".SH FILES") && root.contains("/etc/vfmap/vfmap.toml"));
    assert!(!root.contains("generate"), "vfmap.1 mentions generate");
    let serve = std::fs::read_to_string(out.join("vfmap-serve.1")).unwrap();
    assert!(serve.contains("\\-\\-config") && serve.contains("vfmap\\fR(1)"));
}

#[test]
fn completions_know_the_subcommands_and_hide_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let script = String::from_utf8(vfmap(&["generate", "completions", shell]).stdout).unwrap();
        for sub in [
            "inventory",
            "prepare",
            "serve",
            "attach",
            "detach",
            "status",
            "vm",
        ] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        assert!(
            script.contains("socket"),
            "{shell} completion lacks --socket"
        );
        assert!(
            !script.contains("generate"),
            "{shell} completion offers generate"
        );
    }
    let help = String::from_utf8(vfmap(&["--help"]).stdout).unwrap();
    assert!(!help.contains("generate"), "--help lists generate");
}
