//! The scriptable side, run as the real binary against the fake hub: what a script sees on
//! stdout, what an operator reads on stderr, and the exit status.

use crate::fake_hub::{FLAKY_ERROR, FakeHub, TOKEN, write_token_file};
use sendense_shared::api::{Backup, BackupType, JobStatus};
use std::path::PathBuf;
use std::process::Output;
use tempfile::TempDir;

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// An operator's shell: a fresh directory used as HOME (so no real config is read) holding a
/// token file, and the hub every run is pointed at.
pub struct Shell {
    pub home: TempDir,
    pub token: PathBuf,
    hub: String,
}

impl Shell {
    pub fn new(hub: &str, token: &str) -> Shell {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("token");
        write_token_file(&path, &format!("{token}\n"));
        Shell {
            home,
            token: path,
            hub: hub.into(),
        }
    }

    /// `sendense-console --hub <hub> --token-file <token> ARGS...`, not yet run.
    pub fn console(&self, args: &[&str]) -> tokio::process::Command {
        let mut full = vec![
            "--hub",
            &self.hub,
            "--token-file",
            self.token.to_str().unwrap(),
        ];
        full.extend_from_slice(args);
        command(&self.home, &full)
    }

    pub async fn run(&self, args: &[&str]) -> Run {
        let r = done(self.console(args).output().await.unwrap());
        eprintln!(
            "$ sendense-console --hub {} --token-file {} {}\n-> exit {}\nstdout:\n{}stderr:\n{}",
            self.hub,
            self.token.display(),
            args.join(" "),
            r.code,
            r.stdout,
            r.stderr
        );
        r
    }
}

