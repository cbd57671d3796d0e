//! File-level browsing of a backup point without restoring it.
//!
//! The point's qcow2 (with its backing chain) is added read-only to a libguestfs appliance — a
//! small VM of its own — so the guest's filesystems are parsed by the appliance's kernel, never
//! by the hub's: nothing is mounted on the host. One appliance per browsing session (a backup
//! point's disk): the first request of a session waits for its launch (about 14-30 s under
//! TCG), every later one answers in milliseconds.
//!
//! Invariants:
//! - read-only: `guestfish --ro`, the image added with `--format=qcow2`; QEMU opens the chain
//!   read-only with shared locks (a `qemu-img info` of the point still works while a session
//!   is open), and the appliance's writable overlay lives in the session's own directory under
//!   `<data>/files/`, never in the repository;
//! - a guest symlink is never followed: every ancestor of a requested path is `lstat`ed and a
//!   link there is refused; a link at the end is answered as a link (listed with its target,
//!   archived as a link entry);
//! - sessions are bounded (`files_max_sessions`), closed after `files_idle_timeout_secs`
//!   without a request (the hub's [`Clock`], so a test can move time), and all closed on
//!   shutdown; a killed hub takes its guestfish children with it (`setpriv --pdeathsig`), and
//!   the next start removes what their overlays left in `<data>/files/`.
//!
//! - `path`: [`GuestPath`], validation and quoting; `guestfish`: the child and its framing;
//!   `tar`: headers of one-entry archives.

pub mod guestfish;
pub mod path;
pub mod tar;

use crate::clock::Clock;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use guestfish::{Guestfish, GuestfishError};
pub use path::{GuestPath, PathError};
use sendense_shared::api::{FileEntry, FileKind, FileListing, GuestFilesystem};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Settings of file browsing.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// The guestfish binary.
    pub guestfish: String,
    /// A session without a request for this long is closed.
    pub idle_timeout: Duration,
    /// At most this many appliances at once.
    pub max_sessions: usize,
    /// How long the appliance may take to boot.
    pub launch_timeout: Duration,
    /// Entries of one listing at most (`truncated` says when there were more).
    pub max_entries: usize,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            guestfish: "guestfish".into(),
            idle_timeout: Duration::from_secs(300),
            max_sessions: 4,
            launch_timeout: Duration::from_secs(300),
            max_entries: 10_000,
        }
    }
}

/// How long one command inside a running appliance may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Why browsing failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{0}")]
    Path(#[from] PathError),
    /// A field of the request names nothing (`fs`, `path`); the message names it.
    #[error("{field}: {detail}")]
    NotFound { field: &'static str, detail: String },
    #[error("{field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error(
        "{open} file-browsing sessions are open (files_max_sessions); they close after {idle:?} without a request"
    )]
    TooMany { open: usize, idle: Duration },
    #[error("the hub is shutting down")]
    ShuttingDown,
    #[error("cannot prepare the session directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the appliance failed")]
    Guestfish(#[from] GuestfishError),
}

type Key = (String, i64);

/// The browsing sessions of the hub.
#[derive(Clone)]
pub struct FileBrowser {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: FilesConfig,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    sessions: Mutex<HashMap<Key, Arc<Session>>>,
    closed: std::sync::atomic::AtomicBool,
}

/// One appliance serving one disk of one backup point.
pub struct Session {
    key: Key,
    dir: PathBuf,
    last_used: Mutex<DateTime<Utc>>,
    state: Arc<tokio::sync::Mutex<Option<Appliance>>>,
    /// The running child, also reachable while a request holds `state` (shutdown, reaper).
    child: Mutex<Option<sendense_shared::child::Supervised>>,
}

struct Appliance {
    gf: Guestfish,
    partitions: Vec<String>,
    lvs: Vec<String>,
    filesystems: Vec<GuestFilesystem>,
    mounted: Option<String>,
}

/// Metadata of one path, from `lstatns`.
#[derive(Debug, Clone, Default)]
pub struct Stat {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
}

impl Stat {
    pub fn kind(&self) -> FileKind {
        FileKind::from_mode(self.mode)
    }

