//! The hook runner against real `/bin/sh` scripts: the argument and environment contract,
//! failures, deadlines with grandchildren holding the pipes, output bounds, path refusals.

use std::collections::BTreeMap;
use std::fs::{self, Permissions};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use vfmap_core::Bdf;
use vfmap_sysfs::hooks::{STDERR_LINE_LIMIT, STDERR_TAIL_LINES, STDOUT_LIMIT};
use vfmap_sysfs::{
    HookError, HookOutput, HookPathError, HookPhase, Invocation, check_hook_path, run_hook,
};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// Writes an executable `/bin/sh` script `name` (mode 0755) in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    chmod(&path, 0o755);
    path
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
}

/// A `scrub` run of VF 1 (0000:3b:00.2) of card `acme`, function `crypto`, 5 s deadline.
fn invocation(program: &Path) -> Invocation<'_> {
    Invocation {
        program,
        phase: HookPhase::Scrub,
        card: "acme",
        pf: bdf("0000:3b:00.0"),
        vf: Some(bdf("0000:3b:00.2")),
        vf_number: Some(1),
        function: Some("crypto"),
        from_function: None,
        sysfs_root: Path::new("/sys"),
        deadline: Duration::from_secs(5),
    }
}

/// `run_hook`, again if the spawn met ETXTBSY: another test thread forking while this one
/// had a script open for writing (a test-harness race, not the runner's).
fn run(inv: &Invocation<'_>) -> Result<HookOutput, HookError> {
    let mut tries = 0;
    loop {
        match run_hook(inv) {
            Err(HookError::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 5 =>
            {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Whether process `pid` is gone (or a zombie), waiting up to 1 s for it.
fn dead(pid: u32) -> bool {
    let give_up = Instant::now() + Duration::from_secs(1);
    loop {
        let alive = Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))
        });
        if !alive || zombie {
            return true;
        }
        if Instant::now() >= give_up {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The pids a script wrote, one a line, to `file`.
fn pids(file: &Path) -> Vec<u32> {
    fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect()
}

/// Variables a shell sets by itself, not given by the runner.
const SHELL_SET: [&str; 4] = ["PWD", "OLDPWD", "SHLVL", "_"];

/// The script's `env` output after the `--env--` line, without the shell's own variables.
fn env_of(stdout: &str) -> BTreeMap<String, String> {
    let (_, env) = stdout.split_once("--env--\n").unwrap();
    env.lines()
        .map(|line| line.split_once('=').unwrap())
        .filter(|(name, _)| !SHELL_SET.contains(name))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

const REPORT: &str = r#"echo "argc=$#"
echo "arg0=$0"
echo "arg1=$1"
echo "cwd=$(pwd)"
if read line; then echo "stdin=$line"; else echo "stdin=eof"; fi
echo "pgid=$(cut -d" " -f5 /proc/$$/stat)"
echo "pid=$$"
echo --env--
env
"#;

#[test]
fn argv_and_environment_are_exactly_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "report", REPORT);
    // The test process has variables of its own (HOME, CARGO_*, ...); none may reach the hook.
    let ours: Vec<String> = std::env::vars().map(|(name, _)| name).collect();
    let inv = Invocation {
        phase: HookPhase::Program,
        function: Some("compress"),
        from_function: Some("crypto"),
        sysfs_root: Path::new("/tmp/fake sys"),
        ..invocation(&hook)
    };
    let output = run(&inv).unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let head: Vec<&str> = stdout.split("--env--").next().unwrap().lines().collect();
    assert_eq!(
        head[..5],
        [
            "argc=1",
            &format!("arg0={}", hook.display()),
            "arg1=program",
            "cwd=/",
            "stdin=eof",
        ]
    );
    // Its own process group: the group id is its pid.
    assert_eq!(head[5].strip_prefix("pgid="), head[6].strip_prefix("pid="));

    let expected: BTreeMap<String, String> = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("VFMAP_PHASE", "program"),
        ("VFMAP_CARD", "acme"),
        ("VFMAP_PF", "0000:3b:00.0"),
        ("VFMAP_VF", "0000:3b:00.2"),
        ("VFMAP_VF_NUMBER", "1"),
        ("VFMAP_FUNCTION", "compress"),
        ("VFMAP_FROM_FUNCTION", "crypto"),
        ("VFMAP_SYSFS_ROOT", "/tmp/fake sys"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let env = env_of(&stdout);
    assert_eq!(env, expected);
    for name in ours.iter().filter(|name| name.as_str() != "PATH") {
        assert!(!env.contains_key(name), "{name} leaked");
    }
    assert!(output.stderr_tail.is_empty());
    assert!(output.duration < Duration::from_secs(2));
}

#[test]
fn pf_wide_runs_omit_the_vf_variables() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "report", REPORT);
    let inv = Invocation {
        phase: HookPhase::Discover,
        vf: None,
        vf_number: None,
        function: None,
        ..invocation(&hook)
    };
    let output = run(&inv).unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("arg1=discover\n"), "{stdout}");
    let names: Vec<String> = env_of(&stdout).into_keys().collect();
    assert_eq!(
        names,
        [
            "PATH",
            "VFMAP_CARD",
            "VFMAP_PF",
            "VFMAP_PHASE",
            "VFMAP_SYSFS_ROOT"
        ]
    );
}

#[test]
fn discover_output_is_returned_whole() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(
        dir.path(),
        "discover",
        "printf '0 crypto\\n1 compress\\n'\necho 'reading the device' >&2\n",
    );
    let inv = Invocation {
        phase: HookPhase::Discover,
        vf: None,
        vf_number: None,
        function: None,
        ..invocation(&hook)
    };
    let output = run(&inv).unwrap();
    assert_eq!(output.stdout, b"0 crypto\n1 compress\n");
    assert_eq!(output.stderr_tail, ["reading the device"]);
}

