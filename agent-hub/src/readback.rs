//! The hub's own read-backs of an image chain: a read-only qemu-nbd over the image (it opens
//! the backing files itself) on a unix socket in `<data dir>/readback` (0700: no other local
//! user can connect, no port to allocate or squat), compared with a [`Manifest`] or hashed into
//! one. Finalize, verify jobs and the start-up reconciler all read back this way.
//!
//! The writable export of a job is stopped before (a read-back never races a writer), so the
//! read-only qemu-nbd is the only opener and takes the image's lock normally.

use crate::manifest::{self, CheckReport, Manifest, ManifestError, RangeReport};
use crate::qemu_nbd::{ExportSpec, QemuNbd, QemuNbdConfig, QemuNbdError};
use sendense_shared::api::ChecksumRange;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Longest unix socket path (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Why a read-back could not be done (a mismatch is not an error: see [`CheckReport`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("cannot prepare the read-back directory {path}: {cause}")]
    Dir { path: PathBuf, cause: String },
    #[error("cannot serve {image} read-only for the read-back")]
    Serve {
        image: PathBuf,
        #[source]
        source: QemuNbdError,
    },
    #[error("reading back {image}")]
    Check {
        image: PathBuf,
        #[source]
        source: ManifestError,
    },
}

impl ReadBackError {
    pub fn is_cancel(&self) -> bool {
        matches!(
            self,
            ReadBackError::Check {
                source: ManifestError::Cancelled,
                ..
            }
        )
    }
}

/// Serves images read-only for the hub's own reads. Cheap to clone.
#[derive(Clone)]
pub struct ReadBack {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: QemuNbdConfig,
    dir: PathBuf,
    next: AtomicU64,
}

impl ReadBack {
    /// `dir` is created 0700 on first use.
    pub fn new(cfg: QemuNbdConfig, dir: impl Into<PathBuf>) -> Self {
        ReadBack {
            inner: Arc::new(Inner {
                cfg,
                dir: dir.into(),
                next: AtomicU64::new(1),
            }),
        }
    }

    /// Serves `image` read-only on a fresh socket; [`Served::close`] stops it.
    pub async fn serve(&self, image: &Path) -> Result<Served, ReadBackError> {
        self.start(image).await.map(|server| Served { server })
    }

    async fn start(&self, image: &Path) -> Result<QemuNbd, ReadBackError> {
        let dir = &self.inner.dir;
        sendense_shared::fsmode::private_dir(dir).map_err(|e| ReadBackError::Dir {
            path: dir.clone(),
            cause: sendense_shared::errors::chain(&e),
        })?;
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let socket = dir.join(format!("rb-{}-{n}.sock", std::process::id()));
        if socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(ReadBackError::Dir {
                path: dir.clone(),
                cause: format!(
                    "a socket path there is {} bytes, longer than the {SUN_PATH_MAX} a unix \
                     socket allows; use a shorter data directory",
                    socket.as_os_str().len()
                ),
            });
        }
        let _ = std::fs::remove_file(&socket);
        let spec = ExportSpec {
            qcow2_path: image.to_path_buf(),
            export_name: "readback".into(),
            port: 0,
            read_only: true,
            client: None,
            socket: Some(socket),
        };
        QemuNbd::start(&self.inner.cfg, spec)
            .await
            .map_err(|source| ReadBackError::Serve {
                image: image.to_path_buf(),
                source,
            })
    }

    async fn finish(server: QemuNbd) {
        server.stop().await;
        if let Some(s) = &server.spec().socket {
            let _ = std::fs::remove_file(s);
        }
    }

    /// Reads `image` (with its chain) back and compares it with `m`; `read` counts bytes.
    pub async fn check(
        &self,
        image: &Path,
        m: &Manifest,
        cancel: &CancellationToken,
        read: &AtomicU64,
    ) -> Result<CheckReport, ReadBackError> {
        let served = self.serve(image).await?;
        let r = served.check(m, cancel, read).await;
        served.close().await;
        r
    }

    /// Hashes `image` (with its chain) on a grid of `cell_size`.
    pub async fn compute(
        &self,
        image: &Path,
        cell_size: u64,
        cancel: &CancellationToken,
        read: &AtomicU64,
    ) -> Result<Manifest, ReadBackError> {
        let served = self.serve(image).await?;
        let r = served.compute(cell_size, cancel, read).await;
        served.close().await;
        r
    }
}

/// An image served read-only by [`ReadBack::serve`].
pub struct Served {
    server: QemuNbd,
}

impl Served {
    pub fn addr(&self) -> sendense_shared::nbd::NbdAddr {
        self.server.nbd_addr()
    }

    /// Compares the image with `m` (see [`manifest::check`]).
    pub async fn check(
        &self,
        m: &Manifest,
        cancel: &CancellationToken,
        read: &AtomicU64,
    ) -> Result<CheckReport, ReadBackError> {
        manifest::check(&self.addr(), m, cancel, read)
            .await
            .map_err(|source| self.failed(source))
    }

    /// Hashes the image on a grid of `cell_size` (see [`manifest::compute`]).
    pub async fn compute(
        &self,
        cell_size: u64,
        cancel: &CancellationToken,
        read: &AtomicU64,
    ) -> Result<Manifest, ReadBackError> {
        manifest::compute(&self.addr(), cell_size, cancel, read)
            .await
            .map_err(|source| self.failed(source))
    }

    /// [`Served::check`], and the writer's range checksums that lie inside one cell in the same
    /// pass (see [`manifest::check_with_ranges`]).
    pub async fn check_with_ranges(
        &self,
        m: &Manifest,
        ranges: &[ChecksumRange],
        cancel: &CancellationToken,
        read: &AtomicU64,
    ) -> Result<(CheckReport, RangeReport), ReadBackError> {
        manifest::check_with_ranges(&self.addr(), m, ranges, cancel, read)
            .await
            .map_err(|source| self.failed(source))
    }

    /// [`Served::compute`], and the writer's range checksums that lie inside one cell in the
    /// same pass (see [`manifest::compute_with_ranges`]).
    pub async fn compute_with_ranges(
        &self,
        cell_size: u64,
        ranges: &[ChecksumRange],
        cancel: &CancellationToken,
        read: &AtomicU64,
    ) -> Result<(Manifest, RangeReport), ReadBackError> {
        manifest::compute_with_ranges(&self.addr(), cell_size, ranges, cancel, read)
            .await
            .map_err(|source| self.failed(source))
    }

    fn failed(&self, source: ManifestError) -> ReadBackError {
        ReadBackError::Check {
            image: self.server.spec().qcow2_path.clone(),
            source,
        }
    }

    /// Stops the read-only qemu-nbd and removes its socket.
    pub async fn close(self) {
        ReadBack::finish(self.server).await;
    }
}