    fn parse(out: &[u8]) -> Stat {
        let mut s = Stat::default();
        for line in String::from_utf8_lossy(out).lines() {
            let Some((k, v)) = line.trim().split_once(": ") else {
                continue;
            };
            let n: i64 = v.trim().parse().unwrap_or(0);
            match k {
                "st_mode" => s.mode = n as u32,
                "st_uid" => s.uid = n as u64,
                "st_gid" => s.gid = n as u64,
                "st_size" => s.size = n as u64,
                "st_mtime_sec" => s.mtime = n,
                _ => {}
            }
        }
        s
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private directory (0700).
fn private_dir(path: &Path) -> Result<(), FilesError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| FilesError::Dir {
            path: path.to_path_buf(),
            source,
        })
}

type Guard = tokio::sync::OwnedMutexGuard<Option<Appliance>>;

/// What an archive request answers: a name for the download and the tar bytes as they come.
pub struct Archive {
    pub file_name: String,
    pub body: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl FileBrowser {
    /// `dir`: `<data>/files`; what a previous run left there (appliance overlays of a killed
    /// hub) is removed.
    pub fn new(cfg: FilesConfig, clock: Arc<dyn Clock>, dir: PathBuf) -> FileBrowser {
        let sessions = dir.join("sessions");
        if sessions.exists()
            && let Err(e) = std::fs::remove_dir_all(&sessions)
        {
            tracing::warn!(dir = %sessions.display(), error = %e, "cannot remove old browsing sessions");
        }
        FileBrowser {
            inner: Arc::new(Inner {
                cfg,
                clock,
                dir,
                sessions: Mutex::new(HashMap::new()),
                closed: false.into(),
            }),
        }
    }

    pub fn config(&self) -> &FilesConfig {
        &self.inner.cfg
    }

    /// PIDs of the running guestfish children.
    pub fn pids(&self) -> Vec<u32> {
        let sessions: Vec<_> = lock(&self.inner.sessions).values().cloned().collect();
        sessions
            .iter()
            .filter_map(|s| lock(&s.child).as_ref().map(|c| c.pid()))
            .collect()
    }

    /// The session of `(backup, disk)` with its appliance running (the first caller waits for
    /// the launch; one whose child died is launched again).
    async fn open(
        &self,
        backup: &BackupId,
        disk: DiskKey,
        image: &Path,
    ) -> Result<(Arc<Session>, Guard), FilesError> {
        use std::sync::atomic::Ordering;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(FilesError::ShuttingDown);
        }
        let key = (backup.0.clone(), disk.0);
        let session = {
            let mut map = lock(&self.inner.sessions);
            match map.get(&key) {
                Some(s) => s.clone(),
                None => {
                    if map.len() >= self.inner.cfg.max_sessions {
                        return Err(FilesError::TooMany {
                            open: map.len(),
                            idle: self.inner.cfg.idle_timeout,
                        });
                    }
                    let s = Arc::new(Session {
                        key: key.clone(),
                        dir: self
                            .inner
                            .dir
                            .join("sessions")
                            .join(uuid::Uuid::new_v4().simple().to_string()),
                        last_used: Mutex::new(self.inner.clock.now()),
                        state: Arc::new(tokio::sync::Mutex::new(None)),
                        child: Mutex::new(None),
                    });
                    map.insert(key.clone(), s.clone());
                    s
                }
            }
        };
        session.touch(self.inner.clock.now());
        let mut guard = session.state.clone().lock_owned().await;
        if guard.as_ref().is_some_and(|a| !a.gf.child.is_alive()) {
            tracing::warn!(backup_id = %key.0, disk_key = key.1, "browsing appliance had ended; launching it again");
            *guard = None;
        }
        if guard.is_none() {
            match self.launch(&session, image).await {
                Ok(a) => {
                    *lock(&session.child) = Some(a.gf.child.clone());
                    *guard = Some(a);
                }
                Err(e) => {
                    drop(guard);
                    self.forget(&session).await;
                    return Err(e);
                }
            }
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            drop(guard);
            self.forget(&session).await;
            return Err(FilesError::ShuttingDown);
        }
        Ok((session, guard))
    }

