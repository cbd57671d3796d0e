//! The client against a fake server that misbehaves on purpose. A real server (qemu-nbd,
//! nbdkit) cannot be made to send bad magic, lying lengths or replies to unknown handles, so
//! these tests speak the server side by hand over an in-memory duplex pipe (or a loopback TCP
//! listener for the timeout). Correct behaviour against real servers is tested in
//! `shared/tests/nbd_qemu.rs`.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;
const FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES;

fn opts() -> ConnectOptions {
    ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.into()],
        ..Default::default()
    }
}

async fn send_rep(s: &mut DuplexStream, opt: u32, kind: u32, data: &[u8]) {
    let mut m = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).await.unwrap();
}

/// Reads one option request: (option, data).
async fn read_opt(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), IHAVEOPT);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

/// The server side of a correct handshake (structured replies, `base:allocation` as id 7).
async fn good_handshake(s: &mut DuplexStream) {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await.unwrap();
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await.unwrap();
    loop {
        let (opt, _) = read_opt(s).await;
        match opt {
            OPT_STRUCTURED_REPLY => send_rep(s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let mut d = 7u32.to_be_bytes().to_vec();
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                send_rep(s, opt, REP_META_CONTEXT, &d).await;
                send_rep(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&FLAGS.to_be_bytes());
                send_rep(s, opt, REP_INFO, &d).await;
                send_rep(s, opt, REP_ACK, &[]).await;
                return;
            }
            o => panic!("unexpected option {o}"),
        }
    }
}

/// Connects a client to a fake server that has done a good handshake.
async fn connected() -> (NbdClient, DuplexStream) {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 22);
    let srv = tokio::spawn(async move {
        good_handshake(&mut server_end).await;
        server_end
    });
    let c = from_duplex(client_end).await.unwrap();
    (c, srv.await.unwrap())
}

async fn from_duplex(end: DuplexStream) -> Result<NbdClient, NbdError> {
    let (rd, wr) = tokio::io::split(end);
    NbdClient::from_halves(rd, wr, "e", &opts()).await
}

struct Req {
    cmd: u16,
    handle: u64,
    offset: u64,
    length: u32,
}

async fn read_req(s: &mut DuplexStream) -> Req {
    let mut h = [0u8; REQUEST_LEN];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(h[0..4].try_into().unwrap()),
        REQUEST_MAGIC
    );
    let r = Req {
        cmd: u16::from_be_bytes([h[6], h[7]]),
        handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(h[24..28].try_into().unwrap()),
    };
    if r.cmd == CMD_WRITE {
        let mut d = vec![0u8; r.length as usize];
        s.read_exact(&mut d).await.unwrap();
    }
    r
}

fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn data_chunk(done: bool, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_OFFSET_DATA,
        handle,
        &p,
    )
}

fn simple(handle: u64, error: u32) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v
}

async fn handshake_error(script: impl AsyncFnOnce(&mut DuplexStream)) -> NbdError {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let server = async move {
        script(&mut server_end).await;
        // Keep the pipe open until the client gave up, so that the error is the client's own
        // judgement and not an EOF.
        let mut sink = [0u8; 1024];
        while let Ok(n) = server_end.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let o = opts();
    let (rd, wr) = tokio::io::split(client_end);
    let client = NbdClient::from_halves(rd, wr, "e", &o);
    let (r, ()) = tokio::join!(client, server);
    r.unwrap_err()
}

#[tokio::test]
async fn handshake_refuses_bad_magic_oldstyle_and_huge_replies() {
    let e = handshake_error(async |s: &mut DuplexStream| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n").await.unwrap();
    })
    .await;
    assert!(e.to_string().contains("not an NBD server"), "{e}");

    let e = handshake_error(async |s: &mut DuplexStream| {
        let mut m = NBDMAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        m.extend_from_slice(&[0u8; 2]);
        s.write_all(&m).await.unwrap();
    })
    .await;
    assert!(e.to_string().contains("oldstyle"), "{e}");

    // An option reply announcing 4 GiB of payload: refused from the header alone.
    let e = handshake_error(async |s: &mut DuplexStream| {
        let mut m = NBDMAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        s.write_all(&m).await.unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).await.unwrap();
        let (opt, _) = read_opt(s).await;
        let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&opt.to_be_bytes());
        r.extend_from_slice(&REP_ACK.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&r).await.unwrap();
    })
    .await;
    assert!(e.to_string().contains("exceeds"), "{e}");
}

