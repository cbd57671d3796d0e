//! What the command lines of `sendense-hub`, `sendense-node` and `sendense-console` share:
//!
//! - [`LogFormat`]: `--log-format text|json`. `json` writes one JSON object per line (`timestamp`,
//!   `level`, `message`, `target` and the event's fields at the top level), for journald and
//!   log shippers.
//! - [`DocsCommand`]: the hidden subcommands `man DIR` and `completions SHELL` that
//!   `scripts/build-debs.sh` calls to put man pages and bash/zsh/fish completions into the
//!   Debian packages. They are generated from the clap definitions, so they cannot drift from
//!   the flags the binary really takes.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human lines (`2026-12-02T05:00:00Z  INFO message key=value`).
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and the fields.
    Json,
}

/// `man DIR` and `completions SHELL`: hidden, flattened into each binary's subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DocsCommand {
    /// Write the man pages (section 1; one for the binary and one per subcommand) into DIR.
    #[command(hide = true)]
    Man {
        /// Directory the `*.1` files are written to (created if missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
}

/// Runs a [`DocsCommand`] for `cmd` (the binary's `CommandFactory::command()`).
pub fn run_docs(cmd: clap::Command, docs: &DocsCommand) -> std::io::Result<()> {
    match docs {
        DocsCommand::Man { dir } => {
            for page in write_man_pages(cmd, dir)? {
                println!("{}", page.display());
            }
            Ok(())
        }
        DocsCommand::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            write_completions(cmd, *shell, &mut out)?;
            out.flush()
        }
    }
}

/// Writes `NAME.1` and `NAME-SUB[-SUB...].1` for every visible subcommand into `dir`; answers
/// the files written, the binary's own page first.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn walk(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        out.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            walk(sub, dir, out)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = with_version(cmd).disable_help_subcommand(true);
    // Gives each subcommand its display name (`sendense-hub-node-enroll`), which names its page.
    cmd.build();
    let mut pages = Vec::new();
    walk(cmd, dir, &mut pages)?;
    Ok(pages)
}

/// Writes the completion script of `cmd` for `shell`.
pub fn write_completions(
    cmd: clap::Command,
    shell: Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut cmd = with_version(cmd);
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
    Ok(())
}

/// The man page's header shows the version; `sendense-hub` sets none on its clap command (it
/// prints its own long `--version`).
fn with_version(cmd: clap::Command) -> clap::Command {
    if cmd.get_version().is_some() {
        cmd
    } else {
        cmd.version(crate::identity::VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    #[command(name = "demo", about = "A demo")]
    struct Demo {
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
        #[command(subcommand)]
        command: Option<Sub>,
    }

    #[derive(Subcommand)]
    enum Sub {
        /// Do a thing.
        Thing {
            #[command(subcommand)]
            what: Inner,
        },
        #[command(flatten)]
        Docs(DocsCommand),
    }

    #[derive(Subcommand)]
    enum Inner {
        /// The inner one.
        Inner,
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand_and_skip_the_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(Demo::command(), dir.path()).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["demo.1", "demo-thing.1", "demo-thing-inner.1"]);
        let top = std::fs::read_to_string(&pages[0]).unwrap();
        assert!(top.contains("demo\\-thing(1)"), "{top}");
        assert!(top.contains("log\\-format"), "{top}");
        assert!(!top.contains("completions"), "hidden: {top}");
    }

    #[test]
    fn completions_name_the_subcommands_and_the_log_format_values() {
        let mut out = Vec::new();
        write_completions(Demo::command(), Shell::Bash, &mut out).unwrap();
        let bash = String::from_utf8(out).unwrap();
        assert!(bash.contains("thing"), "{bash}");
        assert!(bash.contains("--log-format"), "{bash}");
        assert!(bash.contains("text json"), "{bash}");
        let parsed = Demo::try_parse_from(["demo", "completions", "zsh"]).unwrap();
        assert!(matches!(
            parsed.command,
            Some(Sub::Docs(DocsCommand::Completions { shell: Shell::Zsh }))
        ));
        assert!(Demo::try_parse_from(["demo", "--log-format", "json"]).is_ok());
        assert!(Demo::try_parse_from(["demo", "--log-format", "xml"]).is_err());
    }
}