    async fn launch(&self, session: &Session, image: &Path) -> Result<Appliance, FilesError> {
        let tmp = session.dir.join("tmp");
        let cache = self.inner.dir.join("cache");
        private_dir(&tmp)?;
        private_dir(&cache)?;
        let started = std::time::Instant::now();
        let mut gf = Guestfish::spawn(&self.inner.cfg.guestfish, image, &tmp, &cache)?;
        tracing::info!(pid = gf.child.pid(), command = %gf.child.command_line_string(), "file browsing: launching appliance");
        if let Err(e) = gf.launch(self.inner.cfg.launch_timeout).await {
            gf.stop().await;
            return Err(e.into());
        }
        let mut a = Appliance {
            gf,
            partitions: Vec::new(),
            lvs: Vec::new(),
            filesystems: Vec::new(),
            mounted: None,
        };
        let lines = |b: Vec<u8>| -> Vec<String> {
            String::from_utf8_lossy(&b)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        };
        let r = async {
            a.partitions = lines(a.gf.run("list-partitions", COMMAND_TIMEOUT).await?);
            a.lvs = lines(a.gf.run("lvs", COMMAND_TIMEOUT).await?);
            a.filesystems = lines(a.gf.run("list-filesystems", COMMAND_TIMEOUT).await?)
                .into_iter()
                .filter_map(|l| {
                    let (d, t) = l.rsplit_once(": ")?;
                    Some(GuestFilesystem {
                        device: d.to_string(),
                        fs_type: t.to_string(),
                    })
                })
                .collect();
            Ok::<_, GuestfishError>(())
        }
        .await;
        if let Err(e) = r {
            a.gf.stop().await;
            return Err(e.into());
        }
        tracing::info!(
            pid = a.gf.child.pid(),
            secs = started.elapsed().as_secs_f64(),
            filesystems = a.filesystems.len(),
            "file browsing: appliance ready"
        );
        Ok(a)
    }