#[test]
fn a_non_zero_exit_names_card_phase_program_status_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(
        dir.path(),
        "fails",
        "echo 'wiping VF 1' >&2\necho 'the card said no' >&2\nexit 3\n",
    );
    let error = run(&invocation(&hook)).unwrap_err();
    let message = error.to_string();
    let HookError::Failed {
        status,
        stderr_tail,
        context,
    } = error
    else {
        panic!("{message}");
    };
    assert_eq!(status.code(), Some(3));
    assert_eq!(stderr_tail, ["wiping VF 1", "the card said no"]);
    assert_eq!(context.card, "acme");
    assert_eq!(context.phase, HookPhase::Scrub);
    assert_eq!(context.program, hook);
    assert_eq!(
        message,
        format!(
            "card acme: scrub hook {} failed (exit status: 3); last stderr: wiping VF 1 | the card said no",
            hook.display()
        )
    );
}

#[test]
fn death_by_a_signal_is_a_failure_naming_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(
        dir.path(),
        "killed",
        "echo 'about to die' >&2\nkill -9 $$\n",
    );
    let error = run(&invocation(&hook)).unwrap_err();
    let message = error.to_string();
    let HookError::Failed { status, .. } = error else {
        panic!("{message}");
    };
    assert_eq!(status.signal(), Some(9));
    assert!(message.contains("signal: 9"), "{message}");
    assert!(message.ends_with("last stderr: about to die"), "{message}");
}

#[test]
fn the_deadline_kills_the_group_even_with_a_grandchild_holding_the_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let hook = script(
        dir.path(),
        "hangs",
        &format!(
            "sleep 1000 &\necho $! > '{}'\necho $$ >> '{}'\necho 'programming...' >&2\nsleep 1000\n",
            pid_file.display(),
            pid_file.display()
        ),
    );
    let deadline = Duration::from_millis(500);
    let started = Instant::now();
    let error = run(&Invocation {
        deadline,
        ..invocation(&hook)
    })
    .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < deadline + Duration::from_secs(1), "{elapsed:?}");
    let message = error.to_string();
    assert!(
        message.contains("did not finish within its deadline of 500ms"),
        "{message}"
    );
    let HookError::Deadline {
        deadline: reported,
        stderr_tail,
        ..
    } = error
    else {
        panic!("{message}");
    };
    assert_eq!(reported, deadline);
    assert_eq!(stderr_tail, ["programming..."]);
    let pids = pids(&pid_file);
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(dead(pid), "process {pid} of the hook's group survived");
    }
}

