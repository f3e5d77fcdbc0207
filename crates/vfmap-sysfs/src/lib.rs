//! The sysfs adapter of vfmap: discovery of SR-IOV PFs and VFs, and driver binding.
//!
//! Every function works under a root directory (normally `/sys`), so tests run on generated
//! trees and captured fixtures. Writes go through [`SysfsWriter`] so a test double can emulate
//! the kernel's reactions.

use std::io;
use std::path::PathBuf;

mod config;
mod discover;
pub mod discover_hook;
pub mod doctor;
pub mod hooks;
mod prepare;

pub use config::{MAX_CONFIG_LEN, VerifyError, read_config, verify_reset_state};
pub use discover::Sysfs;
pub use discover_hook::{
    DiscoverFailure, DiscoverRun, Discovered, discover_problems, discover_runs,
};
pub use hooks::{
    HookContext, HookError, HookOutput, HookPathError, HookPhase, Invocation, check_hook_path,
    run_hook,
};
pub use prepare::{
    FileWriter, HookRunner, Modprobe, ModuleLoader, PrepareError, PrepareReport, RunHooks,
    SysfsWriter, ensure_bound, prepare, prepare_with_hooks, reset_function,
};

/// Failures reading a sysfs tree as a whole (per-device trouble is a `Problem` instead).
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// `<root>/bus/pci/devices` cannot be listed.
    #[error("cannot list PCI devices in {}: {}", path.display(), list_hint(source))]
    ListDevices {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What to do about an unlistable `bus/pci/devices`: the OS's reason follows as the source.
fn list_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied {
        "run vfmap as root (or make the tree readable to this user)"
    } else {
        "is the sysfs root right? (expected <root>/bus/pci/devices)"
    }
}
