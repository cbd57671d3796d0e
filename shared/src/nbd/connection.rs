//! The transmission phase of one connection: a writer task that owns the socket's write half
//! and a reader task that owns its read half. Requests are registered under a fresh handle in a
//! shared table before they are sent; the reader decodes replies (in any order), applies each
//! to its request, and completes it. When either side fails, every pending request and every
//! later one gets the same error.

use super::reply::{self, Chunk, Decoded, Expect, ProtocolError, Reply, ReplyBody};
use super::{Extent, NbdError, proto::*};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// One message for the writer task.
pub(crate) struct Outgoing {
    pub header: [u8; REQUEST_LEN],
    pub payload: Option<Bytes>,
    /// NBD_CMD_DISC: the writer shuts the socket down after it.
    pub last: bool,
}

/// What a completed request hands back.
#[derive(Debug)]
pub(crate) enum Done {
    Unit,
    Data(Bytes),
    Extents(Vec<Extent>),
}

/// State of a request in flight.
pub(crate) struct Pending {
    expect: Expect,
    /// For BLOCK_STATUS: the context whose extents the caller wants.
    context: u32,
    reply: oneshot::Sender<Result<Done, NbdError>>,
    error: Option<NbdError>,
    read: ReadAssembly,
    extents: Option<Vec<Extent>>,
}

/// Pieces of a READ reply: one chunk covering the whole request is handed over as is; anything
/// else is copied into a zeroed buffer. `covered` keeps the pieces seen, to refuse overlaps and
/// to check at the end that every byte was answered.
#[derive(Default)]
struct ReadAssembly {
    single: Option<Bytes>,
    buf: Option<BytesMut>,
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
}

impl Pending {
    pub(crate) fn new(
        expect: Expect,
        context: u32,
        reply: oneshot::Sender<Result<Done, NbdError>>,
    ) -> Self {
        Pending {
            expect,
            context,
            reply,
            error: None,
            read: ReadAssembly::default(),
            extents: None,
        }
    }

    /// Applies one reply; returns the outcome once the request is complete.
    fn apply(&mut self, body: ReplyBody) -> Result<Option<Result<Done, NbdError>>, ProtocolError> {
        match body {
            ReplyBody::Simple { error, data } => {
                if error != 0 {
                    return Ok(Some(Err(self.server_error(error, String::new()))));
                }
                if let Some(e) = self.error.take() {
                    return Ok(Some(Err(e)));
                }
                Ok(Some(Ok(match data {
                    Some(d) => Done::Data(d),
                    None => Done::Unit,
                })))
            }
            ReplyBody::Chunk { done, chunk } => {
                match chunk {
                    Chunk::None => {}
                    Chunk::Data { offset, data } => self.add_read(offset, Some(data), 0)?,
                    Chunk::Hole { offset, length } => self.add_read(offset, None, length as u64)?,
                    Chunk::BlockStatus { context, extents } => {
                        if context == self.context {
                            if self.extents.is_some() {
                                return Err(ProtocolError(format!(
                                    "two BLOCK_STATUS chunks for context {context}"
                                )));
                            }
                            self.extents = Some(extents);
                        }
                    }
                    Chunk::Error {
                        code,
                        message,
                        offset,
                    } => {
                        if let Some(off) = offset {
                            let end = self.expect.offset + self.expect.length as u64;
                            if off < self.expect.offset || off >= end {
                                return Err(ProtocolError(format!(
                                    "ERROR_OFFSET {off} outside the request"
                                )));
                            }
                        }
                        if self.error.is_none() {
                            self.error = Some(self.server_error(code, message));
                        }
                    }
                }
                if !done {
                    return Ok(None);
                }
                self.finish().map(Some)
            }
        }
    }

    fn finish(&mut self) -> Result<Result<Done, NbdError>, ProtocolError> {
        if let Some(e) = self.error.take() {
            return Ok(Err(e));
        }
        match self.expect.command {
            CMD_READ => {
                if self.read.covered_bytes != self.expect.length as u64 {
                    return Err(ProtocolError(format!(
                        "READ reply covered {} of {} bytes",
                        self.read.covered_bytes, self.expect.length
                    )));
                }
                if let Some(b) = self.read.single.take() {
                    return Ok(Ok(Done::Data(b)));
                }
                let buf = self.read.buf.take().unwrap_or_default();
                Ok(Ok(Done::Data(buf.freeze())))
            }
            CMD_BLOCK_STATUS => match self.extents.take() {
                Some(e) => Ok(Ok(Done::Extents(e))),
                None => Err(ProtocolError(format!(
                    "BLOCK_STATUS reply without extents for context {}",
                    self.context
                ))),
            },
            _ => Ok(Ok(Done::Unit)),
        }
    }

    fn add_read(
        &mut self,
        offset: u64,
        data: Option<Bytes>,
        hole: u64,
    ) -> Result<(), ProtocolError> {
        let len = data.as_ref().map_or(hole, |d| d.len() as u64);
        let end = offset + len; // the parser checked it lies inside the request
        let r = &mut self.read;
        // Overlap with the piece starting before, or with one starting inside.
        if let Some((_, &prev_end)) = r.covered.range(..=offset).next_back()
            && prev_end > offset
        {
            return Err(ProtocolError(format!("READ chunks overlap at {offset}")));
        }
        if r.covered.range(offset..end).next().is_some() {
            return Err(ProtocolError(format!("READ chunks overlap at {offset}")));
        }
        r.covered.insert(offset, end);
        r.covered_bytes += len;
        let whole = offset == self.expect.offset && len == self.expect.length as u64;
        match data {
            Some(d) if whole => r.single = Some(d),
            Some(d) => {
                let buf = r
                    .buf
                    .get_or_insert_with(|| BytesMut::zeroed(self.expect.length as usize));
                let at = (offset - self.expect.offset) as usize;
                buf[at..at + d.len()].copy_from_slice(&d);
            }
            None => {
                r.buf
                    .get_or_insert_with(|| BytesMut::zeroed(self.expect.length as usize));
            }
        }
        Ok(())
    }

