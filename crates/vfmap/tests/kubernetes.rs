//! The device plugin inside the real daemon binary (`vfmap serve` with `[kubernetes]`),
//! against a fake kubelet (vfmap-testkit's `FakeKubelet`: Registration, PodResources, and a
//! client of the plugin's endpoints) on a generated sysfs tree, with VMs played by the fake
//! QEMU and agent. Issue 12's scenario as far as it goes without a real kubelet: registration
//! per function, ListAndWatch, Allocate recorded durably with its env and devices, `vfmap
//! attach` never given a kubelet-held VF (nor the kubelet a VM's), the owner from
//! PodResources in `vfmap status`, a kubelet restart and a daemon `kill -9` keeping the
//! allocation, and reconciliation releasing a VF no pod holds (reset, free).

mod common;
mod world;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use vfmap_testkit::kubelet::FakeKubelet;
use world::*;

const CRYPTO: &str = "vfmap-crypto.sock";

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct K8sWorld {
    world: World,
    kubelet: FakeKubelet,
}

impl K8sWorld {
    fn new() -> K8sWorld {
        let world = World::new();
        let plugins = world.dir.path().join("device-plugins");
        let pod_resources = world.dir.path().join("pod-resources.sock");
        let kubelet = FakeKubelet::start(&plugins, &pod_resources);
        world.configure(&format!(
            "[kubernetes]\ndevice_plugin_dir = {plugins:?}\npod_resources_socket = {pod_resources:?}\nreconcile_interval_ms = 200\nrelease_grace_ms = 1500\n"
        ));
        K8sWorld { world, kubelet }
    }

    /// Starts the daemon and waits for its two resources to register (`more` registrations
    /// after those seen so far).
    fn start(&mut self) {
        let before = self.kubelet.registrations().len();
        self.world.start(None);
        eventually("the plugin's registrations", || {
            self.kubelet.registrations().len() >= before + 2
        });
    }