#[test]
fn what_a_hook_leaves_running_is_killed_when_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let hook = script(
        dir.path(),
        "leaves",
        &format!(
            "sleep 1000 &\necho $! > '{}'\necho done\n",
            pid_file.display()
        ),
    );
    let started = Instant::now();
    let output = run(&invocation(&hook)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(output.stdout, b"done\n");
    let pids = pids(&pid_file);
    assert!(dead(pids[0]), "the leftover {} survived", pids[0]);
}

#[test]
fn stdout_up_to_the_limit_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(
        dir.path(),
        "big",
        &format!("head -c {STDOUT_LIMIT} /dev/zero\n"),
    );
    let output = run(&invocation(&hook)).unwrap();
    assert_eq!(output.stdout.len(), STDOUT_LIMIT);
}

#[test]
fn a_stdout_flood_is_bounded_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "flood", "head -c 20000000 /dev/zero\n");
    let started = Instant::now();
    let error = run(&invocation(&hook)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    let message = error.to_string();
    let HookError::OutputTooLarge { limit, .. } = error else {
        panic!("{message}");
    };
    assert_eq!(limit, STDOUT_LIMIT);
    assert!(
        message.contains("more than 1048576 bytes on stdout"),
        "{message}"
    );
}

#[test]
fn a_stderr_flood_keeps_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "yes", "yes 'flood line' >&2\n");
    let error = run(&Invocation {
        deadline: Duration::from_millis(500),
        ..invocation(&hook)
    })
    .unwrap_err();
    let message = error.to_string();
    let HookError::Deadline { stderr_tail, .. } = error else {
        panic!("{message}");
    };
    assert_eq!(stderr_tail.len(), STDERR_TAIL_LINES);
    assert!(
        stderr_tail.iter().all(|line| line == "flood line"),
        "{stderr_tail:?}"
    );
}

#[test]
fn an_endless_stderr_line_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(
        dir.path(),
        "long",
        "head -c 5000000 /dev/zero | tr '\\000' x >&2\necho >&2\nprintf '\\033[31mred\\n' >&2\nexit 1\n",
    );
    let error = run(&invocation(&hook)).unwrap_err();
    let message = error.to_string();
    let HookError::Failed { stderr_tail, .. } = error else {
        panic!("{message}");
    };
    assert_eq!(stderr_tail.len(), 2);
    assert_eq!(
        stderr_tail[0],
        format!("{}…", "x".repeat(STDERR_LINE_LIMIT))
    );
    assert_eq!(stderr_tail[1], "\\u{1b}[31mred");
}

#[test]
fn a_spawn_failure_gives_the_os_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-interpreter");
    fs::write(&path, "#!/nonexistent/interpreter\n").unwrap();
    chmod(&path, 0o755);
    let error = run(&invocation(&path)).unwrap_err();
    let message = error.to_string();
    let HookError::Spawn { source, .. } = error else {
        panic!("{message}");
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(message.contains("#! interpreter"), "{message}");
}

#[test]
fn control_characters_in_names_refuse_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let hook = script(
        dir.path(),
        "marks",
        &format!("touch '{}'\n", marker.display()),
    );
    for (card, function) in [
        ("ac\nme", "crypto"),
        ("ac\0me", "crypto"),
        ("acme", "cr\x1bypto"),
    ] {
        let inv = Invocation {
            card,
            function: Some(function),
            ..invocation(&hook)
        };
        let error = run(&inv).unwrap_err();
        assert!(
            matches!(error, HookError::InvalidInput { .. }),
            "{card:?} {function:?}: {error}"
        );
        assert!(!error.to_string().contains('\n'), "{error}");
    }
    assert!(!marker.exists(), "the hook ran");
}

#[test]
fn run_hook_checks_the_path_first() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let hook = script(
        dir.path(),
        "marks",
        &format!("touch '{}'\n", marker.display()),
    );
    chmod(&hook, 0o757);
    let error = run(&invocation(&hook)).unwrap_err();
    assert!(
        matches!(
            error,
            HookError::Path {
                source: HookPathError::FileWritable { .. },
                ..
            }
        ),
        "{error}"
    );
    assert!(!marker.exists(), "the hook ran");
}