#[tokio::test]
async fn handshake_refuses_go_without_export_info_and_eof() {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let srv = tokio::spawn(async move {
        let mut m = NBDMAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        server_end.write_all(&m).await.unwrap();
        let mut cf = [0u8; 4];
        server_end.read_exact(&mut cf).await.unwrap();
        let (opt, _) = read_opt(&mut server_end).await;
        send_rep(&mut server_end, opt, REP_ACK, &[]).await;
        let (opt, _) = read_opt(&mut server_end).await; // SET_META_CONTEXT
        send_rep(&mut server_end, opt, REP_ACK, &[]).await;
        let (opt, _) = read_opt(&mut server_end).await; // GO
        send_rep(&mut server_end, opt, REP_ACK, &[]).await;
    });
    let e = from_duplex(client_end).await.unwrap_err();
    srv.await.unwrap();
    assert!(e.to_string().contains("without NBD_INFO_EXPORT"), "{e}");

    let e = handshake_error(async |s: &mut DuplexStream| {
        s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    assert!(e.to_string().contains("closed the connection"), "{e}");
}

/// A server without structured replies: no meta context, READ data in simple replies.
#[tokio::test]
async fn a_server_without_structured_replies_serves_simple_replies() {
    let (client_end, mut s) = tokio::io::duplex(1 << 20);
    let srv = tokio::spawn(async move {
        let mut m = NBDMAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        s.write_all(&m).await.unwrap();
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).await.unwrap();
        let (opt, _) = read_opt(&mut s).await;
        assert_eq!(opt, OPT_STRUCTURED_REPLY);
        send_rep(&mut s, opt, REP_ERR_UNSUP, b"").await;
        // No SET_META_CONTEXT must follow: straight to GO.
        let (opt, _) = read_opt(&mut s).await;
        assert_eq!(opt, OPT_GO);
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&SIZE.to_be_bytes());
        d.extend_from_slice(&FLAGS.to_be_bytes());
        send_rep(&mut s, opt, REP_INFO, &d).await;
        send_rep(&mut s, opt, REP_ACK, &[]).await;
        // Two reads answered in reverse order, data right after each simple reply.
        let a = read_req(&mut s).await;
        let b = read_req(&mut s).await;
        for r in [&b, &a] {
            let mut v = simple(r.handle, 0);
            v.extend(std::iter::repeat_n(r.offset as u8 + 1, r.length as usize));
            s.write_all(&v).await.unwrap();
        }
        s
    });
    let c = from_duplex(client_end).await.unwrap();
    assert!(!c.structured_replies());
    assert_eq!(c.meta_context_id(BASE_ALLOCATION), None);
    let (ra, rb) = tokio::join!(c.read(0, 100), c.read(7, 3));
    assert_eq!(ra.unwrap(), vec![1u8; 100]);
    assert_eq!(rb.unwrap(), vec![8u8; 3]);
    let e = c.block_status(BASE_ALLOCATION, 0, 512).await.unwrap_err();
    assert!(matches!(e, NbdError::NoMetaContext { .. }), "{e}");
    drop(srv);
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let addr = NbdAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
        export: "e".into(),
    };
    let o = ConnectOptions {
        connect_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let e = NbdClient::connect(&addr, &o).await.unwrap_err();
    assert!(matches!(e, NbdError::ConnectTimeout { .. }), "{e}");
    hold.abort();
}