    /// Removes `session` from the map (if it is still the one there) and stops its child.
    async fn forget(&self, session: &Arc<Session>) {
        {
            let mut map = lock(&self.inner.sessions);
            if map
                .get(&session.key)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                map.remove(&session.key);
            }
        }
        session.stop().await;
    }

    /// Closes every session idle for longer than the timeout and not serving a request.
    pub async fn reap_idle(&self) -> usize {
        let now = self.inner.clock.now();
        let idle = chrono::TimeDelta::from_std(self.inner.cfg.idle_timeout)
            .unwrap_or(chrono::TimeDelta::MAX);
        let stale: Vec<Arc<Session>> = lock(&self.inner.sessions)
            .values()
            .filter(|s| now - *lock(&s.last_used) > idle && s.state.try_lock().is_ok())
            .cloned()
            .collect();
        for s in &stale {
            tracing::info!(backup_id = %s.key.0, disk_key = s.key.1, "file browsing: closing idle session");
            self.forget(s).await;
        }
        stale.len()
    }

    /// Runs [`FileBrowser::reap_idle`] every `tick` until `shutdown`, then closes every session.
    pub fn spawn_reaper(
        &self,
        tick: Duration,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let me = self.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(tick) => { me.reap_idle().await; }
                }
            }
        });
    }

    /// Closes every session (hub shutdown); later requests are refused.
    pub async fn shutdown(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let all: Vec<Arc<Session>> = lock(&self.inner.sessions).drain().map(|(_, s)| s).collect();
        for s in all {
            s.stop().await;
        }
    }

    /// The disk's partitions, volumes and filesystems; with `path`, that directory's entries.
    pub async fn list(
        &self,
        backup: &BackupId,
        disk: DiskKey,
        image: &Path,
        fs: Option<&str>,
        path: Option<&GuestPath>,
    ) -> Result<FileListing, FilesError> {
        let (session, mut guard) = self.open(backup, disk, image).await?;
        let a = guard.as_mut().expect("launched");
        let mut out = FileListing {
            backup_id: backup.clone(),
            disk_key: disk,
            partitions: a.partitions.clone(),
            logical_volumes: a.lvs.clone(),
            filesystems: a.filesystems.clone(),
            filesystem: None,
            path: None,
            path_b64: None,
            entries: None,
            truncated: false,
        };
        if let Some(path) = path {
            let dev = a.mount(fs).await?;
            let st = a.resolve(path).await?;
            if st.kind() != FileKind::Directory {
                return Err(FilesError::Invalid {
                    field: "path",
                    detail: format!(
                        "{} is a {:?}, not a directory; GET .../files/archive fetches it",
                        path.lossy(),
                        st.kind()
                    ),
                });
            }
            let (entries, truncated) = a
                .entries(path, &session.dir, self.inner.cfg.max_entries)
                .await?;
            let (p, p64) = path::encode_name(path.as_bytes());
            out.filesystem = Some(dev);
            out.path = Some(p);
            out.path_b64 = p64;
            out.entries = Some(entries);
            out.truncated = truncated;
        }
        session.touch(self.inner.clock.now());
        Ok(out)
    }

    /// `path` as a tar stream: a directory through the appliance's `tar-out` (entries relative
    /// to it, numeric owners), a regular file through `download` behind a header made here, a
    /// symlink as one link entry (never followed).
    pub async fn archive(
        &self,
        backup: &BackupId,
        disk: DiskKey,
        image: &Path,
        fs: Option<&str>,
        path: &GuestPath,
    ) -> Result<Archive, FilesError> {
        let (session, mut guard) = self.open(backup, disk, image).await?;
        let a = guard.as_mut().expect("launched");
        a.mount(fs).await?;
        let st = a.resolve(path).await?;
        let base = if path.is_root() {
            b"root".to_vec()
        } else {
            path.file_name().to_vec()
        };
        let file_name = format!("{}.tar", String::from_utf8_lossy(&base));
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let link = if st.kind() == FileKind::Symlink {
            Some(a.readlink(path).await?)
        } else {
            None
        };
        match st.kind() {
            FileKind::Symlink | FileKind::File | FileKind::Directory => {}
            k => {
                return Err(FilesError::Invalid {
                    field: "path",
                    detail: format!(
                        "{} is a {k:?}; only files, directories and links are archived",
                        path.lossy()
                    ),
                });
            }
        }
        let path = path.clone();
        let clock = self.inner.clock.clone();
        tokio::spawn(async move {
            let r = stream(guard, &session.dir, &path, &base, &st, link, &tx).await;
            if let Err(e) = r {
                tracing::warn!(path = %path.lossy(), error = %sendense_shared::errors::chain(&e), "file browsing: archive failed");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
            session.touch(clock.now());
        });
        Ok(Archive {
            file_name,
            body: rx,
        })
    }
}

type Tx = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Sends `b` unless the client is gone; answers whether it is still there.
async fn emit(tx: &Tx, b: Vec<u8>) -> bool {
    tx.send(Ok(Bytes::from(b))).await.is_ok()
}

async fn stream(
    mut guard: Guard,
    dir: &Path,
    path: &GuestPath,
    base: &[u8],
    st: &Stat,
    link: Option<Vec<u8>>,
    tx: &Tx,
) -> Result<(), FilesError> {
    let a = guard.as_mut().expect("launched");
    let entry = |kind| tar::Entry {
        name: base,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        mtime: st.mtime,
        kind,
    };
    match st.kind() {
        FileKind::Symlink => {
            let target = link.unwrap_or_default();
            let mut b = tar::header(&entry(tar::Kind::Symlink { target: &target }));
            b.extend(tar::trailer(0));
            emit(tx, b).await;
            Ok(())
        }
        FileKind::File => {
            let mut live = emit(tx, tar::header(&entry(tar::Kind::File { size: st.size }))).await;
            let cmd = format!("download {} ", path::quote(path.as_bytes()));
            let n = a.pump(dir, &cmd, "", tx, &mut live).await?;
            if n != st.size {
                return Err(FilesError::Invalid {
                    field: "path",
                    detail: format!("{} read {n} bytes, its size is {}", path.lossy(), st.size),
                });
            }
            if live {
                emit(tx, tar::trailer(n)).await;
            }
            Ok(())
        }
        _ => {
            let mut live = true;
            let cmd = format!("tar-out {} ", path::quote(path.as_bytes()));
            a.pump(dir, &cmd, " numericowner:true", tx, &mut live)
                .await?;
            Ok(())
        }
    }
}

