//! File-level browsing of a backup point (`GET /api/v1/backups/{id}/files`): the disk's
//! partitions, logical volumes and filesystems, or one directory's entries.
//!
//! Names are bytes in a guest: a name that is not UTF-8 comes as `name` (lossy, for display)
//! plus `name_b64` (the exact bytes, standard base64); a request names such a path with
//! `path_b64` instead of `path`.

use serde::{Deserialize, Serialize};

use crate::ids::{BackupId, DiskKey};

/// What kind of directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    Other,
}

impl FileKind {
    /// From the file-type bits of an `st_mode`.
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Directory,
            0o120000 => FileKind::Symlink,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            _ => FileKind::Other,
        }
    }

    /// One letter, as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Directory => 'd',
            FileKind::Symlink => 'l',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
            FileKind::Other => '?',
        }
    }
}

/// One entry of a directory inside the guest (its own metadata: a symlink is not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileEntry {
    /// The name (lossy UTF-8 when `name_b64` is set).
    pub name: String,
    /// The exact bytes of the name, base64, only when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    pub kind: FileKind,
    /// Size in bytes (`st_size`; a symlink's is its target's length).
    pub size: u64,
    /// Permission bits with setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// A symlink's target as stored (never resolved), lossy UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// The target's exact bytes, base64, only when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target_b64: Option<String>,
}

/// A filesystem found on the disk (a partition, a logical volume or the whole device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestFilesystem {
    /// The appliance's device name (`/dev/sda1`, `/dev/vg0/root`): the `fs=` of a listing.
    pub device: String,
    /// `ext4`, `xfs`, `swap`, `unknown`, ...
    pub fs_type: String,
}

/// `GET /api/v1/backups/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileListing {
    pub backup_id: BackupId,
    pub disk_key: DiskKey,
    /// Partitions of the disk (`/dev/sda1`, ...).
    pub partitions: Vec<String>,
    /// LVM logical volumes (`/dev/vg0/root`, ...).
    pub logical_volumes: Vec<String>,
    pub filesystems: Vec<GuestFilesystem>,
    /// With a `path`: the filesystem listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// With a `path`: the directory listed, normalized (lossy UTF-8 when `path_b64` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_b64: Option<String>,
    /// With a `path`: its entries, sorted by name bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<FileEntry>>,
    /// True when the directory held more entries than one listing answers.
    #[serde(default)]
    pub truncated: bool,
}
