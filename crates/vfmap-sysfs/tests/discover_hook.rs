//! The cards' `discover` hooks against real `/bin/sh` scripts on generated trees: what a hook
//! is told, agreement, each kind of disagreement, a hook that fails, times out, is refused or
//! prints garbage, several PFs at once, and the `vfmap doctor` checks.

use std::fs::{self, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vfmap_core::{Profiles, Tables};
use vfmap_sysfs::discover_hook::doctor_checks;
use vfmap_sysfs::doctor::Status;
use vfmap_sysfs::{
    DiscoverFailure, DiscoverRun, HookError, HookOutput, Invocation, Sysfs, discover_runs, run_hook,
};
use vfmap_testkit::{PfSpec, SysfsTree};

const PF: &str = "0000:3b:00.0";

/// A test host: a generated tree and a directory for hooks and profiles.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    /// One acme PF (1b36:0010) at [`PF`] with 4 of 8 VFs enabled.
    fn new() -> Host {
        let host = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        host.tree().add_pf(&PfSpec::nvme(PF, 8).with_vfs(4));
        host
    }

    fn tree(&self) -> SysfsTree {
        SysfsTree::new(self.dir.path().join("sys"))
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    /// Writes an executable `/bin/sh` hook `name` (mode 0755).
    fn hook(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Card acme: crypto on VFs 0-1, compress on VF 2, VF 3 unassigned; `hooks` goes into
    /// `[card.hooks]`.
    fn profiles(&self, hooks: &str) -> Profiles {
        let text = format!(
            r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[card.hooks]
{hooks}
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2"
guest_driver = "uio_pci_generic"
"#
        );
        Profiles::parse(&text, "profiles.toml").unwrap()
    }

    /// Discovers the tree, builds the tables and runs the discover hooks.
    fn runs(&self, profiles: &Profiles) -> Vec<DiscoverRun> {
        let facts = Sysfs::new(self.root()).discover().unwrap();
        let tables = Tables::build(&facts, profiles);
        discover_runs(&self.root(), profiles, &tables, &run)
    }
}

fn discover_line(path: &Path) -> String {
    format!("discover = {path:?}")
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

fn messages(runs: &[DiscoverRun]) -> Vec<String> {
    runs.iter()
        .flat_map(DiscoverRun::problems)
        .map(|p| {
            assert_eq!((p.device.as_str(), p.attribute.as_str()), (PF, "discover"));
            p.message
        })
        .collect()
}

#[test]
fn a_device_that_agrees_gives_no_problem_and_the_hook_gets_the_pf_wide_contract() {
    let host = Host::new();
    let seen = host.dir.path().join("seen");
    // A realistic hook: it reads how many VFs are enabled from sysfs, prints what each carries.
    let hook = host.hook(
        "acme-discover",
        &format!(
            "env | grep ^VFMAP_ | sort > {seen:?}; echo \"phase $1 args $#\" >> {seen:?}\n\
             n=$(cat \"$VFMAP_SYSFS_ROOT/bus/pci/devices/$VFMAP_PF/sriov_numvfs\")\n\
             echo \"# acme $VFMAP_PF ($n VFs)\"\n\
             echo 'reading the bitstream ids' >&2\n\
             printf '0 crypto\\n1\\tcrypto\\n\\n2 compress\\r\\n'"
        ),
    );
    let profiles = host.profiles(&discover_line(&hook));
    let runs = host.runs(&profiles);
    assert_eq!(runs.len(), 1);
    let one = &runs[0];
    assert!(one.agrees(), "{:?}", one.outcome);
    assert_eq!(messages(&runs), Vec::<String>::new());
    assert_eq!((one.pf.to_string(), one.card.as_str()), (PF.into(), "acme"));
    assert_eq!((one.program.as_path(), one.num_vfs), (hook.as_path(), 4));
    assert_eq!(one.stderr_tail, ["reading the bitstream ids"]);
    let found = &one.outcome.as_ref().unwrap().found;
    assert_eq!(found.len(), 3);
    assert_eq!(found[&2].as_str(), "compress");
    assert_eq!(
        fs::read_to_string(&seen).unwrap(),
        format!(
            "VFMAP_CARD=acme\nVFMAP_PF={PF}\nVFMAP_PHASE=discover\nVFMAP_SYSFS_ROOT={}\n\
             phase discover args 1\n",
            host.root().display()
        )
    );
}

#[test]
fn each_disagreement_is_a_problem_of_its_own_in_order() {
    let host = Host::new();
    // VF 0 agrees; 1 differs; 2 (compress) is missing; 3 (unassigned) is listed; 5 is past
    // the 4 enabled; gzip is no function of the card.
    let hook = host.hook(
        "acme-discover",
        "printf '0 crypto\\n1 compress\\n3 crypto\\n5 crypto\\n6 gzip\\n'",
    );
    let runs = host.runs(&host.profiles(&discover_line(&hook)));
    assert!(!runs[0].agrees());
    let messages = messages(&runs);
    let prefix = format!("card acme: discover hook {}: ", hook.display());
    assert!(
        messages.iter().all(|m| m.starts_with(&prefix)),
        "{messages:#?}"
    );
    let said: Vec<&str> = messages.iter().map(|m| &m[prefix.len()..]).collect();
    assert_eq!(
        said,
        [
            "VF 1 carries function compress on the device, but the profile gives it crypto: \
             fix the profile's vfs lists, or program the VF",
            "the profile gives VF 2 function compress, but the discover hook does not list it: \
             the VF may not be configured, or the hook misses it",
            "VF 3 carries function crypto on the device, but the profile gives it none: add it \
             to that function's vfs list",
            "the discover hook lists VF 5 (function crypto), but only 4 VFs are enabled: VF \
             numbers count from 0 on each PF (the N of virtfnN); check the hook",
            "the discover hook lists VF 6 (function gzip), but only 4 VFs are enabled: VF \
             numbers count from 0 on each PF (the N of virtfnN); check the hook",
            "the device reports function gzip (VFs 6), which the card's profile does not \
             define: add a [[card.function]] named \"gzip\", or program those VFs",
        ]
    );
}

/// The one problem of a run that gave nothing to compare.
fn failure(host: &Host, body: &str, hooks_extra: &str) -> (String, DiscoverRun) {
    let hook = host.hook("acme-discover", body);
    let profiles = host.profiles(&format!("{}\n{hooks_extra}", discover_line(&hook)));
    let mut runs = host.runs(&profiles);
    assert_eq!(runs.len(), 1);
    let messages = messages(&runs);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let prefix = format!("card acme: discover hook {}", hook.display());
    assert!(messages[0].starts_with(&prefix), "{}", messages[0]);
    (messages[0].clone(), runs.remove(0))
}

#[test]
fn a_failing_hook_is_one_problem_with_its_status_and_stderr() {
    let host = Host::new();
    let (message, run) = failure(
        &host,
        "echo '0 crypto'; echo 'acme-discover: no bitstream loaded in region 2' >&2; exit 3",
        "",
    );
    assert!(
        message.ends_with(
            "failed (exit status: 3); last stderr: acme-discover: no bitstream loaded in region 2"
        ),
        "{message}"
    );
    assert!(matches!(
        run.outcome,
        Err(DiscoverFailure::Run(HookError::Failed { .. }))
    ));
    assert!(!run.agrees());
}

#[test]
fn a_hook_past_its_deadline_is_killed_and_is_one_problem() {
    let host = Host::new();
    let started = Instant::now();
    let (message, run) = failure(
        &host,
        "echo 'asking the card' >&2; sleep 30",
        "deadline_ms = 300",
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        message
            .contains("did not finish within its deadline of 300ms; its process group was killed")
            && message.ends_with("last stderr: asking the card"),
        "{message}"
    );
    assert!(
        run.duration >= Duration::from_millis(300),
        "{:?}",
        run.duration
    );
}

#[test]
fn garbage_output_is_one_problem_naming_the_line() {
    let host = Host::new();
    let (message, run) = failure(
        &host,
        "printf '0 crypto\\n1 crypto # ok\\n2 compress\\n'",
        "",
    );
    assert!(
        message.ends_with(
            "printed output that cannot be read: line 2: more than two fields; write \
             `<vf_number> <function>` and nothing after it: \"1 crypto # ok\" (the format is in \
             docs/hooks.md, `discover`)"
        ),
        "{message}"
    );
    assert!(matches!(run.outcome, Err(DiscoverFailure::Output { .. })));
    let (message, _) = failure(&host, "printf '0 \\377crypto\\n'", "");
    assert!(
        message.contains("line 1: the output is not UTF-8"),
        "{message}"
    );
    let (message, _) = failure(&host, "echo 'crypto 0'", "");
    assert!(
        message.contains("line 1: \"crypto\" is not a VF number"),
        "{message}"
    );
}

#[test]
fn a_hook_others_may_write_is_refused_not_run() {
    let host = Host::new();
    let ran = host.dir.path().join("ran");
    let hook = host.hook("acme-discover", &format!("touch {ran:?}; echo '0 crypto'"));
    fs::set_permissions(&hook, Permissions::from_mode(0o777)).unwrap();
    let runs = host.runs(&host.profiles(&discover_line(&hook)));
    let messages = messages(&runs);
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].contains("refusing to run it") && messages[0].contains("writable"),
        "{}",
        messages[0]
    );
    assert!(!ran.exists());
}

#[test]
fn a_card_without_a_discover_hook_runs_nothing() {
    let host = Host::new();
    let scrub = host.hook("acme-scrub", "exit 0");
    let calls = AtomicUsize::new(0);
    let profiles = host.profiles(&format!("scrub = {scrub:?}"));
    let facts = Sysfs::new(host.root()).discover().unwrap();
    let tables = Tables::build(&facts, &profiles);
    let counting = |inv: &Invocation<'_>| {
        calls.fetch_add(1, Ordering::SeqCst);
        run(inv)
    };
    assert!(discover_runs(&host.root(), &profiles, &tables, &counting).is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(doctor_checks(&profiles, &[]).is_empty());
}

#[test]
fn several_pfs_run_at_once_each_with_its_own_pf_and_vf_count() {
    let host = Host::new();
    host.tree()
        .add_pf(&PfSpec::nvme("0000:5e:00.0", 8).with_vfs(2));
    host.tree().add_pf(&PfSpec::nvme("0000:01:00.0", 8));
    // Each PF's hook sleeps 1 s: three in a row would take 3 s.
    let hook = host.hook(
        "acme-discover",
        "sleep 1\n\
         case $VFMAP_PF in\n\
         0000:3b:00.0) printf '0 crypto\\n1 crypto\\n2 compress\\n' ;;\n\
         0000:5e:00.0) printf '0 crypto\\n1 compress\\n' ;;\n\
         *) ;;\n\
         esac",
    );
    let started = Instant::now();
    let runs = host.runs(&host.profiles(&discover_line(&hook)));
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "{took:?}: not run in parallel"
    );
    let pfs: Vec<(String, u16, bool)> = runs
        .iter()
        .map(|r| (r.pf.to_string(), r.num_vfs, r.agrees()))
        .collect();
    assert_eq!(
        pfs,
        [
            ("0000:01:00.0".into(), 0, true),
            ("0000:3b:00.0".into(), 4, true),
            ("0000:5e:00.0".into(), 2, false),
        ]
    );
    let problems: Vec<_> = runs.iter().flat_map(DiscoverRun::problems).collect();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].device, "0000:5e:00.0");
    assert!(
        problems[0]
            .message
            .contains("VF 1 carries function compress on the device")
    );
}