fn command(home: &TempDir, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sendense-console"));
    cmd.args(args)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env_remove("SENDENSE_TOKEN")
        .env_remove("SENDENSE_TOKEN_FILE")
        .env_remove("SENDENSE_HUB_URL")
        .env_remove("SENDENSE_CONSOLE_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

pub fn done(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn backups_list_json_is_the_hubs_list() {
    let hub = FakeHub::start(&["repo-a"]).await;
    {
        let mut st = hub.state.lock().unwrap();
        st.backups.push(crate::fake_hub::backup(
            "b-1",
            "pgtest1",
            "repo-a",
            BackupType::Full,
        ));
        st.backups.push(crate::fake_hub::backup(
            "b-2",
            "flaky",
            "repo-a",
            BackupType::Incremental,
        ));
    }
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh.run(&["backups", "list", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list: Vec<Backup> = serde_json::from_str(&r.stdout).expect("stdout is the JSON list");
    let ids: Vec<&str> = list.iter().map(|b| b.backup_id.0.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"b-1") && ids.contains(&"b-2"));

    let r = sh.run(&["backups", "list"]).await;
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("ID "), "{}", r.stdout);
    assert!(
        r.stdout.contains("b-2") && r.stdout.contains(" incr "),
        "{}",
        r.stdout
    );
}

#[tokio::test]
async fn start_wait_shows_progress_and_exits_zero_when_completed() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&["backup", "start", "pgtest1", "--type", "full", "--wait"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = r.stdout.trim();
    assert!(
        id.starts_with("b-fake"),
        "stdout is the backup id: {:?}",
        r.stdout
    );
    assert!(
        r.stderr.contains(&format!("{id} running 25%")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("backup {id} completed")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("2000 completed 100% · 2001 completed 100%"),
        "{}",
        r.stderr
    );
    let st = hub.state.lock().unwrap();
    // The only repository was picked without --repository.
    assert_eq!(st.start_requests.len(), 1);
    assert_eq!(st.start_requests[0].repository_id, "repo-a");
    assert_eq!(st.start_requests[0].backup_type, BackupType::Full);
    assert_eq!(st.backups[0].status, JobStatus::Completed);
}

#[tokio::test]
async fn start_wait_of_a_failing_job_exits_3_with_the_cause() {
    let hub = FakeHub::start(&["repo-a", "offsite"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "backup",
            "start",
            "flaky",
            "--type",
            "incremental",
            "--repository",
            "offsite",
            "--wait",
        ])
        .await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(FLAKY_ERROR), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("disk 2001: qemu-nbd exited with status 1"),
        "{}",
        r.stderr
    );
    assert_eq!(
        hub.state.lock().unwrap().start_requests[0].repository_id,
        "offsite"
    );
}

#[tokio::test]
async fn cancel_ends_a_waiting_start_with_exit_4() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let waiting = sh
        .console(&["backup", "start", "slowvm", "--type", "full", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the job exists, then cancel it with the CLI as an operator would.
    let id = loop {
        if let Some(b) = hub.state.lock().unwrap().backups.first() {
            break b.backup_id.0.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let r = sh.run(&["backup", "cancel", &id]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("cancelling"), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), id);

    let r = done(waiting.wait_with_output().await.unwrap());
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("backup {id} was cancelled")),
        "{}",
        r.stderr
    );
    assert_eq!(hub.state.lock().unwrap().cancel_requests, vec![id]);
}

#[tokio::test]
async fn unknown_vm_is_named_with_the_hubs_detail() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&["backup", "start", "ghost", "--type", "full"])
        .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("404"), "{}", r.stderr);
    assert!(
        r.stderr.contains("no VM named \"ghost\" is registered"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
}

/// A wrong token is never sent: the hub's proof does not match it, and the message says so and
/// how to fix it.
#[tokio::test]
async fn wrong_token_is_not_sent_and_the_message_says_how_to_fix_it() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, "not-the-token");
    let r = sh.run(&["backups", "list"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("did not prove it is the hub holding this token"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--token-file"), "{}", r.stderr);
}

#[tokio::test]
async fn a_token_file_others_may_read_is_refused_naming_path_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    std::fs::set_permissions(&sh.token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = sh
        .run(&["backup", "start", "pgtest1", "--type", "full"])
        .await;
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        format!(
            "error: token file {} is readable by group or others (mode 0644); `chmod 600` it \
             (and consider the token leaked)\n",
            sh.token.display()
        )
    );
    assert!(r.stdout.is_empty());
    assert!(
        hub.state.lock().unwrap().start_requests.is_empty(),
        "nothing was sent with the leaked token"
    );
}

#[tokio::test]
async fn unreachable_hub_is_named_with_its_url() {
    // A port that was free a moment ago: nothing listens there.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{addr}");
    let sh = Shell::new(&url, TOKEN);
    let r = sh.run(&["backup", "cancel", "b-1"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!("hub unreachable at {url}/")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("Connection refused"), "{}", r.stderr);
}

#[tokio::test]
async fn several_repositories_need_a_choice() {
    let hub = FakeHub::start(&["repo-a", "offsite"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&["backup", "start", "pgtest1", "--type", "full"])
        .await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("repo-a, offsite"), "{}", r.stderr);
    assert!(r.stderr.contains("--repository"), "{}", r.stderr);
    assert!(
        hub.state.lock().unwrap().start_requests.is_empty(),
        "nothing was started"
    );
}

#[tokio::test]
async fn missing_token_file_and_bad_type_are_named() {
    let mut sh = Shell::new("http://127.0.0.1:9", TOKEN);
    sh.token = "/nonexistent/token".into();
    let r = sh.run(&["backups", "list"]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("/nonexistent/token"), "{}", r.stderr);

    let sh = Shell::new("http://127.0.0.1:9", TOKEN);
    let r = sh
        .run(&["backup", "start", "vm", "--type", "differential"])
        .await;
    assert_eq!(r.code, 2, "usage error");
    assert!(r.stderr.contains("differential"), "{}", r.stderr);
}

#[tokio::test]
async fn tui_without_a_terminal_explains_instead_of_panicking() {
    let hub = FakeHub::start(&["repo-a"]).await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh.run(&[]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("needs a terminal"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[tokio::test]
async fn version_names_the_binary_and_its_commit() {
    let home = tempfile::tempdir().unwrap();
    let r = done(command(&home, &["--version"]).output().await.unwrap());
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("sendense-console"), "{}", r.stdout);
    assert!(r.stdout.contains("commit:"), "{}", r.stdout);
}

/// A fake hub holding a completed backup `b-done` of `vm`.
async fn hub_with_completed_backup(vm: &str) -> FakeHub {
    let hub = FakeHub::start(&["repo-a"]).await;
    let mut b = crate::fake_hub::backup("b-done", vm, "repo-a", BackupType::Full);
    b.status = JobStatus::Completed;
    hub.state.lock().unwrap().backups.push(b);
    hub
}

#[tokio::test]
async fn restore_start_wait_shows_progress_and_exits_zero_when_completed() {
    let hub = hub_with_completed_backup("pgtest1").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "restore",
            "start",
            "b-done",
            "--node",
            "node-a",
            "--path",
            "/restore/pg.qcow2",
            "--wait",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "r-fake0001", "stdout is the restore id");
    assert!(
        r.stderr
            .contains("r-fake0001 running 25% 256.0 MiB/1.0 GiB"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("restore r-fake0001 completed: 1.0 GiB written to node-a:/restore/pg.qcow2"),
        "{}",
        r.stderr
    );
    let st = hub.state.lock().unwrap();
    assert_eq!(st.restore_start_requests.len(), 1);
    let req = &st.restore_start_requests[0];
    assert_eq!(req.backup_id.0, "b-done");
    assert_eq!(req.disk_key, None, "no --disk: left to the hub");
    assert_eq!(req.target.node, "node-a");
    assert_eq!(req.target.path, "/restore/pg.qcow2");
    assert_eq!(st.restores[0].status, JobStatus::Completed);
}

#[tokio::test]
async fn restore_wait_of_a_failing_restore_exits_3_with_the_cause() {
    let hub = hub_with_completed_backup("flaky").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh
        .run(&[
            "restore",
            "start",
            "b-done",
            "--node",
            "node-a",
            "--path",
            "/restore/f.qcow2",
            "--disk",
            "2001",
            "--wait",
        ])
        .await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "restore r-fake0001 failed: {}",
            crate::fake_hub::restores::RESTORE_FLAKY_ERROR
        )),
        "{}",
        r.stderr
    );
    assert_eq!(
        hub.state.lock().unwrap().restore_start_requests[0].disk_key,
        Some(sendense_shared::ids::DiskKey(2001))
    );
}

#[tokio::test]
async fn restore_cancel_ends_a_waiting_restore_with_exit_4() {
    let hub = hub_with_completed_backup("slowvm").await;
    let sh = Shell::new(&hub.url, TOKEN);
    let waiting = sh
        .console(&[
            "restore",
            "start",
            "b-done",
            "--node",
            "node-a",
            "--path",
            "/restore/s.qcow2",
            "--wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = loop {
        if let Some(r) = hub.state.lock().unwrap().restores.first() {
            break r.restore_id.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let r = sh.run(&["restore", "cancel", &id]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("restore {id} of slowvm is cancelling")),
        "{}",
        r.stderr
    );
    assert_eq!(r.stdout.trim(), id);

    let r = done(waiting.wait_with_output().await.unwrap());
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("restore {id} was cancelled")),
        "{}",
        r.stderr
    );
    let st = hub.state.lock().unwrap();
    assert_eq!(st.restore_cancel_requests, vec![id]);
    assert!(st.cancel_requests.is_empty(), "not the backup endpoint");
}

#[tokio::test]
async fn restores_list_json_is_the_hubs_list_and_refusals_are_named() {
    let hub = hub_with_completed_backup("pgtest1").await;
    {
        let mut st = hub.state.lock().unwrap();
        st.restores.push(crate::fake_hub::restores::restore(
            "r-1",
            "b-done",
            "pgtest1",
            "node-a",
            "/restore/a.qcow2",
        ));
        st.restores.push(crate::fake_hub::restores::restore(
            "r-2",
            "b-done",
            "pgtest1",
            "node-b",
            "/restore/b.qcow2",
        ));
        let mut pending = crate::fake_hub::backup("b-busy", "pgtest1", "repo-a", BackupType::Full);
        pending.status = JobStatus::Running;
        st.backups.push(pending);
    }
    let sh = Shell::new(&hub.url, TOKEN);
    let r = sh.run(&["restores", "list", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list: Vec<sendense_shared::api::Restore> =
        serde_json::from_str(&r.stdout).expect("stdout is the JSON list");
    let mut ids: Vec<&str> = list.iter().map(|r| r.restore_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["r-1", "r-2"]);

    let r = sh.run(&["restores", "list"]).await;
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("ID "), "{}", r.stdout);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("r-2 ") && l.ends_with("node-b  /restore/b.qcow2")),
        "{}",
        r.stdout
    );

    // The hub refuses a restore of a backup that is not completed: its detail is shown.
    let r = sh
        .run(&[
            "restore",
            "start",
            "b-busy",
            "--node",
            "node-a",
            "--path",
            "/restore/x.qcow2",
        ])
        .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("409"), "{}", r.stderr);
    assert!(
        r.stderr.contains("only a completed backup can be restored"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
}

/// A process bound to the hub's address while the hub is down (any local user can bind a port
/// above 1024) gets the proof challenge and nothing else: not the token, no Authorization
/// header, whatever it answers.
#[tokio::test]
async fn a_squatter_on_the_hub_address_receives_no_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let rec = got.clone();
    let squatter = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    // A plausible answer that proves nothing.
                    let body = r#"{"proofs":["00"]}"#;
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                }
            });
        }
    });
    let sh = Shell::new(&url, TOKEN);
    let r = sh.run(&["backups", "list"]).await;
    squatter.abort();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("did not prove"), "{}", r.stderr);
    let seen = String::from_utf8_lossy(&got.lock().unwrap()).into_owned();
    assert!(
        seen.contains("/api/v1/proof?nonce="),
        "the squatter saw: {seen}"
    );
    assert!(
        !seen.contains(TOKEN),
        "the token reached the squatter: {seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("authorization"),
        "an Authorization header reached the squatter: {seen}"
    );
}
