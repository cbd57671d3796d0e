//! Checks of what the Debian packages ship from each binary's command line: the man pages and
//! completion scripts the hidden `man DIR` / `completions SHELL` subcommands write (every
//! subcommand `--help` lists has its page and is named in the parent's page and in every
//! completion script), and `--log-format json` (every stderr line one JSON object with
//! `timestamp`, `level`, `target` and `message`).

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The subcommands `BIN PATH... --help` lists under "Commands:" (without `help`).
pub fn subcommands(bin: &Path, path: &[String]) -> Vec<String> {
    let help = crate::run_stdout(Command::new(bin).args(path).arg("--help"));
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            let name = line.split_whitespace().next().unwrap_or_default();
            if name != "help" && !name.is_empty() {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Every command path below `bin` (depth first), e.g. `["node"], ["node", "enroll"]`.
fn command_paths(bin: &Path, path: Vec<String>, out: &mut Vec<Vec<String>>) {
    for sub in subcommands(bin, &path) {
        let mut p = path.clone();
        p.push(sub);
        out.push(p.clone());
        command_paths(bin, p, out);
    }
}

/// roff writes `-` as `\-`.
fn roff(name: &str) -> String {
    name.replace('-', "\\-")
}

/// Runs `bin man DIR` and `bin completions SHELL` and checks them against `--help`; answers
/// the command paths it checked.
pub fn check_docs(bin: &Path) -> Vec<Vec<String>> {
    let name = bin.file_name().unwrap().to_string_lossy().into_owned();
    let mut paths = Vec::new();
    command_paths(bin, Vec::new(), &mut paths);
    assert!(!paths.is_empty(), "{name} --help lists no subcommand");
    for hidden in ["man", "completions"] {
        assert!(
            !paths.iter().any(|p| p[0] == hidden),
            "{name}: `{hidden}` is a build tool and must stay out of --help: {paths:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let listed = crate::run_stdout(Command::new(bin).arg("man").arg(dir.path()));
    let page = |p: &[String]| {
        let file = dir.path().join(format!(
            "{}.1",
            std::iter::once(name.clone())
                .chain(p.iter().cloned())
                .collect::<Vec<_>>()
                .join("-")
        ));
        assert!(
            listed.contains(&file.display().to_string()),
            "{name} man did not list {}: {listed}",
            file.display()
        );
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{name}: man page {}: {e}", file.display()))
    };
    let top = page(&[]);
    assert!(top.starts_with(".ie") || top.contains(".TH"), "{top}");
    assert!(top.contains(&format!(".TH {}", name)), "{top}");
    for p in &paths {
        let parent = page(&p[..p.len() - 1]);
        let leaf = p.last().unwrap();
        assert!(
            parent.contains(&roff(leaf)),
            "the page of {name} {:?} does not name its subcommand {leaf}",
            &p[..p.len() - 1]
        );
        page(p);
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = crate::run_stdout(Command::new(bin).args(["completions", shell]));
        assert!(script.contains(&name), "{shell} completion of {name}");
        for p in &paths {
            let leaf = p.last().unwrap();
            assert!(
                script.contains(leaf.as_str()),
                "{shell} completion of {name} does not mention {leaf}"
            );
        }
        assert!(
            script.contains("log-format"),
            "{shell} completion of {name} does not offer --log-format"
        );
    }
    paths
}

/// Parses every line of `stderr` as one JSON object with `timestamp`, `level`, `target` and
/// `message` (a string each); answers the objects.
pub fn json_lines(stderr: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut out = Vec::new();
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"))
            .clone();
        for key in ["timestamp", "level", "target", "message"] {
            assert!(
                obj.get(key).is_some_and(|x| x.is_string()),
                "no string {key:?} in {line}"
            );
        }
        out.push(obj);
    }
    assert!(!out.is_empty(), "no log line on stderr");
    out
}

/// Starts `cmd` with stderr piped, waits until a stderr line contains `marker` (60 s at most:
/// a daemon that never gets there fails the test instead of hanging it), sends SIGTERM, and
/// answers everything it wrote on stderr and how it exited.
pub fn run_until_then_term(cmd: &mut Command, marker: &str) -> (String, std::process::ExitStatus) {
    eprintln!("+ {}", crate::describe(cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let seen = line.contains(marker);
                lines.push(line);
                if seen {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no stderr line with {marker:?} ({e}); stderr so far:\n{}",
                    lines.join("\n")
                );
            }
        }
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    reader.join().expect("stderr reader");
    lines.extend(rx.try_iter());
    (lines.join("\n"), status)
}