#[tokio::test]
async fn replies_out_of_order_and_in_pieces_reach_their_requests() {
    let (c, mut s) = connected().await;
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.meta_context_id(BASE_ALLOCATION), Some(7));
    let a = tokio::spawn({
        let c = c.clone();
        async move { c.read(0, 8).await }
    });
    let r1 = read_req(&mut s).await;
    let b = tokio::spawn({
        let c = c.clone();
        async move { c.read(4096, 8).await }
    });
    let r2 = read_req(&mut s).await;
    assert_eq!((r1.cmd, r1.offset, r2.offset), (CMD_READ, 0, 4096));
    // Second request answered first; first one in two pieces: data then hole.
    s.write_all(&data_chunk(true, r2.handle, 4096, b"BBBBBBBB"))
        .await
        .unwrap();
    s.write_all(&data_chunk(false, r1.handle, 0, b"AAAA"))
        .await
        .unwrap();
    let mut hole = 4u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&4u32.to_be_bytes());
    s.write_all(&chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        r1.handle,
        &hole,
    ))
    .await
    .unwrap();
    assert_eq!(b.await.unwrap().unwrap(), &b"BBBBBBBB"[..]);
    assert_eq!(a.await.unwrap().unwrap(), &b"AAAA\0\0\0\0"[..]);

    // An error chunk fails only its own request; the connection stays usable.
    let w = tokio::spawn({
        let c = c.clone();
        async move { c.write_zeroes(0, 512, false).await }
    });
    let r = read_req(&mut s).await;
    assert_eq!(r.cmd, CMD_WRITE_ZEROES);
    let mut p = 28u32.to_be_bytes().to_vec();
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(b"full");
    s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.handle, &p))
        .await
        .unwrap();
    let e = w.await.unwrap().unwrap_err();
    assert!(
        e.to_string().contains("ENOSPC") && e.to_string().contains("full"),
        "{e}"
    );

    let f = tokio::spawn({
        let c = c.clone();
        async move { c.flush().await }
    });
    let r = read_req(&mut s).await;
    assert_eq!(r.cmd, CMD_FLUSH);
    s.write_all(&simple(r.handle, 0)).await.unwrap();
    f.await.unwrap().unwrap();
}

/// Sends one read, lets the fake server answer with `reply`, returns the read's error and the
/// error of a later request.
async fn bad_reply(reply: impl FnOnce(u64) -> Vec<u8>, close: bool) -> (NbdError, NbdError) {
    let (c, mut s) = connected().await;
    let pending: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(read_req(&mut s).await.handle);
    }
    s.write_all(&reply(handles[0])).await.unwrap();
    if close {
        drop(s);
    }
    let mut first = None;
    for p in pending {
        let e = tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .expect("a pending request hung")
            .unwrap()
            .expect_err("every pending request fails");
        first.get_or_insert(e);
    }
    let later = c.read(0, 512).await.unwrap_err();
    (first.unwrap(), later)
}

#[tokio::test]
async fn protocol_violations_fail_every_pending_request() {
    let (e, later) = bad_reply(|_| b"garbage bytes, not a reply".to_vec(), false).await;
    assert!(matches!(e, NbdError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("magic"), "{e}");
    assert!(matches!(later, NbdError::Protocol { .. }), "{later}");

    let (e, _) = bad_reply(|h| data_chunk(true, h + 1000, 0, &[1; 4096]), false).await;
    assert!(e.to_string().contains("unknown handle"), "{e}");

    // A chunk header announcing far more data than was asked for.
    let (e, _) = bad_reply(
        |h| {
            let mut v = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &[]);
            v[16..20].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
            v
        },
        false,
    )
    .await;
    assert!(e.to_string().contains("allowed"), "{e}");

    // DONE before every byte was answered.
    let (e, _) = bad_reply(|h| data_chunk(true, h, 0, &[1; 100]), false).await;
    assert!(e.to_string().contains("covered 100 of 4096"), "{e}");

    // Overlapping pieces.
    let (e, _) = bad_reply(
        |h| {
            let mut v = data_chunk(false, h, 0, &[1; 2048]);
            v.extend(data_chunk(true, h, 1024, &[1; 3072]));
            v
        },
        false,
    )
    .await;
    assert!(e.to_string().contains("overlap"), "{e}");

    // A BLOCK_STATUS chunk in reply to a READ.
    let (e, _) = bad_reply(
        |h| chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, &[0; 12]),
        false,
    )
    .await;
    assert!(
        e.to_string()
            .contains("BLOCK_STATUS chunk in reply to READ"),
        "{e}"
    );
}

