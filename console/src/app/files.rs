//! The file browser of a backup point (file-level restore): the point's disks (when it has
//! several), a disk's filesystems, then directories, listed by the hub inside its appliance.
//! Pure state: every listing is asked through an [`Action::ListFiles`] that the terminal loop
//! carries out off the UI thread, and the browser moves to the asked place only when its answer
//! comes back ([`App::apply_file_listing`]); a failed listing leaves it where it was, the cause
//! in its status line. `g` asks where to write the selected file or directory as tar (on the
//! console's side, relative to its working directory) and returns [`Action::GetFiles`].
//!
//! Names are bytes: an entry's exact name is its `name_b64` when the hub sent one, and a path
//! is built from those bytes, never from the lossy display name.

use super::{Action, App, Mode, NoticeLevel};
use crate::keys::Command;
use crate::strings;
use base64::Engine;
use sendense_shared::api::{FileEntry, FileKind, FileListing, JobStatus};
use sendense_shared::ids::{BackupId, DiskKey};

/// What one listing asks for: a disk's filesystems (`fs` none), or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTarget {
    pub disk: Option<DiskKey>,
    pub fs: Option<String>,
    /// Components below the filesystem's root (`[]` is `/`); unused without `fs`.
    pub path: Vec<Vec<u8>>,
}

impl FileTarget {
    /// The absolute path's bytes: `/`, `/etc`, `/home/a\xff`.
    pub fn path_bytes(&self) -> Vec<u8> {
        path_bytes(&self.path)
    }

    /// The hub's query of this listing (`path` only inside a filesystem).
    pub fn query(&self) -> sendense_shared::client::FileQuery {
        sendense_shared::client::FileQuery {
            disk: self.disk.map(|k| k.0),
            fs: self.fs.clone(),
            path: self.fs.as_ref().map(|_| self.path_bytes()),
        }
    }
}

/// `/` joined components: `[]` → `/`, `[etc, ssh]` → `/etc/ssh`.
pub fn path_bytes(components: &[Vec<u8>]) -> Vec<u8> {
    if components.is_empty() {
        return b"/".to_vec();
    }
    let mut out = Vec::new();
    for c in components {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    out
}

/// Bytes for the screen: UTF-8 as it is, every other byte as `\xNN`, control characters
/// escaped (a name must not move the cursor or ring the bell), a backslash doubled so that an
/// escape cannot be faked by a name.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.extend(c.escape_default()),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The exact bytes of an entry's name.
pub fn name_bytes(e: &FileEntry) -> Vec<u8> {
    e.name_b64
        .as_deref()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| e.name.as_bytes().to_vec())
}

/// A symlink's target for the screen (its exact bytes when the hub sent them).
pub fn link_target(e: &FileEntry) -> Option<String> {
    let exact = e
        .link_target_b64
        .as_deref()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    match (exact, &e.link_target) {
        (Some(b), _) => Some(escape_bytes(&b)),
        (None, Some(t)) => Some(escape_bytes(t.as_bytes())),
        (None, None) => None,
    }
}

/// The default file the tar goes to: `./<name>.tar`, with what a file name should not have
/// (as the hub's `Content-Disposition` does) turned into `_`.
pub fn default_tar_path(name: &[u8]) -> String {
    let name: String = String::from_utf8_lossy(name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() || name.chars().all(|c| c == '.') {
        "root".to_string()
    } else {
        name
    };
    format!("./{name}.tar")
}

/// Where the browser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The point's disks (only when it has several).
    Disks,
    /// The chosen disk's filesystems.
    Filesystems,
    /// A directory inside a filesystem.
    Directory,
}

