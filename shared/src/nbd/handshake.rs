//! Fixed newstyle negotiation: structured replies, meta contexts, then `NBD_OPT_GO` by export
//! name. Every length read from the server is capped before anything is allocated.

use super::NbdError;
use super::proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest option reply payload accepted: the biggest legitimate one is a context or export
/// name (at most 4096 bytes) plus a few integers.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// A server that answers one option with more replies than this is not negotiating in good faith.
const MAX_REPLIES_PER_OPTION: usize = 4096;

/// What the negotiation settled.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub contexts: Vec<(String, u32)>,
    /// Minimum, preferred and maximum block size, when the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

/// Reads the server's newstyle greeting and answers with the client flags.
pub(crate) async fn greet<S>(stream: &mut S) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fail = |reason: String| NbdError::Handshake { reason };
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).await.map_err(io_fail)?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    if magic != NBDMAGIC {
        return Err(fail(format!(
            "not an NBD server (first 8 bytes {magic:#018x}, expected NBDMAGIC)"
        )));
    }
    let second = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    if second == OLDSTYLE_MAGIC {
        return Err(fail(
            "server speaks the oldstyle protocol; only fixed newstyle is supported".into(),
        ));
    }
    if second != IHAVEOPT {
        return Err(fail(format!(
            "bad newstyle magic {second:#018x}, expected IHAVEOPT"
        )));
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(fail(
            "server does not offer fixed newstyle negotiation".into(),
        ));
    }
    let mut client_flags = CLIENT_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= CLIENT_NO_ZEROES;
    }
    stream
        .write_all(&client_flags.to_be_bytes())
        .await
        .map_err(io_fail)?;
    Ok(())
}

/// `NBD_OPT_STARTTLS` on a greeted stream: once acknowledged, the next bytes on the wire are the
/// client's TLS handshake (the server sends nothing more in the clear).
pub(crate) async fn starttls<S>(stream: &mut S) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(stream, OPT_STARTTLS, &[]).await?;
    match read_final(stream, OPT_STARTTLS).await? {
        Final::Ack => Ok(()),
        Final::Error { code, message } => Err(NbdError::Tls {
            reason: format!(
                "server refused NBD_OPT_STARTTLS: {}{}",
                rep_error_name(code),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            ),
        }),
    }
}