#[tokio::test]
async fn a_socket_closed_mid_reply_fails_every_pending_request() {
    let (e, later) = bad_reply(
        |h| {
            let mut v = data_chunk(true, h, 0, &[1; 4096]);
            v.truncate(1000);
            v
        },
        true,
    )
    .await;
    assert!(matches!(e, NbdError::Closed { .. }), "{e}");
    assert!(e.to_string().contains("mid-reply"), "{e}");
    assert!(matches!(later, NbdError::Closed { .. }), "{later}");
}

#[tokio::test]
async fn block_status_checks_context_and_lengths() {
    let (c, mut s) = connected().await;
    let e = c
        .block_status("qemu:dirty-bitmap:x", 0, 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::NoMetaContext { .. }), "{e}");
    let q = tokio::spawn({
        let c = c.clone();
        async move { c.block_status(BASE_ALLOCATION, 0, 65536).await }
    });
    let r = read_req(&mut s).await;
    assert_eq!((r.cmd, r.length), (CMD_BLOCK_STATUS, 65536));
    let mut p = 7u32.to_be_bytes().to_vec();
    for (len, fl) in [(4096u32, 0u32), (61440, STATE_HOLE | STATE_ZERO)] {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&fl.to_be_bytes());
    }
    s.write_all(&chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        r.handle,
        &p,
    ))
    .await
    .unwrap();
    let ext = q.await.unwrap().unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                length: 4096,
                flags: 0
            },
            Extent {
                length: 61440,
                flags: 3
            }
        ]
    );

    // A zero-length extent would make a caller loop forever: refused.
    let q = tokio::spawn({
        let c = c.clone();
        async move { c.block_status(BASE_ALLOCATION, 0, 65536).await }
    });
    let r = read_req(&mut s).await;
    let mut p = 7u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[0u8; 8]);
    s.write_all(&chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        r.handle,
        &p,
    ))
    .await
    .unwrap();
    let e = q.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("length 0"), "{e}");
}

#[test]
fn addresses_parse_with_named_causes() {
    assert_eq!(
        NbdAddr::parse("nbd://127.0.0.1:10100/vm-disk-2000").unwrap(),
        NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 10100,
            export: "vm-disk-2000".into()
        }
    );
    let u = NbdAddr::parse("nbd+unix:///drive0?socket=/run/q/nbd.sock").unwrap();
    assert_eq!(
        u,
        NbdAddr::Unix {
            path: "/run/q/nbd.sock".into(),
            export: "drive0".into()
        }
    );
    assert_eq!(u.to_string(), "nbd+unix:///drive0?socket=/run/q/nbd.sock");
    for (bad, cause) in [
        ("http://h:1/e", "scheme"),
        ("nbd://h/e", "port"),
        ("nbd+unix:///e", "socket"),
        ("nbd+unix:///e?socket=", "empty socket"),
        ("nbd+unix:///e?sock=/x", "unknown query"),
    ] {
        let e = NbdAddr::parse(bad).unwrap_err().to_string();
        assert!(e.contains(cause), "{bad}: {e}");
    }
}
