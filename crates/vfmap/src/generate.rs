//! `vfmap generate`: shell completions and man pages, generated from the clap definition of
//! the command line so they never drift from it. Hidden: it is run when packaging
//! (`scripts/package`), not by operators.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::{Cli, Failure, exit};

/// What to generate.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Generate {
    /// Print the completion script for SHELL on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write vfmap.1 and one page per subcommand (vfmap-SUBCOMMAND.1) into DIR.
    Man {
        /// The directory (created when missing).
        dir: PathBuf,
    },
}

/// The files the installed package puts in place, for the FILES section of vfmap(1).
const FILES: &[(&str, &str)] = &[
    (
        "/etc/vfmap/vfmap.toml",
        "The daemon's config (vfmap serve \\-\\-config).",
    ),
    (
        "/etc/vfmap/profiles.toml",
        "Device profiles: cards, their VFs and each VF's function. Shipped with a commented \
         example; see /usr/share/doc/vfmap/profiles.md.",
    ),
    (
        "/var/lib/vfmap/state.db",
        "The daemon's state database (which VF is in which VM), kept when the package is \
         removed.",
    ),
    (
        "/run/vfmap/api.sock",
        "The daemon's API socket (mode 0600).",
    ),
];

pub(crate) fn run(what: Generate) -> Result<(), Failure> {
    let failed = |e: io::Error| Failure::new(exit::FAILED, "output", e);
    match what {
        Generate::Completions { shell } => {
            let mut out = io::stdout().lock();
            clap_complete::generate(shell, &mut visible(), "vfmap", &mut out);
            out.flush().map_err(failed)
        }
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(failed)?;
            let mut cmd = visible().disable_help_subcommand(true);
            cmd.build();
            man_pages(&cmd, &dir, true).map_err(failed)
        }
    }
}

/// The command line as operators see it: `Cli` without its hidden subcommands (this one),
/// which clap_complete would otherwise offer.
fn visible() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new("vfmap")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(full.is_subcommand_required_set())
        .propagate_version(true);
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    if let Some(about) = full.get_long_about() {
        cmd = cmd.long_about(about.clone());
    }
    cmd
}

/// Writes the page of `cmd` and of each visible subcommand, recursively.
fn man_pages(cmd: &clap::Command, dir: &Path, root: bool) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, false)?;
    }
    let man = clap_mangen::Man::new(cmd.clone()).manual("vfmap");
    let mut page = Vec::new();
    man.render(&mut page)?;
    if root {
        writeln!(page, ".SH FILES")?;
        for (path, what) in FILES {
            writeln!(page, ".TP\n\\fI{path}\\fR\n{what}")?;
        }
        writeln!(page, ".SH SEE ALSO")?;
        writeln!(
            page,
            "/usr/share/doc/vfmap/README.md, profiles.md and security.md."
        )?;
    } else {
        writeln!(page, ".SH SEE ALSO\n\\fBvfmap\\fR(1)")?;
    }
    std::fs::write(dir.join(man.get_filename()), page)
}