impl Session {
    fn touch(&self, now: DateTime<Utc>) {
        let mut l = lock(&self.last_used);
        if now > *l {
            *l = now;
        }
    }

    async fn stop(&self) {
        let child = lock(&self.child).take();
        if let Some(c) = child {
            let report = c.stop(Duration::from_secs(5)).await;
            tracing::info!(pid = c.pid(), status = %report.status, "file browsing: appliance stopped");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a session directory");
        }
    }
}

fn not_found(path: &GuestPath, what: &str) -> FilesError {
    FilesError::NotFound {
        field: "path",
        detail: format!("{}: {what}", path.lossy()),
    }
}

impl Appliance {
    /// Mounts `fs` (or the disk's only filesystem) read-only at the appliance's root; answers
    /// the device.
    async fn mount(&mut self, fs: Option<&str>) -> Result<String, FilesError> {
        let usable: Vec<&GuestFilesystem> = self
            .filesystems
            .iter()
            .filter(|f| {
                !matches!(
                    f.fs_type.as_str(),
                    "swap" | "unknown" | "luks" | "LVM2_member"
                )
            })
            .collect();
        let names = || {
            usable
                .iter()
                .map(|f| f.device.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let dev = match fs {
            Some(d) => match usable.iter().find(|f| f.device == d) {
                Some(f) => f.device.clone(),
                None => {
                    return Err(FilesError::NotFound {
                        field: "fs",
                        detail: format!(
                            "{d:?} is not a filesystem of this disk; it has: {}",
                            names()
                        ),
                    });
                }
            },
            None => match usable.as_slice() {
                [one] => one.device.clone(),
                [] => {
                    return Err(FilesError::NotFound {
                        field: "fs",
                        detail: "the disk holds no filesystem the appliance can read".into(),
                    });
                }
                _ => {
                    return Err(FilesError::Invalid {
                        field: "fs",
                        detail: format!(
                            "the disk holds several filesystems; name one: {}",
                            names()
                        ),
                    });
                }
            },
        };
        if self.mounted.as_deref() != Some(&dev) {
            if self.mounted.take().is_some() {
                self.gf.run("umount-all", COMMAND_TIMEOUT).await?;
            }
            self.gf
                .run(
                    &format!("mount-ro {} /", path::quote(dev.as_bytes())),
                    COMMAND_TIMEOUT,
                )
                .await
                .map_err(|e| FilesError::Invalid {
                    field: "fs",
                    detail: format!("{dev} cannot be mounted read-only: {e}"),
                })?;
            self.mounted = Some(dev.clone());
        }
        Ok(dev)
    }

    async fn lstat(&mut self, p: &GuestPath) -> Result<Option<Stat>, FilesError> {
        match self
            .gf
            .run(
                &format!("lstatns {}", path::quote(p.as_bytes())),
                COMMAND_TIMEOUT,
            )
            .await
        {
            Ok(out) => Ok(Some(Stat::parse(&out))),
            Err(GuestfishError::Command(m))
                if m.contains("No such file or directory") || m.contains("Not a directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `path`'s own metadata, after checking that no ancestor is a link (so nothing the
    /// appliance resolves can leave the guest's tree).
    async fn resolve(&mut self, p: &GuestPath) -> Result<Stat, FilesError> {
        for anc in p.ancestors() {
            match self.lstat(&anc).await? {
                None => return Err(not_found(p, &format!("{} does not exist", anc.lossy()))),
                Some(s) if s.kind() == FileKind::Symlink => {
                    return Err(FilesError::Invalid {
                        field: "path",
                        detail: format!(
                            "{} is a symbolic link; the browser does not follow links (list its directory to see the target)",
                            anc.lossy()
                        ),
                    });
                }
                Some(s) if s.kind() != FileKind::Directory => {
                    return Err(not_found(p, &format!("{} is not a directory", anc.lossy())));
                }
                Some(_) => {}
            }
        }
        self.lstat(p)
            .await?
            .ok_or_else(|| not_found(p, "no such file or directory"))
    }

    async fn readlink(&mut self, p: &GuestPath) -> Result<Vec<u8>, FilesError> {
        let mut out = self
            .gf
            .run(
                &format!("readlink {}", path::quote(p.as_bytes())),
                COMMAND_TIMEOUT,
            )
            .await?;
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        Ok(out)
    }

    async fn entries(
        &mut self,
        dir: &GuestPath,
        work: &Path,
        max: usize,
    ) -> Result<(Vec<FileEntry>, bool), FilesError> {
        private_dir(work)?;
        let list = work.join("ls0.out");
        let host = list.to_string_lossy().into_owned();
        self.gf
            .run(
                &format!(
                    "ls0 {} {}",
                    path::quote(dir.as_bytes()),
                    path::quote(host.as_bytes())
                ),
                COMMAND_TIMEOUT,
            )
            .await?;
        let raw = tokio::fs::read(&list)
            .await
            .map_err(|source| FilesError::Dir {
                path: list.clone(),
                source,
            })?;
        let _ = tokio::fs::remove_file(&list).await;
        let mut names: Vec<&[u8]> = raw.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        names.sort();
        let truncated = names.len() > max;
        names.truncate(max);
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let p = dir.join(name);
            let Some(st) = self.lstat(&p).await? else {
                continue;
            };
            let kind = st.kind();
            let (link_target, link_target_b64) = if kind == FileKind::Symlink {
                let t = self.readlink(&p).await?;
                let (s, b) = path::encode_name(&t);
                (Some(s), b)
            } else {
                (None, None)
            };
            let (n, n64) = path::encode_name(name);
            out.push(FileEntry {
                name: n,
                name_b64: n64,
                kind,
                size: st.size,
                mode: st.mode & 0o7777,
                uid: st.uid,
                gid: st.gid,
                mtime: st.mtime,
                link_target,
                link_target_b64,
            });
        }
        Ok((out, truncated))
    }

    /// Runs `cmd FIFO opts` with a FIFO of the session's as the appliance's output file and
    /// forwards what arrives to `tx`; answers the byte count. The FIFO is opened read-write
    /// here, so guestfish's open never waits and a command that fails before writing cannot
    /// hang the reader; the end is the command's mark (guestfish has closed the file by then,
    /// so what is left is in the pipe and drained without waiting). A client that went away
    /// stops the forwarding, not the reading: the appliance finishes its command.
    async fn pump(
        &mut self,
        work: &Path,
        cmd: &str,
        opts: &str,
        tx: &Tx,
        live: &mut bool,
    ) -> Result<u64, FilesError> {
        private_dir(work)?;
        let fifo = work.join(format!("out-{}.fifo", uuid::Uuid::new_v4().simple()));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
            |e| FilesError::Dir {
                path: fifo.clone(),
                source: std::io::Error::from(e),
            },
        )?;
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&fifo);
        let mut rx = match rx {
            Ok(r) => r,
            Err(source) => {
                let _ = std::fs::remove_file(&fifo);
                return Err(FilesError::Dir { path: fifo, source });
            }
        };
        let host = fifo.to_string_lossy().into_owned();
        let line = format!("{cmd}{}{opts}", path::quote(host.as_bytes()));
        let result = async {
            let mark = self.gf.send(&line).await?;
            let mut total = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            let finish = self.gf.finish(&mark);
            tokio::pin!(finish);
            let done = loop {
                tokio::select! {
                    biased;
                    r = rx.read(&mut buf) => {
                        let n = r.map_err(GuestfishError::Io)?;
                        total += n as u64;
                        if *live && n > 0 {
                            *live = emit(tx, buf[..n].to_vec()).await;
                        }
                    }
                    r = &mut finish => break r,
                }
            };
            loop {
                match rx.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n as u64;
                        if *live {
                            *live = emit(tx, buf[..n].to_vec()).await;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(GuestfishError::Io(e)),
                }
            }
            done?;
            Ok::<u64, GuestfishError>(total)
        }
        .await;
        let _ = std::fs::remove_file(&fifo);
        Ok(result?)
    }
}
