//! A small tmpfs mounted in a temporary directory: a repository that fills up. Needs root (the
//! CI runs as root); unmounted in `Drop`.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"8m"`).
    pub fn mount(size: &str) -> anyhow::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path());
        eprintln!("+ {}", crate::describe(&cmd));
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "mount failed (root needed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs { dir, mounted: true })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_buf(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let mut cmd = Command::new("umount");
            cmd.arg(self.dir.path());
            eprintln!("+ {}", crate::describe(&cmd));
            match cmd.output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    // Busy (a process still has a file open): detach it so it goes away.
                    eprintln!("umount: {}", String::from_utf8_lossy(&o.stderr));
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(self.dir.path())
                        .status();
                }
                Err(e) => eprintln!("umount: {e}"),
            }
            self.mounted = false;
        }
    }
}
