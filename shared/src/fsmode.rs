//! Places only the agent may touch: a directory created 0700 (and refused when someone else
//! could have planted files in it), and files created 0600. Both agents keep state there that
//! they later act on (journals that say what to delete, the ssh config the tunnel runs with,
//! the database), so a directory another user can write into is a way to make them act for
//! that user.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a private directory or file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    #[error("{}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a symbolic link; give the real directory", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "{} belongs to uid {owner}, not to this process (uid {me}); give a directory of the \
         service user",
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{} has mode {mode:04o}: group or others may write into it; chmod 0700 it or give \
         another directory",
        path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
}

/// Creates `path` (and missing parents, with the default mode) as a directory of mode 0700, or
/// checks an existing one: a real directory (not a symlink), owned by this process's user, not
/// writable by group or others. An existing one readable by group or others is tightened to
/// 0700.
pub fn private_dir(path: &Path) -> Result<(), PrivateError> {
    checked_dir(path, true)
}

/// Like [`private_dir`] for a directory other processes must reach (the node's run directory,
/// where QEMU, which may run as another user, creates fleecing files and sockets): created with
/// the umask's mode and not tightened, but refused all the same when it is a symlink, owned by
/// another user, or writable by group or others (where someone else could plant a journal or
/// an ssh config the agent would act on).
pub fn owned_dir(path: &Path) -> Result<(), PrivateError> {
    checked_dir(path, false)
}

fn checked_dir(path: &Path, private: bool) -> Result<(), PrivateError> {
    let io = |what| {
        let path = path.to_path_buf();
        move |source| PrivateError::Io { path, what, source }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("creating the parent directories"))?;
    }
    match std::fs::DirBuilder::new()
        .mode(if private { 0o700 } else { 0o777 })
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating the directory")(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io("reading its metadata"))?;
    if meta.file_type().is_symlink() {
        return Err(PrivateError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_dir() {
        return Err(PrivateError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(PrivateError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    if private && mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(io("setting mode 0700"))?;
    }
    Ok(())
}

/// Makes sure `path` exists as a file of mode 0600 (created empty, exclusively, when missing;
/// an existing one with group or other bits is tightened to 0600), so that a program that then
/// opens it (SQLite) does not create it with the umask's mode.
pub fn private_file(path: &Path) -> Result<(), PrivateError> {
    let io = |what| {
        let path = path.to_path_buf();
        move |source| PrivateError::Io { path, what, source }
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating the file")(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io("reading its metadata"))?;
    if meta.file_type().is_symlink() {
        return Err(PrivateError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting mode 0600"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_directory_is_0700_and_a_loose_one_is_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/run");
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700, "readable by others: tightened");
    }

    #[test]
    fn a_directory_others_may_write_a_symlink_or_a_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("open");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&d).unwrap_err();
        assert!(
            matches!(e, PrivateError::Writable { mode: 0o777, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("0777") && e.to_string().contains("open"),
            "{e}"
        );
        assert_eq!(mode(&d), 0o777, "a refused directory is left as it was");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(matches!(
            private_dir(&link),
            Err(PrivateError::Symlink { .. })
        ));
        let f = t.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(matches!(
            private_dir(&f),
            Err(PrivateError::NotADirectory { .. })
        ));
    }

    #[test]
    fn an_owned_directory_keeps_its_mode_but_is_refused_when_others_may_write() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("run");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        owned_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o755, "QEMU may need to reach it: not tightened");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(matches!(
            owned_dir(&d),
            Err(PrivateError::Writable { mode: 0o775, .. })
        ));
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        for e in [private_dir(&d).unwrap_err(), owned_dir(&d).unwrap_err()] {
            assert!(
                matches!(e, PrivateError::Owner { owner: 65534, .. }),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_private_file_is_created_0600_and_tightened() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("hub.db");
        private_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        let link = t.path().join("link.db");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(
            matches!(private_file(&link), Err(PrivateError::Symlink { .. })),
            "a symlink is not followed"
        );
    }
}