#[test]
fn doctor_has_one_check_per_card_with_a_discover_hook() {
    let host = Host::new();
    let agree = host.hook("agree", "printf '0 crypto\\n1 crypto\\n2 compress\\n'");
    let profiles = host.profiles(&discover_line(&agree));
    let checks = doctor_checks(&profiles, &host.runs(&profiles));
    assert_eq!(checks.len(), 1);
    assert_eq!(
        (checks[0].name.as_str(), checks[0].status),
        ("discover:acme", Status::Ok)
    );
    assert_eq!(
        checks[0].detail,
        format!("the discover hook agrees with the profile on PF {PF} (4 VFs)")
    );

    let differ = host.hook("differ", "printf '0 compress\\n1 crypto\\n2 compress\\n'");
    let profiles = host.profiles(&discover_line(&differ));
    let checks = doctor_checks(&profiles, &host.runs(&profiles));
    assert_eq!(checks[0].status, Status::Error);
    assert!(
        checks[0].detail.starts_with(&format!(
            "PF {PF}: card acme: discover hook {}: VF 0 carries function compress",
            differ.display()
        )),
        "{}",
        checks[0].detail
    );
    assert!(checks[0].fix.as_deref().unwrap().contains("vfs lists"));

    let fail = host.hook("fail", "exit 1");
    let profiles = host.profiles(&discover_line(&fail));
    let checks = doctor_checks(&profiles, &host.runs(&profiles));
    assert_eq!(checks[0].status, Status::Error);
    assert!(
        checks[0].detail.contains("failed (exit status: 1)"),
        "{}",
        checks[0].detail
    );
    assert!(checks[0].fix.as_deref().unwrap().contains("by hand"));

    // A card that covers no PF here: nothing ran, which the check says.
    let text = format!(
        "[[card]]\nname = \"absent\"\nvendor = \"0x8086\"\ndevice = \"0x0001\"\nnum_vfs = 1\n\
         [card.hooks]\n{}\n[[card.function]]\nname = \"x\"\nvfs = \"0\"\nguest_driver = \"pci-stub\"\n",
        discover_line(&agree)
    );
    let profiles = Profiles::parse(&text, "p.toml").unwrap();
    let checks = doctor_checks(&profiles, &host.runs(&profiles));
    assert_eq!(
        (checks[0].name.as_str(), checks[0].status),
        ("discover:absent", Status::Warning)
    );
    assert!(
        checks[0].detail.contains("covers no PF"),
        "{}",
        checks[0].detail
    );
}
