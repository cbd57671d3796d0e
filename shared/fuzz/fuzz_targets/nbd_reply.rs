#![no_main]
//! Feeds arbitrary bytes to the NBD reply parser, as if they came from a server with requests
//! in flight: handle `h` is in flight when `h % 5 != 4`, and then it is a READ, WRITE,
//! BLOCK_STATUS or FLUSH whose offset and length derive from `h`.

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sendense_shared::nbd::proto::{CMD_BLOCK_STATUS, CMD_FLUSH, CMD_READ, CMD_WRITE};
use sendense_shared::nbd::reply::{Chunk, Decoded, Expect, ReplyBody, decode};

fn lookup(h: u64) -> Option<Expect> {
    let command = match h % 5 {
        0 => CMD_READ,
        1 => CMD_WRITE,
        2 => CMD_BLOCK_STATUS,
        3 => CMD_FLUSH,
        _ => return None,
    };
    Some(Expect {
        command,
        offset: (h >> 8) & 0xffff_ffff,
        length: ((h >> 40) & 0xff_ffff) as u32,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 == 1;
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decode(&mut buf, structured, lookup) {
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > before, "incomplete but enough bytes");
                assert_eq!(buf.len(), before, "incomplete input was consumed");
                break;
            }
            Ok(Decoded::Reply(r)) => {
                assert!(buf.len() < before, "a reply consumed nothing");
                let expect = lookup(r.handle).expect("reply to a handle not in flight");
                match r.body {
                    ReplyBody::Simple { data: Some(d), .. } => {
                        assert_eq!(d.len(), expect.length as usize)
                    }
                    ReplyBody::Chunk {
                        chunk: Chunk::Data { offset, data },
                        ..
                    } => {
                        assert!(offset >= expect.offset);
                        assert!(offset + data.len() as u64 <= expect.offset + expect.length as u64);
                    }
                    ReplyBody::Chunk {
                        chunk: Chunk::BlockStatus { extents, .. },
                        ..
                    } => assert!(extents.iter().all(|e| e.length > 0)),
                    _ => {}
                }
            }
            Err(_) => break,
        }
    }
});
