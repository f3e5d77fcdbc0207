//! A VF's config space from sysfs, and the `scrub` phase's check that it is back to its reset
//! state (the rules are in [`vfmap_core::config_space`]).

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use vfmap_core::Bdf;
use vfmap_core::config_space::{ResetProblem, check_reset_state, summary};

use crate::Sysfs;

/// The most `read_config` reads: the PCIe extended config space.
pub const MAX_CONFIG_LEN: usize = 4096;

/// Reads `<device dir>/config`, at most [`MAX_CONFIG_LEN`] bytes. The kernel gives 64 bytes to
/// an unprivileged reader, the whole space to root.
pub fn read_config(sysfs: &Sysfs, vf: Bdf) -> io::Result<Vec<u8>> {
    let file = File::open(sysfs.device_dir(vf).join("config"))?;
    let mut bytes = Vec::with_capacity(256);
    file.take(MAX_CONFIG_LEN as u64).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Why a VF did not pass the reset-state check.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// `config` could not be read (the VF is gone, or vfmap is not root).
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The `config` file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Read, but not in its reset state (or not checkable: see [`ResetProblem`]).
    #[error("VF {vf} is not back to its reset state: {}", summary(problems))]
    NotReset {
        /// The VF.
        vf: Bdf,
        /// Every problem found, in offset order.
        problems: Vec<ResetProblem>,
    },
}

/// Reads `vf`'s config space and checks it is back to its reset state: command register,
/// BARs, MSI and MSI-X enable. Run it after the reset, before the VF goes back to the pool.
pub fn verify_reset_state(sysfs: &Sysfs, vf: Bdf) -> Result<(), VerifyError> {
    let config = read_config(sysfs, vf).map_err(|source| VerifyError::Unreadable {
        path: sysfs.device_dir(vf).join("config"),
        source,
    })?;
    check_reset_state(&config).map_err(|problems| VerifyError::NotReset { vf, problems })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfmap_testkit::{Dirty, PfSpec, SysfsTree, set_vf_config_dirty};

    fn tree_with_vfs(dir: &std::path::Path) -> (Sysfs, Bdf) {
        let tree = SysfsTree::new(dir);
        tree.add_pf(&PfSpec::nvme("0000:3b:00.0", 4).with_vfs(2));
        (Sysfs::new(dir), "0000:3b:00.1".parse().unwrap())
    }

    #[test]
    fn generated_vfs_are_in_their_reset_state() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, vf) = tree_with_vfs(dir.path());
        assert_eq!(read_config(&sysfs, vf).unwrap().len(), 256);
        verify_reset_state(&sysfs, vf).unwrap();
        verify_reset_state(&sysfs, "0000:3b:00.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn a_dirty_vf_fails_with_its_problems() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, vf) = tree_with_vfs(dir.path());
        set_vf_config_dirty(dir.path(), vf, Dirty::BusMaster);
        set_vf_config_dirty(dir.path(), vf, Dirty::MsixEnabled);
        let error = verify_reset_state(&sysfs, vf).unwrap_err();
        let VerifyError::NotReset { problems, .. } = &error else {
            panic!("{error:?}");
        };
        assert!(matches!(
            problems.as_slice(),
            [
                ResetProblem::BusMaster { .. },
                ResetProblem::MsixEnabled { .. }
            ]
        ));
        let message = error.to_string();
        assert!(
            message.starts_with("VF 0000:3b:00.1 is not back to its reset state: bus master"),
            "{message}"
        );
        // The other VF is untouched.
        verify_reset_state(&sysfs, "0000:3b:00.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn a_missing_vf_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, _) = tree_with_vfs(dir.path());
        let error = verify_reset_state(&sysfs, "0000:3b:00.4".parse().unwrap()).unwrap_err();
        assert!(
            matches!(&error, VerifyError::Unreadable { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{error:?}"
        );
        assert!(error.to_string().contains("0000:3b:00.4/config"), "{error}");
    }

    #[test]
    fn the_read_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (sysfs, vf) = tree_with_vfs(dir.path());
        let path = sysfs.device_dir(vf).join("config");
        let mut config = std::fs::read(&path).unwrap();
        config.resize(10_000, 0xff);
        std::fs::write(&path, config).unwrap();
        assert_eq!(read_config(&sysfs, vf).unwrap().len(), MAX_CONFIG_LEN);
        // Extended capabilities past 0x100 are not the check's business.
        verify_reset_state(&sysfs, vf).unwrap();
    }
}