/// The options after the greeting (and after TLS, when used): structured replies, meta
/// contexts, `NBD_OPT_GO`.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    export: &str,
    meta_contexts: &[String],
) -> Result<Negotiated, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let fail = |reason: String| NbdError::Handshake { reason };
    if export.len() > 4096 {
        return Err(fail("export name longer than 4096 bytes".into()));
    }

    // Structured replies: needed for block status and sparse reads; a server without them is
    // still usable for plain reads and writes.
    send_option(stream, OPT_STRUCTURED_REPLY, &[]).await?;
    let structured = match read_final(stream, OPT_STRUCTURED_REPLY).await? {
        Final::Ack => true,
        Final::Error { code, .. } if code == REP_ERR_UNSUP || code == REP_ERR_POLICY => false,
        Final::Error { code, .. } if code == REP_ERR_TLS_REQD => {
            return Err(NbdError::Tls {
                reason: "the server requires TLS and no TLS material was given".into(),
            });
        }
        Final::Error { code, message } => {
            return Err(refused("NBD_OPT_STRUCTURED_REPLY", code, message));
        }
    };

    let mut contexts = Vec::new();
    // Meta contexts need structured replies; without them (or when the server does not know
    // the option) no context is granted, which callers see through `meta_context_id`.
    if !meta_contexts.is_empty() && structured {
        let mut data = Vec::new();
        put_str(&mut data, export);
        data.extend_from_slice(&(meta_contexts.len() as u32).to_be_bytes());
        for q in meta_contexts {
            if q.len() > 4096 {
                return Err(fail(format!("meta context name {q:?}... too long")));
            }
            put_str(&mut data, q);
        }
        send_option(stream, OPT_SET_META_CONTEXT, &data).await?;
        for _ in 0..MAX_REPLIES_PER_OPTION {
            let r = read_option_reply(stream, OPT_SET_META_CONTEXT).await?;
            match r.kind {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    if r.data.len() < 4 {
                        return Err(fail("short NBD_REP_META_CONTEXT reply".into()));
                    }
                    let id = u32::from_be_bytes(r.data[0..4].try_into().expect("4 bytes"));
                    let name = String::from_utf8_lossy(&r.data[4..]).into_owned();
                    if !meta_contexts.contains(&name) {
                        return Err(fail(format!(
                            "server granted meta context {name:?} that was not asked for"
                        )));
                    }
                    contexts.push((name, id));
                }
                REP_ERR_UNSUP => {
                    contexts.clear();
                    break;
                }
                k if k & REP_FLAG_ERROR != 0 => {
                    return Err(refused(
                        "NBD_OPT_SET_META_CONTEXT",
                        k,
                        String::from_utf8_lossy(&r.data).into_owned(),
                    ));
                }
                k => {
                    return Err(fail(format!(
                        "unexpected reply type {k} to NBD_OPT_SET_META_CONTEXT"
                    )));
                }
            }
        }
    }

    // NBD_OPT_GO: export name, then the info requests (block size; INFO_EXPORT always comes).
    let mut data = Vec::new();
    put_str(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &data).await?;
    let mut export_info = None;
    let mut block_size = None;
    let mut acked = false;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let r = read_option_reply(stream, OPT_GO).await?;
        match r.kind {
            REP_ACK => {
                acked = true;
                break;
            }
            REP_INFO => {
                if r.data.len() < 2 {
                    return Err(fail("short NBD_REP_INFO reply".into()));
                }
                let info = u16::from_be_bytes([r.data[0], r.data[1]]);
                let body = &r.data[2..];
                match info {
                    INFO_EXPORT => {
                        if body.len() != 10 {
                            return Err(fail(format!(
                                "NBD_INFO_EXPORT of {} bytes, expected 10",
                                body.len()
                            )));
                        }
                        let size = u64::from_be_bytes(body[0..8].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([body[8], body[9]]);
                        export_info = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        if body.len() != 12 {
                            return Err(fail(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes, expected 12",
                                body.len()
                            )));
                        }
                        let get = |i: usize| {
                            u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"))
                        };
                        block_size = Some((get(0), get(4), get(8)));
                    }
                    // Names and descriptions are informative only.
                    _ => {}
                }
            }
            k if k & REP_FLAG_ERROR != 0 => {
                let message = String::from_utf8_lossy(&r.data).into_owned();
                if k == REP_ERR_UNKNOWN {
                    return Err(NbdError::ExportNotFound {
                        export: export.to_string(),
                        message,
                    });
                }
                return Err(refused("NBD_OPT_GO", k, message));
            }
            k => {
                return Err(fail(format!("unexpected reply type {k} to NBD_OPT_GO")));
            }
        }
    }
    if !acked {
        return Err(fail("too many replies to NBD_OPT_GO".into()));
    }
    let (size, flags) = export_info
        .ok_or_else(|| fail("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT".into()))?;
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err(fail("transmission flags lack NBD_FLAG_HAS_FLAGS".into()));
    }
    if size > i64::MAX as u64 {
        return Err(fail(format!("export size {size} exceeds 2^63-1")));
    }
    Ok(Negotiated {
        size,
        flags,
        structured,
        contexts,
        block_size,
    })
}

enum Final {
    Ack,
    Error { code: u32, message: String },
}

/// Reads replies to an option that takes only ACK or an error.
async fn read_final<S: AsyncRead + Unpin>(stream: &mut S, option: u32) -> Result<Final, NbdError> {
    let r = read_option_reply(stream, option).await?;
    match r.kind {
        REP_ACK => Ok(Final::Ack),
        k if k & REP_FLAG_ERROR != 0 => Ok(Final::Error {
            code: k,
            message: String::from_utf8_lossy(&r.data).into_owned(),
        }),
        k => Err(NbdError::Handshake {
            reason: format!("unexpected reply type {k} to option {option}"),
        }),
    }
}

async fn send_option<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    stream.write_all(&msg).await.map_err(io_fail)?;
    stream.flush().await.map_err(io_fail)
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    option: u32,
) -> Result<OptionReply, NbdError> {
    let mut h = [0u8; 20];
    stream.read_exact(&mut h).await.map_err(io_fail)?;
    let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::Handshake {
            reason: format!("bad option reply magic {magic:#018x}"),
        });
    }
    if opt != option {
        return Err(NbdError::Handshake {
            reason: format!("reply for option {opt} while option {option} was asked"),
        });
    }
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::Handshake {
            reason: format!("option reply of {len} bytes exceeds the {MAX_OPTION_REPLY} byte cap"),
        });
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await.map_err(io_fail)?;
    Ok(OptionReply { kind, data })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn refused(option: &'static str, code: u32, message: String) -> NbdError {
    NbdError::OptionRefused {
        option,
        reply: rep_error_name(code),
        message,
    }
}

fn io_fail(e: std::io::Error) -> NbdError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        NbdError::Handshake {
            reason: "server closed the connection during the handshake".into(),
        }
    } else {
        NbdError::Io {
            during: "handshake",
            source: std::sync::Arc::new(e),
        }
    }
}
