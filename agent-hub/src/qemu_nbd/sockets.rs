//! The directory of the exports' unix sockets (`nbd_listen = "unix"`): `<dir>/<port>.sock`, one
//! per slot of the port allocator. Mode 0750, owned by the hub's user, group `nbd_socket_group`
//! (the ssh tunnel user's): the tunnel's sshd session can connect (it opens the node's
//! streamlocal forwards as that user), any other local user gets EACCES at `connect(2)`, before
//! qemu-nbd ever sees a client. That is what makes the exports flood-proof: qemu-nbd counts a
//! client at accept, before TLS, so on TCP a few idle connections of anyone held its
//! `--shared` slots.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::QemuNbdError;

/// Creates or checks the socket directory: a real directory of this user that group and
/// others cannot write (refused otherwise), mode 0750, and the group `group` when given (the
/// hub's user must be a member, or be root). Answers the directory.
pub fn socket_dir(dir: &Path, group: Option<&str>) -> Result<PathBuf, QemuNbdError> {
    let bad = |reason: String| QemuNbdError::InvalidConfig {
        field: "nbd_socket_dir",
        reason,
    };
    sendense_shared::fsmode::owned_dir(dir).map_err(|e| bad(sendense_shared::errors::chain(&e)))?;
    if let Some(name) = group {
        let gid = nix::unistd::Group::from_name(name)
            .map_err(|e| bad(format!("looking up nbd_socket_group {name:?}: {e}")))?
            .ok_or_else(|| bad(format!("nbd_socket_group {name:?} does not exist")))?
            .gid;
        nix::unistd::chown(dir, None, Some(gid)).map_err(|e| {
            bad(format!(
                "{}: cannot give it group {name:?} ({e}); the hub's user must be a member",
                dir.display()
            ))
        })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| bad(format!("{}: chmod 0750: {e}", dir.display())))?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_directory_is_0750_and_gets_the_group() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nbd");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = nix::unistd::getegid();
        let name = nix::unistd::Group::from_gid(me).unwrap().unwrap().name;
        socket_dir(&dir, Some(&name)).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o750);
        assert_eq!(meta.gid(), me.as_raw());
        let e = socket_dir(&dir, Some("no-such-group-sendense")).unwrap_err();
        assert!(e.to_string().contains("nbd_socket_dir"), "{e}");
        // Group-writable: someone else could plant a socket there.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = socket_dir(&dir, None).unwrap_err();
        assert!(format!("{e:?}").contains("write"), "{e:?}");
    }
}
