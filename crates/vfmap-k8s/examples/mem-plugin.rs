//! The plugin over the in-memory pool double, for proving the gRPC side against a real kubelet
//! before the daemon implements the pool (docs/kubernetes.md, "manual proof"). Not vfmap: no
//! VF is bound or reset here; whatever VFs are named must already be bound to vfio-pci.
//!
//!   mem-plugin FUNCTION=BDF@PF@GROUP[@NUMA] ...
//!
//! Logs to stderr; prints `VFMAP-POOL <bdf> <holder>` lines whenever the double's view changes.

#[path = "../tests/support/mem_pool.rs"]
mod mem_pool;

use std::time::Duration;

use tokio::sync::watch;
use vfmap_k8s::kubelet::{Config, run};
use vfmap_k8s::pool::VfPool;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut specs = Vec::new();
    for arg in std::env::args().skip(1) {
        let (function, rest) = arg.split_once('=').ok_or("FUNCTION=BDF@PF@GROUP[@NUMA]")?;
        let parts: Vec<&str> = rest.split('@').collect();
        if parts.len() < 3 {
            return Err("FUNCTION=BDF@PF@GROUP[@NUMA]".into());
        }
        let numa = parts.get(3).map(|n| n.parse::<i32>()).transpose()?;
        specs.push((
            function.to_owned(),
            parts[0].to_owned(),
            parts[1].to_owned(),
            numa,
            parts[2].parse::<u32>()?,
        ));
    }
    let borrowed: Vec<(&str, &str, &str, Option<i32>, u32)> = specs
        .iter()
        .map(|(f, b, p, n, g)| (b.as_str(), p.as_str(), f.as_str(), *n, *g))
        .collect();
    let pool = mem_pool::MemPool::new(&borrowed);
    let mut view = pool.view();
    tokio::spawn(async move {
        loop {
            for vf in view.borrow_and_update().iter() {
                println!("VFMAP-POOL {} {} {:?}", vf.location, vf.function, vf.holder);
            }
            if view.changed().await.is_err() {
                return;
            }
        }
    });
    let config = Config {
        reconcile_every: Duration::from_secs(5),
        grace: Duration::from_secs(20),
        ..Config::standard()
    };
    let (_stop, shutdown) = watch::channel(false);
    run(pool, config, shutdown).await?;
    Ok(())
}