/// The browser's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileBrowser {
    pub backup_id: BackupId,
    pub vm_name: String,
    /// Disks of the point; empty when the console does not know them (the hub then picks the
    /// point's one disk, or names them).
    pub disks: Vec<DiskKey>,
    pub level: Level,
    /// Where the browser shows: its disk, filesystem and directory.
    pub at: FileTarget,
    /// The disk's partitions, volumes and filesystems, once listed.
    pub filesystems: Option<FileListing>,
    /// The directory shown (level `Directory`).
    pub dir: Option<FileListing>,
    pub selected: usize,
    /// The listing asked and not answered yet: its number and where it leads.
    pub loading: Option<(u64, FileTarget)>,
    /// Listings asked so far (numbers answers: a late one for another place is dropped).
    pub asked: u64,
    /// The hub answered a listing: its appliance is up.
    pub appliance_up: bool,
    /// Why the last listing failed.
    pub error: Option<String>,
    /// A short word for the status line (a symlink not followed, the top reached).
    pub note: Option<String>,
    /// After going up: the name to select once the parent is listed.
    reselect: Option<Vec<u8>>,
}

/// What `g` would get: the query and the name of the file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetTarget {
    pub target: FileTarget,
    pub name: Vec<u8>,
    /// A file's size (a directory's tar size is not known ahead).
    pub size: Option<u64>,
}

impl FileBrowser {
    fn new(backup_id: BackupId, vm_name: String, disks: Vec<DiskKey>) -> FileBrowser {
        let one = match disks.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        FileBrowser {
            backup_id,
            vm_name,
            level: if disks.len() > 1 {
                Level::Disks
            } else {
                Level::Filesystems
            },
            disks,
            at: FileTarget {
                disk: one,
                fs: None,
                path: Vec::new(),
            },
            filesystems: None,
            dir: None,
            selected: 0,
            loading: None,
            asked: 0,
            appliance_up: false,
            error: None,
            note: None,
            reselect: None,
        }
    }