    /// The inventory row of the VF at `location`.
    fn vf(&self, location: &str) -> Value {
        let inventory = self.world.json(&["inventory"]);
        inventory["vfs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["location"] == location)
            .cloned()
            .unwrap()
    }

    /// `GET /metrics`'s text.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.world.socket).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    }

    fn iommu_group(&self, location: &str) -> String {
        let link: PathBuf = self
            .world
            .dir
            .path()
            .join("sys/bus/pci/devices")
            .join(location)
            .join("iommu_group");
        std::fs::read_link(link)
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

#[test]
fn the_daemons_device_plugin_shares_its_pool_with_vms_and_survives_restarts() {
    let mut k = K8sWorld::new();
    k.start();
    let mut registered = k.kubelet.registrations();
    registered.sort();
    assert_eq!(
        registered,
        [
            ("vfmap.io/compress".into(), "vfmap-compress.sock".into()),
            ("vfmap.io/crypto".into(), CRYPTO.into()),
        ]
    );

    // ListAndWatch: one device per VF of the function, by BDF, all healthy.
    let crypto = k.kubelet.list_devices(CRYPTO).unwrap();
    assert_eq!(crypto.len(), 8, "{crypto:?}");
    assert!(crypto.iter().all(|(_, health, _)| health == "Healthy"));
    assert_eq!(
        k.kubelet.list_devices("vfmap-compress.sock").unwrap().len(),
        8
    );
    let held = crypto[0].0.clone();

    // Allocate: recorded, with the env and /dev/vfio nodes.
    let allocated = k.kubelet.allocate(CRYPTO, &[&held]).unwrap();
    assert_eq!(allocated.envs["PCI_RESOURCE_VFMAP_IO_CRYPTO"], held);
    assert_eq!(allocated.envs["VFMAP_FUNCTION_CRYPTO"], held);
    assert_eq!(
        allocated.devices,
        [
            "/dev/vfio/vfio".to_owned(),
            format!("/dev/vfio/{}", k.iommu_group(&held))
        ]
    );
    let row = k.vf(&held);
    assert!(row["vm"].is_null(), "{row}");
    assert_eq!(row["kubelet"]["state"], "held");
    assert!(row["kubelet"]["owner"].is_null());
    // The kubelet lists the pod's container at once (an unlisted VF would be released after
    // the grace period).
    k.kubelet.set_pods(&[(
        "default",
        "vf-pod",
        "app",
        "vfmap.io/crypto",
        &[held.as_str()],
    )]);

    // A VM asking for every crypto VF gets the seven others, never the kubelet's.
    let _vm = k.world.vm("web-1", 8, &[], &[]);
    let out = k.world.cli(&["attach", "web-1", "crypto", "--count", "8"]);
    assert!(
        !out.status.success(),
        "8 crypto VFs for a VM while the kubelet holds one: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        k.world.json(&["inventory"])
    );
    let doc = k.world.json(&["attach", "web-1", "crypto", "--count", "7"]);
    let given: Vec<&str> = doc["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host_vf"].as_str().unwrap())
        .collect();
    assert_eq!(given.len(), 7);
    assert!(!given.contains(&held.as_str()), "{given:?}");
    // And the kubelet is refused a VM's VF, which it sees unhealthy.
    let refused = k.kubelet.allocate(CRYPTO, &[given[0]]).unwrap_err();
    assert!(refused.contains("FailedPrecondition"), "{refused}");
    eventually("the VM's VFs unhealthy in ListAndWatch", || {
        let devices = k.kubelet.list_devices(CRYPTO).unwrap();
        devices
            .iter()
            .all(|(id, health, _)| (id == &held) == (health == "Healthy"))
    });

    // PodResources names the container: recorded, shown by `vfmap status`.
    eventually("the owner recorded", || {
        k.vf(&held)["kubelet"]["owner"]["pod"] == "vf-pod"
    });
    let metrics = k.metrics();
    assert!(
        metrics.contains(r#"vfmap_vfs{function="crypto",state="kubelet"} 1"#),
        "{metrics}"
    );
    let status = k.world.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("Kubernetes (held by the kubelet, 1 VF(s))")
            && text.contains(&held)
            && text.contains("pod default/vf-pod/app"),
        "{text}"
    );

    let inventory = String::from_utf8(k.world.cli(&["inventory"]).stdout).unwrap();
    let line = inventory.lines().find(|l| l.contains(&held)).unwrap();
    assert!(
        line.contains("pod default/vf-pod/app") && line.contains("held"),
        "{inventory}"
    );

    // A kubelet restart: registered again, the allocation kept.
    let before = k.kubelet.registrations().len();
    k.kubelet.restart();
    eventually("re-registration after the kubelet restart", || {
        k.kubelet.registrations().len() >= before + 2
    });
    assert_eq!(k.vf(&held)["kubelet"]["owner"]["pod"], "vf-pod");

    // kill -9 and restart: the hold is durable, the plugin registers again.
    k.world.kill9();
    k.start();
    let row = k.vf(&held);
    assert_eq!(row["kubelet"]["state"], "held", "{row}");
    assert_eq!(row["kubelet"]["owner"]["container"], "app");
    let again = k.kubelet.allocate(CRYPTO, &[&held]).unwrap();
    assert_eq!(again.envs["PCI_RESOURCE_VFMAP_IO_CRYPTO"], held);

    // The pod is gone: after the grace period the VF is reset and free again.
    let reset = k
        .world
        .dir
        .path()
        .join("sys/bus/pci/devices")
        .join(&held)
        .join("reset");
    std::fs::write(&reset, "").unwrap();
    k.kubelet.set_pods(&[]);
    eventually("the release", || k.vf(&held)["kubelet"].is_null());
    assert!(k.vf(&held)["vm"].is_null());
    assert_eq!(std::fs::read_to_string(&reset).unwrap().trim(), "1");
    let status = String::from_utf8(k.world.cli(&["status"]).stdout).unwrap();
    assert!(!status.contains("Kubernetes"), "{status}");
    // Free for a VM now.
    let doc = k.world.json(&["attach", "web-1", "crypto"]);
    assert_eq!(doc["attached"][0]["host_vf"], held.as_str());
}

#[test]
fn a_free_vf_the_kubelet_lists_is_adopted_and_the_config_is_checked() {
    let mut k = K8sWorld::new();
    k.start();
    let crypto = k.kubelet.list_devices(CRYPTO).unwrap();
    let listed = crypto[3].0.clone();
    // The kubelet's records give a VF to a running container that vfmap does not know of
    // (its database was lost): it is taken for that container, so no VM gets it.
    k.kubelet
        .set_pods(&[("ns", "adopted", "c", "vfmap.io/crypto", &[listed.as_str()])]);
    eventually("the adoption", || {
        k.vf(&listed)["kubelet"]["owner"]["pod"] == "adopted"
    });

    // A bad [kubernetes] section stops the daemon before it starts.
    let bad = k.world.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&k.world.config).unwrap();
    std::fs::write(
        &bad,
        text.replace(
            "[kubernetes]\n",
            "[kubernetes]\nresource_prefix = \"k8s.io\"\n",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vfmap"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("resource prefix \\\"k8s.io\\\"") || stderr.contains("k8s.io"),
        "{stderr}"
    );
}

#[test]
fn a_kill_during_allocate_or_release_is_recovered() {
    let mut k = K8sWorld::new();
    // Killed right after the hold is committed, before Allocate answers.
    k.world.start(Some("kubelet_held"));
    eventually("the plugin's registrations", || {
        k.kubelet.registrations().len() >= 2
    });
    let held = k.kubelet.list_devices(CRYPTO).unwrap()[0].0.clone();
    // The kubelet lists it for its container throughout (it would otherwise be released after
    // the grace period).
    k.kubelet
        .set_pods(&[("default", "p", "app", "vfmap.io/crypto", &[held.as_str()])]);
    assert!(k.kubelet.allocate(CRYPTO, &[&held]).is_err());
    k.world.wait_dead();
    // The hold survived; Allocate again (as the kubelet retries) is accepted.
    k.start();
    assert_eq!(k.vf(&held)["kubelet"]["state"], "held");
    let allocated = k.kubelet.allocate(CRYPTO, &[&held]).unwrap();
    assert_eq!(allocated.envs["PCI_RESOURCE_VFMAP_IO_CRYPTO"], held);
    k.world.kill9();

    // Killed after the release is committed, before the reset: the next start finishes it.
    k.world.start(Some("kubelet_releasing"));
    k.kubelet.set_pods(&[]);
    k.world.wait_dead();
    let before = k.kubelet.registrations().len();
    k.world.start(None);
    eventually("the plugin's registrations", || {
        k.kubelet.registrations().len() >= before + 2
    });
    assert!(k.vf(&held)["kubelet"].is_null(), "{}", k.vf(&held));
    assert!(
        k.world.log_text().contains("recovery (kubelet)"),
        "{}",
        k.world.log_text()
    );
}
