//! `prepare` runs the cards' `bring_up` hooks: per VF, in VF order, with the hook contract's
//! environment, after the VFs exist and before any is bound (so before any is offered); a
//! failing or overrunning hook stops it with an error naming card, VF and hook. Real `/bin/sh`
//! scripts on generated trees, against the fake kernel.

use std::cell::RefCell;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vfmap_core::plan::plan_bring_ups;
use vfmap_core::{Bdf, Profiles, Step, Tables};
use vfmap_sysfs::{
    HookError, HookOutput, Invocation, PrepareError, PrepareReport, Sysfs, SysfsWriter,
    prepare_with_hooks, run_hook,
};
use vfmap_testkit::{FakeKernel, FakeModules, PfSpec, SysfsTree};

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// Card `acme` (QEMU's NVMe IDs), 4 VFs: 0-1 crypto, 2 compress (with its own hook), 3 none.
fn profile(card_hook: &Path, compress_hook: &Path, deadline_ms: u32) -> String {
    format!(
        r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 4
[card.hooks]
bring_up = "{}"
deadline_ms = {deadline_ms}
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2"
guest_driver = "uio_pci_generic"
host_driver = "pci-stub"
[card.function.hooks]
bring_up = "{}"
"#,
        card_hook.display(),
        compress_hook.display()
    )
}

/// A hook that appends its argument, its environment and whether its VF has a driver to
/// `<dir>/runs` (it fails when its VF does not exist); `extra` runs after that.
fn hook_body(dir: &Path, tag: &str, extra: &str) -> String {
    format!(
        r#"set -eu
dev="$VFMAP_SYSFS_ROOT/bus/pci/devices/$VFMAP_VF"
[ -e "$dev" ] || {{ echo "no VF at $dev" >&2; exit 9; }}
if [ -e "$dev/driver" ]; then bound=bound; else bound=unbound; fi
echo "{tag} $1 $VFMAP_PHASE $VFMAP_CARD $VFMAP_PF $VFMAP_VF $VFMAP_VF_NUMBER ${{VFMAP_FUNCTION-unset}} ${{VFMAP_FROM_FUNCTION-unset}} $VFMAP_SYSFS_ROOT ${{HOME-nohome}} $bound" >> "{}/runs"
echo "brought up $VFMAP_VF" >&2
{extra}
"#,
        dir.display()
    )
}

/// Writes an executable `/bin/sh` script (mode 0755).
fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    fs::set_permissions(path, Permissions::from_mode(0o755)).unwrap();
}

struct Rig {
    dir: tempfile::TempDir,
    tree: SysfsTree,
    kernel: FakeKernel,
    modules: FakeModules,
    /// Sysfs writes ("write <attribute> <value>") and hook runs ("hook <vf>"), in order.
    log: RefCell<Vec<String>>,
}

/// Records the fake kernel's writes in the rig's log.
struct Recording<'a>(&'a Rig);

impl SysfsWriter for Recording<'_> {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let attribute = path.file_name().unwrap().to_string_lossy();
        self.0
            .log
            .borrow_mut()
            .push(format!("write {attribute} {value}"));
        self.0.kernel.write(path, value)
    }
}