    fn server_error(&self, code: u32, message: String) -> NbdError {
        NbdError::Server {
            command: command_name(self.expect.command),
            offset: self.expect.offset,
            length: self.expect.length,
            code,
            errno: errno_name(code),
            message,
        }
    }
}

/// The table shared by callers, the reader and the writer.
#[derive(Default)]
pub(crate) struct Table {
    pub pending: HashMap<u64, Pending>,
    /// Set once the connection is unusable; every later request fails with it.
    pub closed: Option<NbdError>,
}

pub(crate) struct Shared {
    table: Mutex<Table>,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            table: Mutex::new(Table::default()),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the table half-updated in a way that
        // matters more than failing every request, which poisoning would do anyway.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and fails every pending request.
    pub(crate) fn fail(&self, err: NbdError) {
        let drained: Vec<Pending> = {
            let mut t = self.lock();
            if t.closed.is_none() {
                t.closed = Some(err.clone());
            }
            t.pending.drain().map(|(_, p)| p).collect()
        };
        let err = {
            let t = self.lock();
            t.closed.clone().unwrap_or(err)
        };
        for p in drained {
            let _ = p.reply.send(Err(err.clone()));
        }
    }
}

/// Bytes the reader makes room for beyond the reply it is reading.
const READ_AHEAD: usize = 1024 * 1024;

/// Reads replies until the connection ends or the server breaks the protocol.
pub(crate) async fn reader_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    shared: Arc<Shared>,
    structured: bool,
) {
    let err = match read_replies(&mut rd, &shared, structured).await {
        Ok(()) => NbdError::Closed {
            reason: "server closed the connection".into(),
        },
        Err(e) => e,
    };
    shared.fail(err);
}

async fn read_replies<R: AsyncRead + Unpin>(
    rd: &mut R,
    shared: &Shared,
    structured: bool,
) -> Result<(), NbdError> {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        // Decode and apply every complete reply in the buffer, under one lock.
        let needed = loop {
            let mut t = shared.lock();
            let decoded = reply::decode(&mut buf, structured, |h| {
                t.pending.get(&h).map(|p| p.expect)
            })
            .map_err(|e| NbdError::Protocol { reason: e.0 })?;
            match decoded {
                Decoded::Incomplete { needed } => break needed,
                Decoded::Reply(Reply { handle, body }) => {
                    let p = t
                        .pending
                        .get_mut(&handle)
                        .expect("decode looked the handle up");
                    let outcome = p
                        .apply(body)
                        .map_err(|e| NbdError::Protocol { reason: e.0 })?;
                    if let Some(outcome) = outcome {
                        let p = t.pending.remove(&handle).expect("present");
                        drop(t);
                        // The caller may have given up on this request: nothing to do then.
                        let _ = p.reply.send(outcome);
                    }
                }
            }
        };
        while buf.len() < needed {
            // Room for the rest of this reply and then some, so that one read can take in
            // several replies. `needed` is bounded by the parser's caps.
            let missing = needed - buf.len();
            if buf.capacity() - buf.len() < missing.max(64 * 1024) {
                buf.reserve(missing.max(READ_AHEAD));
            }
            let n = rd.read_buf(&mut buf).await.map_err(|e| NbdError::Io {
                during: "reading replies",
                source: Arc::new(e),
            })?;
            if n == 0 {
                let pending = shared.lock().pending.len();
                if buf.is_empty() && pending == 0 {
                    return Ok(());
                }
                return Err(NbdError::Closed {
                    reason: format!(
                        "server closed the connection mid-reply ({} bytes of a reply, {pending} requests pending)",
                        buf.len()
                    ),
                });
            }
        }
    }
}

/// Most messages sent with one vectored write.
const MAX_BATCH: usize = 64;

/// Sends requests in the order they were queued. Whatever is queued when the socket is ready
/// goes out in one vectored write (headers and payloads without copying them together).
pub(crate) async fn writer_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let result: std::io::Result<()> = async {
        let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH);
        loop {
            let Some(first) = rx.recv().await else {
                // Every client handle is gone: say goodbye properly.
                w.write_all(&encode_request(0, CMD_DISC, u64::MAX, 0, 0))
                    .await?;
                return w.shutdown().await;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH && !batch.last().is_some_and(|m| m.last) {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let last = batch.iter().any(|m| m.last);
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
            for m in &batch {
                slices.push(IoSlice::new(&m.header));
                if let Some(p) = &m.payload {
                    slices.push(IoSlice::new(p));
                }
            }
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = w.write_vectored(rest).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut rest, n);
            }
            drop(slices);
            batch.clear();
            w.flush().await?;
            if last {
                return w.shutdown().await;
            }
        }
    }
    .await;
    if let Err(e) = result {
        shared.fail(NbdError::Io {
            during: "sending requests",
            source: Arc::new(e),
        });
    }
}
