//! The test world shared by the daemon test files: a generated sysfs tree, the real
//! `vfmap serve` binary, and per-VM test doubles (fake QEMU, fake agent), driven through the CLI.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::Guarded;
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;
use vfmap_testkit::{PfSpec, SysfsTree};

pub const VFS: u16 = 16;

/// Agent arguments for a VM whose guest side the test plays itself (it binds
/// `<dir>/<name>.agent` before adding the VM).
pub const NO_AGENT: &[&str] = &["--none"];
const PROFILE: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 16
[[card.function]]
name = "crypto"
vfs = "0-7"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "8-15"
guest_driver = "uio_pci_generic"
"#;

/// The directory holding this package's binaries, and the testkit's next to them.
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vfmap"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn testkit_bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let path = bin_dir().join(name);
    BUILD.call_once(|| {
        // Cargo builds a dependency's library, not its binaries: build the doubles once.
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vfmap-testkit", "--bins"])
            .status()
            .expect("run cargo build for the test doubles");
        assert!(status.success(), "building the test doubles failed");
    });
    assert!(path.exists(), "{} missing", path.display());
    path
}

pub struct Vm {
    pub name: String,
    pub qmp_state: PathBuf,
    pub agent_state: PathBuf,
    /// The fake QEMU first, then the fake agent (if any): killed with their groups on drop.
    pub children: Vec<Guarded>,
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub daemon: Option<Guarded>,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let tree = SysfsTree::new(dir.path().join("sys"));
        tree.add_driver("vfio-pci");
        let mut pf = PfSpec::nvme("0000:01:00.0", VFS).with_vfs(VFS);
        pf.autoprobe = false;
        tree.add_pf(&pf);
        // Already prepared: every VF on vfio-pci with the override pinned, and resettable.
        for i in 0..VFS {
            let vf = pf.location.vf_location(1, 1, i).unwrap();
            tree.link_driver(vf, "vfio-pci");
            std::fs::write(tree.device_link(vf).join("driver_override"), "vfio-pci\n").unwrap();
            std::fs::write(tree.device_link(vf).join("reset"), "").unwrap();
        }
        std::fs::write(dir.path().join("profiles.toml"), PROFILE).unwrap();
        let socket = dir.path().join("api.sock");
        let config = dir.path().join("vfmap.toml");
        std::fs::write(
            &config,
            format!(
                "sysfs_root = {:?}\nprofiles = [{:?}]\nstate_dir = {:?}\nsocket = {:?}\nagent_timeout_ms = 2000\nqmp_timeout_ms = 5000\n",
                tree.root(),
                dir.path().join("profiles.toml"),
                dir.path().join("state"),
                socket
            ),
        )
        .unwrap();
        World {
            dir,
            socket,
            config,
            daemon: None,
        }
    }

    /// Sets `key = value` lines in the daemon's config (before it starts), replacing the
    /// same keys.
    pub fn configure(&self, extra: &str) {
        let key = |line: &str| line.split('=').next().unwrap_or_default().trim().to_owned();
        let keys: Vec<String> = extra.lines().map(key).collect();
        let mut text: String = std::fs::read_to_string(&self.config)
            .unwrap()
            .lines()
            .filter(|l| !keys.contains(&key(l)))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(extra);
        std::fs::write(&self.config, text).unwrap();
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon running").id()
    }

    /// The daemon's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn start(&mut self, failpoint: Option<&str>) {
        let mut cmd = Guarded::command(env!("CARGO_BIN_EXE_vfmap"));
        cmd.args(["serve", "--config"]).arg(&self.config);
        if let Some(f) = failpoint {
            cmd.env("VFMAP_FAILPOINT", f);
        }
        self.launch(cmd, true);
    }

    /// Starts the daemon and returns as soon as its API answers, possibly still starting.
    pub fn start_answering(&mut self) {
        let mut cmd = Guarded::command(env!("CARGO_BIN_EXE_vfmap"));
        cmd.args(["serve", "--config"]).arg(&self.config);
        self.launch(cmd, false);
    }

    /// Starts the daemon with the given file mode creation mask.
    pub fn start_with_umask(&mut self, umask: u32) {
        let mut cmd = Guarded::command("sh");
        cmd.arg("-c")
            .arg(format!(
                "umask {umask:03o}; exec \"$0\" serve --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_vfmap"))
            .arg(&self.config);
        self.launch(cmd, true);
    }

    /// Spawns the daemon and waits until it answers: with `ready`, until its pool is up.
    fn launch(&mut self, mut cmd: Command, ready: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        cmd.stderr(log).stdout(Stdio::null());
        self.daemon = Some(Guarded::spawn(&mut cmd));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // The socket answers while the daemon still starts: wait for its pool (recovery
            // done), as tests then read what recovery did.
            match self.phase().as_deref() {
                Some("ready") => return,
                Some(_) if !ready => return,
                _ => {}
            }
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait() {
                panic!(
                    "daemon exited {status}; log: {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon did not open its socket; log: {}",
            self.log().display()
        );
    }

    /// Waits for the daemon to die (a failpoint) and reaps it.
    pub fn wait_dead(&mut self) {
        let mut d = self.daemon.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.try_wait().is_none() {
            assert!(Instant::now() < deadline, "daemon did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let mut d = self.daemon.take().unwrap();
        d.kill(); // SIGKILL, and reaped
    }

    pub fn vm(&self, name: &str, slots: usize, agent_args: &[&str], qmp_args: &[&str]) -> Vm {
        let dir = self.dir.path();
        let slot_list: Vec<String> = (0..slots).map(|i| format!("rp{i}")).collect();
        let (qmp, agent) = (
            dir.join(format!("{name}.qmp")),
            dir.join(format!("{name}.agent")),
        );
        let (qmp_state, agent_state) = (
            dir.join(format!("{name}.qmp.state")),
            dir.join(format!("{name}.agent.state")),
        );
        let with_agent = agent_args != NO_AGENT;
        let mut children = vec![Guarded::spawn(
            Guarded::command(testkit_bin("vfmap-fake-qmp"))
                .arg("--socket")
                .arg(&qmp)
                .args(["--slots", &slot_list.join(",")])
                .arg("--state")
                .arg(&qmp_state)
                .args(qmp_args),
        )];
        if with_agent {
            children.push(Guarded::spawn(
                Guarded::command(testkit_bin("vfmap-fake-agent"))
                    .arg("--socket")
                    .arg(&agent)
                    .arg("--state")
                    .arg(&agent_state)
                    .args(agent_args),
            ));
        }
        let doubles = if with_agent {
            vec![&qmp, &agent]
        } else {
            vec![&qmp]
        };
        for s in doubles {
            let deadline = Instant::now() + Duration::from_secs(10);
            while UnixStream::connect(s).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "double did not listen on {}",
                    s.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut args = vec![
            "vm",
            "add",
            name,
            "--qmp",
            qmp.to_str().unwrap(),
            "--agent",
            agent.to_str().unwrap(),
        ];
        for s in &slot_list {
            args.extend(["--slot", s]);
        }
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "vm add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Vm {
            name: name.into(),
            qmp_state,
            agent_state,
            children,
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vfmap"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The start-up phase health reports, if the daemon answers.
    pub fn phase(&self) -> Option<String> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        write!(
            s,
            "GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1)?).ok()?;
        Some(body["phase"].as_str()?.to_owned())
    }

    /// Raw HTTP, for bodies the CLI would never send.
    pub fn raw(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (status, _, body) = self.raw_with(method, path, "", body);
        (status, body)
    }

    /// Raw HTTP with extra header lines (each ending in CRLF); the head comes back lowercased.
    pub fn raw_with(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> (u16, String, Value) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            status,
            head.to_ascii_lowercase(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    /// Everything the daemon exposes, to compare before and after.
    pub fn snapshot(&self) -> (Value, Value) {
        (self.json(&["inventory"]), self.json(&["status"]))
    }
}

pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The daemon's view of a VM agrees with the fake QEMU's: same devices in the same slots, and
/// nothing in flight.
pub fn assert_consistent(world: &World, vm: &Vm) {
    let status = world.json(&["status", &vm.name]);
    let rows = status["correspondence"].as_array().unwrap();
    for row in rows {
        assert_eq!(
            row["state"],
            "ready",
            "left in flight: {row}; log {}",
            world.log().display()
        );
    }
    let mut ours: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} vfmap-vf{} {}",
                r["slot"].as_str().unwrap(),
                r["global_index"],
                r["host_vf"].as_str().unwrap()
            )
        })
        .collect();
    ours.sort();
    let mut theirs = lines(&vm.qmp_state);
    theirs.sort();
    assert_eq!(
        ours,
        theirs,
        "daemon and QEMU disagree; log {}",
        world.log().display()
    );
    let inventory = world.json(&["inventory"]);
    let held = inventory["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["vm"].is_null())
        .count();
    let free: u64 = inventory["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["free"].as_u64().unwrap())
        .sum();
    assert_eq!(held as u64 + free, u64::from(VFS), "a VF leaked");
}