impl Rig {
    fn new(vfs: u16) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        tree.add_pf(&PfSpec::nvme("0000:01:00.0", 8).with_vfs(vfs));
        Rig {
            kernel: FakeKernel::new(tree.clone()).autoprobe_to("nvme"),
            modules: FakeModules::new(tree.clone()),
            tree,
            dir,
            log: RefCell::new(Vec::new()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `card` and `compress` hooks, each running `extra` after recording its run.
    fn hooks(&self, extra: &str) -> (PathBuf, PathBuf) {
        let (card, compress) = (self.path("card-up"), self.path("compress-up"));
        script(&card, &hook_body(self.dir.path(), "card", extra));
        script(&compress, &hook_body(self.dir.path(), "compress", extra));
        (card, compress)
    }

    fn runs(&self) -> Vec<String> {
        fs::read_to_string(self.path("runs"))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// `prepare` with the real runner behind a recording one; the steps it announced too.
    fn prepare(&self, profile: &str) -> (Result<PrepareReport, PrepareError>, Vec<Step>) {
        let profiles = Profiles::parse(profile, "p.toml").unwrap();
        let sysfs = Sysfs::new(self.tree.root());
        let hooks = |inv: &Invocation<'_>| {
            self.log
                .borrow_mut()
                .push(format!("hook {}", inv.vf.unwrap()));
            run(inv)
        };
        let mut announced = Vec::new();
        let result = prepare_with_hooks(
            &sysfs,
            &profiles,
            &Recording(self),
            &self.modules,
            &hooks,
            Duration::from_millis(50),
            &mut |step| announced.push(step.clone()),
        );
        (result, announced)
    }

    fn driver(&self, vf: &str) -> Option<String> {
        Sysfs::new(self.tree.root()).driver_of(bdf(vf)).unwrap()
    }
}

/// `run_hook`, again if the spawn met ETXTBSY: another test thread forking while this one
/// had a script open for writing (a test-harness race, not the runner's).
fn run(inv: &Invocation<'_>) -> Result<HookOutput, HookError> {
    let mut tries = 0;
    loop {
        match run_hook(inv) {
            Err(HookError::Spawn { source, .. })
                if source.kind() == io::ErrorKind::ExecutableFileBusy && tries < 5 =>
            {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

#[test]
fn hooks_run_per_vf_in_order_after_the_vfs_exist_and_before_any_bind() {
    let rig = Rig::new(0);
    let (card, compress) = rig.hooks("");
    let (report, announced) = rig.prepare(&profile(&card, &compress, 5000));
    let report = report.unwrap();

    let root = rig.tree.root().display().to_string();
    let line = |tag: &str, vf: &str, n: u16, function: &str| {
        format!(
            "{tag} bring_up bring_up acme 0000:01:00.0 {vf} {n} {function} unset {root} nohome unbound"
        )
    };
    assert_eq!(
        rig.runs(),
        [
            line("card", "0000:01:00.1", 0, "crypto"),
            line("card", "0000:01:00.2", 1, "crypto"),
            line("compress", "0000:01:00.3", 2, "compress"),
            // VF 3 has no function: the card's hook, without VFMAP_FUNCTION.
            line("card", "0000:01:00.4", 3, "unset"),
        ]
    );

    // Order: the VFs are created, then brought up one by one, then bound.
    let log = rig.log.borrow();
    let at = |entry: &str| {
        log.iter()
            .position(|e| e == entry)
            .unwrap_or_else(|| panic!("{entry} not in {log:#?}"))
    };
    let hooks: Vec<usize> = (1..=4)
        .map(|f| at(&format!("hook 0000:01:00.{f}")))
        .collect();
    assert!(hooks.windows(2).all(|w| w[0] < w[1]), "{log:#?}");
    assert!(at("write sriov_numvfs 4") < hooks[0], "{log:#?}");
    let first_bind = log
        .iter()
        .position(|e| e.starts_with("write driver_override"))
        .unwrap();
    assert!(hooks[3] < first_bind, "{log:#?}");

    // The steps: reported and announced alike, hooks between numvfs and the binds.
    assert_eq!(announced, report.steps);
    let kinds: Vec<&str> = report
        .steps
        .iter()
        .map(|s| match s {
            Step::DisableAutoprobe { .. } => "autoprobe",
            Step::SetNumVfs { .. } => "numvfs",
            Step::BringUp(_) => "bring_up",
            Step::Bind { .. } => "bind",
            Step::PinOverride { .. } => "pin",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "autoprobe",
            "numvfs",
            "bring_up",
            "bring_up",
            "bring_up",
            "bring_up",
            "bind",
            "bind",
            "bind"
        ]
    );
    assert_eq!(
        report.steps[4].to_string(),
        format!(
            "0000:01:00.3: run bring_up hook {} (card \"acme\", VF 2 of 0000:01:00.0)",
            compress.display()
        )
    );
    assert_eq!(rig.driver("0000:01:00.1").as_deref(), Some("vfio-pci"));
    assert_eq!(rig.driver("0000:01:00.3").as_deref(), Some("pci-stub"));
}

#[test]
fn every_prepare_runs_the_hooks_again_and_writes_nothing_else() {
    let rig = Rig::new(0);
    let (card, compress) = rig.hooks("");
    let profile = profile(&card, &compress, 5000);
    rig.prepare(&profile).0.unwrap();
    let writes = rig.kernel.writes().len();
    let report = rig.prepare(&profile).0.unwrap();
    assert!(report.steps.iter().all(Step::is_hook), "{:?}", report.steps);
    assert_eq!(report.steps.len(), 4);
    let runs = rig.runs();
    assert_eq!(runs.len(), 8, "each VF brought up once per prepare");
    // The second time on bound VFs (VF 3, without a function, stays unbound).
    assert!(
        runs[4..7].iter().all(|r| r.ends_with(" bound")),
        "{runs:#?}"
    );
    assert!(runs[7].ends_with(" unbound"), "{runs:#?}");
    assert_eq!(rig.kernel.writes().len(), writes, "no sysfs write");
    assert_eq!(report.tables.vfs.len(), 4);
}

#[test]
fn the_plan_lists_the_hooks_without_running_them() {
    // What `vfmap prepare --dry-run` prints: the planner's steps, nothing run.
    let rig = Rig::new(4);
    let (card, compress) = rig.hooks("");
    let profiles = Profiles::parse(&profile(&card, &compress, 5000), "p.toml").unwrap();
    let facts = Sysfs::new(rig.tree.root()).discover().unwrap();
    let steps = plan_bring_ups(&Tables::build(&facts, &profiles), &profiles);
    let shown: Vec<String> = steps.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 4, "{shown:#?}");
    assert!(
        shown[0].starts_with(&format!(
            "0000:01:00.1: run bring_up hook {} (card",
            card.display()
        )),
        "{shown:#?}"
    );
    assert!(shown[2].contains("compress-up"), "{shown:#?}");
    assert!(rig.runs().is_empty(), "planning ran a hook");
}

#[test]
fn a_failing_hook_stops_prepare_before_any_bind_with_a_clear_error() {
    let rig = Rig::new(0);
    let (card, compress) = rig.hooks(
        r#"if [ "$VFMAP_VF_NUMBER" = 1 ]; then echo "controller 2 refused: no resources" >&2; exit 3; fi"#,
    );
    let (result, _) = rig.prepare(&profile(&card, &compress, 5000));
    let err = result.unwrap_err();
    let PrepareError::BringUp { vf, card: name, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!((*vf, name.as_str()), (bdf("0000:01:00.2"), "acme"));
    // The whole chain, as the CLI and the daemon print it.
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        message.push_str(&format!(": {e}"));
        source = e.source();
    }
    for part in [
        "0000:01:00.2: run bring_up hook",
        "card \"acme\", VF 1 of 0000:01:00.0",
        "prepare stopped before binding any VF",
        &format!("card acme: bring_up hook {} failed", card.display()),
        "exit status: 3",
        "controller 2 refused: no resources",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // VF 0 was brought up (and stays so); nothing after VF 1 ran, nothing was bound.
    assert_eq!(rig.runs().len(), 2);
    for f in 1..=4 {
        assert_eq!(rig.driver(&format!("0000:01:00.{f}")), None);
    }
    assert!(
        !rig.log
            .borrow()
            .iter()
            .any(|e| e.starts_with("write driver_override")),
        "a VF was bound after a failed bring_up"
    );
}

#[test]
fn a_hook_past_its_deadline_is_killed_and_fails_prepare() {
    let rig = Rig::new(0);
    let (card, compress) = rig.hooks("exec sleep 10");
    let started = Instant::now();
    let (result, _) = rig.prepare(&profile(&card, &compress, 300));
    let took = started.elapsed();
    let err = result.unwrap_err();
    let PrepareError::BringUp { vf, source, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*vf, bdf("0000:01:00.1"));
    assert!(
        matches!(&**source, HookError::Deadline { deadline, .. } if *deadline == Duration::from_millis(300)),
        "{source:?}"
    );
    assert!(
        source
            .to_string()
            .contains("did not finish within its deadline"),
        "{source}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_hook_writable_by_others_is_refused_and_not_run() {
    let rig = Rig::new(0);
    let (card, compress) = rig.hooks("");
    fs::set_permissions(&card, Permissions::from_mode(0o757)).unwrap();
    let (result, _) = rig.prepare(&profile(&card, &compress, 5000));
    let err = result.unwrap_err();
    assert!(
        matches!(&err, PrepareError::BringUp { source, .. } if matches!(**source, HookError::Path { .. })),
        "{err:?}"
    );
    assert!(rig.runs().is_empty());
}
