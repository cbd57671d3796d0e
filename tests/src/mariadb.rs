//! A private MariaDB server for one test: its own data directory (under the test's temporary
//! directory), its own port on 127.0.0.1, started with `mariadbd` from Debian's
//! `mariadb-server` and stopped by PID, so a test can take the database away from a hub
//! mid-job and give it back. The shared server of the other MariaDB tests
//! (`SENDENSE_TEST_MYSQL_URL`) is never touched.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) private MariaDB.
pub struct PrivateMariaDb {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

fn tool(names: &[&str]) -> anyhow::Result<PathBuf> {
    for n in names {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
            let p = Path::new(dir).join(n);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("none of {names:?} is installed (scripts/setup.sh installs mariadb-server)")
}

impl PrivateMariaDb {
    /// Initialises a data directory in `dir` and starts the server; the database `hub` exists
    /// when it returns. Root over TCP without a password (grant tables skipped: the server
    /// listens on 127.0.0.1 only and lives as long as the test).
    pub fn start(dir: &Path) -> anyhow::Result<PrivateMariaDb> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let install = tool(&["mariadb-install-db", "mysql_install_db"])?;
        let mut cmd = Command::new(install);
        cmd.args(["--no-defaults", "--user=root", "--skip-test-db"])
            .arg(format!("--datadir={}", data.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        eprintln!("+ {}", crate::describe(&cmd));
        let out = cmd.output().context("mariadb-install-db")?;
        if !out.status.success() {
            bail!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut db = PrivateMariaDb {
            dir: dir.to_path_buf(),
            port: crate::net::free_port(),
            child: None,
        };
        db.resume()?;
        let mut c = Command::new(tool(&["mariadb", "mysql"])?);
        c.args(["--no-defaults", "-h", "127.0.0.1", "-u", "root"])
            .arg(format!("-P{}", db.port))
            .args(["-e", "CREATE DATABASE hub"]);
        let out = c.output().context("mariadb client")?;
        if !out.status.success() {
            bail!("CREATE DATABASE: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(db)
    }

    /// `mysql://root@127.0.0.1:PORT/hub`.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/hub", self.port)
    }

    /// Starts the server on its data directory and port, and waits until it accepts TCP.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let mut cmd = Command::new(tool(&["mariadbd", "mysqld"])?);
        cmd.args(["--no-defaults", "--user=root", "--skip-grant-tables"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--socket={}",
                self.dir.join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.join("error.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        eprintln!("+ {}", crate::describe(&cmd));
        self.child = Some(cmd.spawn().context("mariadbd")?);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!(
                    "mariadbd did not listen on {} within 30 s: {}",
                    self.port,
                    crate::read_log(&self.dir.join("error.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM to the server (by PID) and waits for it to exit: the database is gone for the
    /// hub until [`PrivateMariaDb::resume`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            eprintln!("+ kill -TERM {pid} (mariadbd)");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}
