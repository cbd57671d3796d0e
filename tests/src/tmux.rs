//! A tmux server of the test's own (its own socket name), for driving a terminal program like an
//! operator: send keys, read the screen with `capture-pane`, wait for text. Killed in `Drop`.

use std::process::Command;
use std::time::{Duration, Instant};

pub struct Tmux {
    pub socket: String,
    /// How long [`Tmux::wait`] waits for the screen before failing the test.
    pub limit: Duration,
}

impl Tmux {
    /// A server named `<prefix>-<pid>`; the session is started with [`Tmux::start_ui`] (or by
    /// the caller with [`Tmux::run`] for another set-up).
    pub fn new(prefix: &str, limit: Duration) -> Tmux {
        Tmux {
            socket: format!("{prefix}-{}", std::process::id()),
            limit,
        }
    }

    /// Starts session `ui`, an 80x24 terminal running the shell command `cmd` with `HOME` set to
    /// `home`; the pane stays after the command exits (so its last screen can be read).
    pub fn start_ui(&self, home: &std::path::Path, cmd: &str) {
        eprintln!("+ tmux -L {} new-session -x 80 -y 24 {cmd}", self.socket);
        self.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "ui",
            "-x",
            "80",
            "-y",
            "24",
            "-e",
            &format!("HOME={}", home.display()),
            cmd,
            ";",
            "set-option",
            "-t",
            "ui",
            "remain-on-exit",
            "on",
        ]);
    }

    /// Runs `tmux -L <socket> ARGS...` and answers its standard output.
    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux must be installed (scripts/setup.sh installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The text of session `ui`'s pane.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "ui"])
    }

    pub fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.run(&["send-keys", "-t", "ui", k]);
        }
    }

    /// Waits until `pred` holds for the screen; answers that screen.
    pub async fn wait(&self, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(
                t.elapsed() < self.limit,
                "the screen never showed {what}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the screen shows `text`.
    pub async fn wait_for(&self, text: &str) -> String {
        self.wait(&format!("{text:?}"), |s| s.contains(text)).await
    }

    /// A tmux format (`#{pane_pid}`, `#{pane_dead}`, ...) of session `ui`'s pane.
    pub fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "ui", format])
            .trim()
            .to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}
