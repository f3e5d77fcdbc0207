//! Publishing for the guest's programs: `devices.json` and `by-function/`, written whole by a
//! process's first publish and changed only where they differ after that.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use vfmap_core::FunctionName;

use super::{Agent, Links, published_bdf};

impl Agent<'_> {
    /// Writes `devices.json` and `by-function/<function>/<name>` → the device's sysfs
    /// directory. The name is the local index for the host's entries, the guest address for
    /// the metadata's.
    ///
    /// The first publish of a process writes both whole, each replaced atomically (the file
    /// renamed over, the directory built aside and swapped in), so whatever a previous run
    /// left is replaced. Later ones write only what changed: `devices.json` (renamed over)
    /// when its bytes differ, and each link that was added (a new symlink appears whole),
    /// changed (a new one renamed over it) or removed, with a function's directory made or
    /// removed as its first link comes or its last goes. A program sees every link either
    /// old or new, and `devices.json` is always whole. In a slow guest every file operation
    /// counts (under nested TCG, milliseconds each), and this runs between binding and
    /// answering the host: an attach of one VF now costs a file write and rename, a symlink
    /// and maybe a directory, instead of rebuilding the tree. Nothing is fsynced: `/run` is
    /// a tmpfs, and after a reboot the host re-sends the correspondence anyway.
    pub fn publish(&mut self) -> io::Result<()> {
        let run = self.config.run_dir.clone();
        let json = serde_json::to_vec_pretty(&self.published()).map_err(io::Error::other)?;
        let mut links = BTreeMap::new();
        let all = self.current.values().chain(self.from_metadata.values());
        for p in all.filter(|p| p.state == "bound") {
            let Some(bdf) = published_bdf(p) else {
                continue;
            };
            // Function names are validated ([a-z0-9._-]), so they are safe directory names.
            if FunctionName::new(&p.function).is_err() {
                continue;
            }
            let name = p
                .local_index
                .map_or_else(|| bdf.to_string(), |i| i.to_string());
            links.insert((p.function.clone(), name), self.sysfs.device_dir(bdf));
        }
        let Some((old_json, old_links)) = self.published.take() else {
            fs::create_dir_all(&run)?;
            write_replacing(&run.join("devices.json"), &json)?;
            publish_links_whole(&run, &links)?;
            self.published = Some((json, links));
            return Ok(());
        };
        // Until this one succeeds, the next publish starts over whole.
        if json != old_json {
            write_replacing(&run.join("devices.json"), &json)?;
        }
        let live = run.join("by-function");
        for key @ (function, name) in old_links.keys() {
            if !links.contains_key(key) {
                remove_if_there(&live.join(function).join(name))?;
            }
        }
        for (key @ (function, name), target) in &links {
            let dir = live.join(function);
            match old_links.get(key) {
                Some(old) if old == target => {}
                Some(_) => {
                    let tmp = dir.join(format!(".{name}.tmp"));
                    remove_if_there(&tmp)?;
                    std::os::unix::fs::symlink(target, &tmp)?;
                    fs::rename(&tmp, dir.join(name))?;
                }
                None => {
                    if !old_links.keys().any(|(f, _)| f == function) {
                        fs::create_dir_all(&dir)?;
                    }
                    std::os::unix::fs::symlink(target, dir.join(name))?;
                }
            }
        }
        for (function, _) in old_links.keys() {
            if !links.keys().any(|(f, _)| f == function) {
                // Empty now; another process's file in it keeps it, which is no error.
                let _ = fs::remove_dir(live.join(function));
            }
        }
        self.published = Some((json, links));
        Ok(())
    }
}

/// Writes `path` whole: a temporary file beside it, renamed over it.
fn write_replacing(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Removes a file or link; one that is not there is no error.
fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Builds `by-function/` whole beside it and swaps it in.
fn publish_links_whole(run: &Path, links: &Links) -> io::Result<()> {
    let staging = run.join("by-function.tmp");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    for ((function, name), target) in links {
        let dir = staging.join(function);
        fs::create_dir_all(&dir)?;
        std::os::unix::fs::symlink(target, dir.join(name))?;
    }
    let live = run.join("by-function");
    let old = run.join("by-function.old");
    let _ = fs::remove_dir_all(&old);
    if live.exists() {
        fs::rename(&live, &old)?;
    }
    fs::rename(&staging, &live)?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}