    /// Rows of the current level.
    pub fn len(&self) -> usize {
        match self.level {
            Level::Disks => self.disks.len(),
            Level::Filesystems => self.filesystems.as_ref().map_or(0, |l| l.filesystems.len()),
            Level::Directory => self.entries().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shown directory's entries.
    pub fn entries(&self) -> &[FileEntry] {
        self.dir
            .as_ref()
            .and_then(|l| l.entries.as_deref())
            .unwrap_or_default()
    }

    /// The selected row, kept inside the rows there are.
    pub fn selected(&self) -> usize {
        self.selected.min(self.len().saturating_sub(1))
    }

    /// `/dev/sda1:/etc/ssh` (escaped), `disk 2000`, or the point's disks.
    pub fn location(&self) -> String {
        match (self.level, &self.at.fs) {
            (Level::Directory, Some(fs)) => {
                format!("{fs}:{}", escape_bytes(&self.at.path_bytes()))
            }
            (Level::Disks, _) => strings::FILES_DISKS.to_string(),
            _ => match self.at.disk {
                Some(k) => format!("{} {k}", strings::DISK),
                None => strings::FILES_FILESYSTEMS.to_string(),
            },
        }
    }

    /// Ask for `target`; the answer moves the browser there.
    fn ask(&mut self, target: FileTarget) -> Action {
        self.asked += 1;
        self.loading = Some((self.asked, target.clone()));
        self.error = None;
        self.note = None;
        Action::ListFiles {
            seq: self.asked,
            backup_id: self.backup_id.clone(),
            target,
        }
    }

    /// Enter: open the selected disk, filesystem or directory.
    pub fn open(&mut self) -> Option<Action> {
        let i = self.selected();
        match self.level {
            Level::Disks => {
                let disk = *self.disks.get(i)?;
                Some(self.ask(FileTarget {
                    disk: Some(disk),
                    fs: None,
                    path: Vec::new(),
                }))
            }
            Level::Filesystems => {
                let fs = self
                    .filesystems
                    .as_ref()?
                    .filesystems
                    .get(i)?
                    .device
                    .clone();
                Some(self.ask(FileTarget {
                    disk: self.at.disk,
                    fs: Some(fs),
                    path: Vec::new(),
                }))
            }
            Level::Directory => {
                let e = self.entries().get(i)?.clone();
                match e.kind {
                    FileKind::Directory => {
                        let mut target = self.at.clone();
                        target.path.push(name_bytes(&e));
                        Some(self.ask(target))
                    }
                    FileKind::Symlink => {
                        self.note = Some(strings::files_symlink_not_followed(
                            &escape_bytes(&name_bytes(&e)),
                            &link_target(&e).unwrap_or_default(),
                        ));
                        None
                    }
                    _ => {
                        self.note = Some(strings::FILES_NOT_A_DIRECTORY.into());
                        None
                    }
                }
            }
        }
    }

    /// Backspace: the parent directory, the filesystems from a filesystem's root, the disks
    /// from the filesystems (of a point with several).
    pub fn up(&mut self) -> Option<Action> {
        match self.level {
            Level::Directory if !self.at.path.is_empty() => {
                let mut target = self.at.clone();
                self.reselect = target.path.pop();
                Some(self.ask(target))
            }
            Level::Directory => {
                // Listed already: nothing to ask.
                let fs = self.at.fs.take();
                self.level = Level::Filesystems;
                self.dir = None;
                self.loading = None;
                self.selected = self
                    .filesystems
                    .as_ref()
                    .and_then(|l| {
                        l.filesystems
                            .iter()
                            .position(|f| Some(&f.device) == fs.as_ref())
                    })
                    .unwrap_or(0);
                None
            }
            Level::Filesystems if self.disks.len() > 1 => {
                let disk = self.at.disk.take();
                self.level = Level::Disks;
                self.filesystems = None;
                self.loading = None;
                self.selected = self
                    .disks
                    .iter()
                    .position(|d| Some(*d) == disk)
                    .unwrap_or(0);
                None
            }
            Level::Filesystems | Level::Disks => {
                self.note = Some(strings::FILES_AT_TOP.into());
                None
            }
        }
    }

    /// What `g` gets: the selected entry, or at the filesystems a whole filesystem.
    pub fn get_target(&self) -> Option<GetTarget> {
        let i = self.selected();
        match self.level {
            Level::Disks => None,
            Level::Filesystems => {
                let fs = self.filesystems.as_ref()?.filesystems.get(i)?;
                let base = fs.device.rsplit('/').next().unwrap_or(&fs.device);
                Some(GetTarget {
                    target: FileTarget {
                        disk: self.at.disk,
                        fs: Some(fs.device.clone()),
                        path: Vec::new(),
                    },
                    name: base.as_bytes().to_vec(),
                    size: None,
                })
            }
            Level::Directory => {
                let e = self.entries().get(i)?;
                let mut target = self.at.clone();
                target.path.push(name_bytes(e));
                Some(GetTarget {
                    target,
                    name: name_bytes(e),
                    size: (e.kind == FileKind::File).then_some(e.size),
                })
            }
        }
    }

    /// Fold in a listing's answer: move to where it leads, or say why it failed.
    pub fn answer(&mut self, seq: u64, result: Result<FileListing, String>) {
        let Some((asked, target)) = self.loading.clone() else {
            return;
        };
        if asked != seq {
            return;
        }
        self.loading = None;
        match result {
            Err(e) => {
                self.error = Some(e);
                self.reselect = None;
            }
            Ok(listing) => {
                self.appliance_up = true;
                self.at = target;
                if self.at.fs.is_some() {
                    self.level = Level::Directory;
                    let pick = self.reselect.take();
                    self.selected = pick
                        .and_then(|name| {
                            listing
                                .entries
                                .as_deref()?
                                .iter()
                                .position(|e| name_bytes(e) == name)
                        })
                        .unwrap_or(0);
                    self.dir = Some(listing);
                } else {
                    self.level = Level::Filesystems;
                    self.selected = 0;
                    self.dir = None;
                    self.filesystems = Some(listing);
                }
            }
        }
    }
}

impl App {
    /// `f`: browse the files of the selected point (the Jobs view's backup, a policy's point).
    pub(super) fn open_browser(&mut self) -> Option<Action> {
        let point = match self.view {
            crate::view::View::Jobs => match self.selected_job() {
                Some(super::JobRow::Backup(b)) => Some(b.backup_id.clone()),
                _ => None,
            },
            crate::view::View::Policies if self.views.policies.detail.is_some() => self
                .detail_points()
                .get(self.selected_point())
                .map(|p| p.backup_id.clone()),
            _ => None,
        };
        let Some(id) = point else {
            self.notify(
                NoticeLevel::Info,
                strings::NOTICE_BROWSE_ONLY_POINTS.into(),
                self.now,
            );
            return None;
        };
        let backup = self.backups.iter().find(|b| b.backup_id == id);
        if let Some(b) = backup.filter(|b| b.status != JobStatus::Completed) {
            let text = strings::notice_not_browsable(&b.backup_id.0, b.status.as_str());
            self.notify(NoticeLevel::Info, text, self.now);
            return None;
        }
        let disks = backup
            .map(|b| b.disk_results.iter().map(|d| d.disk_key).collect())
            .unwrap_or_default();
        let vm = backup.map(|b| b.vm_name.clone()).unwrap_or_default();
        let mut browser = FileBrowser::new(id, vm, disks);
        let action = match browser.level {
            Level::Disks => None,
            _ => {
                let target = browser.at.clone();
                Some(browser.ask(target))
            }
        };
        self.browser = Some(browser);
        self.mode = Mode::Files;
        action
    }

    /// Keys of the open browser.
    pub(super) fn files_command(&mut self, command: Command) -> Option<Action> {
        let b = self.browser.as_mut()?;
        let len = b.len();
        match command {
            Command::Up => b.selected = b.selected().saturating_sub(1),
            Command::Down => b.selected = (b.selected() + 1).min(len.saturating_sub(1)),
            Command::Top => b.selected = 0,
            Command::Bottom => b.selected = len.saturating_sub(1),
            Command::Enter => return b.open(),
            Command::Erase => return b.up(),
            Command::Get => match b.get_target() {
                Some(t) => {
                    let input = default_tar_path(&t.name);
                    self.mode = Mode::FilesPrompt { input };
                }
                None => b.note = Some(strings::FILES_GET_WHAT.into()),
            },
            Command::Close => {
                self.browser = None;
                self.mode = Mode::Normal;
            }
            _ => {}
        }
        None
    }

    /// Keys of the "write the tar to" prompt.
    pub(super) fn files_prompt(&mut self, mut input: String, command: Command) -> Option<Action> {
        match command {
            Command::Type(c) => input.push(c),
            Command::Erase => {
                input.pop();
            }
            Command::Close => {
                self.mode = Mode::Files;
                return None;
            }
            Command::Enter => {
                self.mode = Mode::Files;
                let b = self.browser.as_mut()?;
                let t = b.get_target()?;
                if input.trim().is_empty() {
                    b.note = Some(strings::FILES_NO_PATH.into());
                    return None;
                }
                if self.download.is_some() {
                    b.note = Some(strings::FILES_ONE_AT_A_TIME.into());
                    return None;
                }
                let what = escape_bytes(&t.target.path_bytes());
                self.download = Some(super::Download {
                    dest: input.clone(),
                    what: what.clone(),
                    bytes: 0,
                    size: t.size,
                    started: self.now,
                });
                return Some(Action::GetFiles {
                    backup_id: b.backup_id.clone(),
                    target: t.target,
                    what,
                    dest: input,
                });
            }
            _ => {}
        }
        self.mode = Mode::FilesPrompt { input };
        None
    }

    /// The answer to an [`Action::ListFiles`].
    pub fn apply_file_listing(&mut self, seq: u64, result: Result<FileListing, String>) {
        if let Some(b) = self.browser.as_mut() {
            b.answer(seq, result);
        }
    }
}