#[test]
fn a_relative_path_is_refused() {
    let error = check_hook_path(Path::new("hooks/acme")).unwrap_err();
    assert!(
        matches!(error, HookPathError::NotAbsolute { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("not absolute"), "{error}");
    let error = check_hook_path(Path::new("/usr/../bin/true")).unwrap_err();
    assert!(
        matches!(error, HookPathError::ParentComponent { .. }),
        "{error}"
    );
}

#[test]
fn a_missing_file_or_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = check_hook_path(&dir.path().join("missing")).unwrap_err();
    assert!(
        matches!(error, HookPathError::Inaccessible { .. }),
        "{error}"
    );
    let error = check_hook_path(dir.path()).unwrap_err();
    assert!(
        matches!(
            error,
            HookPathError::NotAFile {
                kind: "directory",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_symlink_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "real", "exit 0\n");
    let link = dir.path().join("link");
    symlink(&hook, &link).unwrap();
    check_hook_path(&hook).unwrap();
    let error = check_hook_path(&link).unwrap_err();
    let message = error.to_string();
    let HookPathError::Symlink { path, target } = error else {
        panic!("{message}");
    };
    assert_eq!((path, target), (link, hook));
    assert!(
        message.contains("point the profile at the real file"),
        "{message}"
    );
}

#[test]
fn a_symlinked_directory_on_the_way_is_followed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    chmod(&real, 0o755);
    script(&real, "hook", "exit 0\n");
    symlink("real", dir.path().join("via")).unwrap();
    let through_link = dir.path().join("via/hook");
    check_hook_path(&through_link).unwrap();
    // The link's target directory is checked too.
    chmod(&real, 0o777);
    let error = check_hook_path(&through_link).unwrap_err();
    let HookPathError::DirWritable { dir: refused, .. } = &error else {
        panic!("{error}");
    };
    assert_eq!(refused, &real);
}

#[test]
fn a_group_writable_file_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "hook", "exit 0\n");
    chmod(&hook, 0o775);
    let error = check_hook_path(&hook).unwrap_err();
    assert!(
        matches!(error, HookPathError::FileWritable { .. }),
        "{error}"
    );
    assert!(
        error.to_string().ends_with(&format!(
            "(mode 0775), so they could change what vfmap runs; chmod go-w {}",
            hook.display()
        )),
        "{error}"
    );
}

#[test]
fn a_file_not_executable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hook = script(dir.path(), "hook", "exit 0\n");
    chmod(&hook, 0o644);
    let error = check_hook_path(&hook).unwrap_err();
    assert!(
        matches!(error, HookPathError::NotExecutable { .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .ends_with(&format!("chmod u+x {}", hook.display())),
        "{error}"
    );
}

#[test]
fn a_world_writable_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    fs::create_dir(&hooks).unwrap();
    let hook = script(&hooks, "hook", "exit 0\n");
    chmod(&hooks, 0o777);
    let error = check_hook_path(&hook).unwrap_err();
    let message = error.to_string();
    let HookPathError::DirWritable {
        dir: refused, mode, ..
    } = error
    else {
        panic!("{message}");
    };
    assert_eq!(refused, hooks);
    assert_eq!(mode & 0o7777, 0o777);
    assert!(
        message.ends_with(&format!("chmod go-w {}", hooks.display())),
        "{message}"
    );
}

#[test]
fn a_sticky_world_writable_parent_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    fs::create_dir(&hooks).unwrap();
    let hook = script(&hooks, "hook", "echo ok\n");
    chmod(&hooks, 0o1777);
    check_hook_path(&hook).unwrap();
    assert_eq!(run(&invocation(&hook)).unwrap().stdout, b"ok\n");
}

#[test]
fn files_and_directories_owned_by_others_are_refused() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: giving files away needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hooks = dir.path().join("hooks");
    fs::create_dir(&hooks).unwrap();
    chmod(&hooks, 0o755);
    let hook = script(&hooks, "hook", "exit 0\n");
    std::os::unix::fs::chown(&hook, Some(65534), None).unwrap();
    let error = check_hook_path(&hook).unwrap_err();
    assert!(
        matches!(error, HookPathError::FileOwner { uid: 65534, .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .ends_with(&format!("chown root {}", hook.display()))
    );
    std::os::unix::fs::chown(&hook, Some(0), None).unwrap();
    std::os::unix::fs::chown(&hooks, Some(65534), None).unwrap();
    let error = check_hook_path(&hook).unwrap_err();
    assert!(
        matches!(error, HookPathError::DirOwner { uid: 65534, .. }),
        "{error}"
    );
}
