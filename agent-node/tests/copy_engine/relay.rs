//! The copy engine through the WAN benchmark's delaying relay (`copy::relay`), over several
//! connections: every byte arrives, in place, as on a direct copy.

use crate::support::*;
use agent_node::copy::relay::{self, RelayOptions};
use agent_node::copy::{CopyOptions, ExtentSource};
use sendense_shared::nbd::{ConnectOptions, NbdAddr, NbdClient};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_multi_connection_copy_through_the_delaying_relay_equals_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let src_img = create(dir.path(), "src.qcow2", size);
    // Data, an all-zero written area, data again and holes between.
    qemu_io(
        &src_img,
        &[
            "write -P 0x5a 0 3M".to_string(),
            "write -z 8M 2M".to_string(),
            "write -P 0x33 20M 7M".to_string(),
            "write -P 0x77 63M 1M".to_string(),
        ],
    );
    let dst_img = create(dir.path(), "dst.qcow2", size);
    let mut src = source(dir.path(), &src_img, Listen::Tcp, &[]);
    let mut dst = target(dir.path(), &dst_img, Listen::Tcp);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    let opts = RelayOptions {
        delay: Duration::from_millis(2),
        buffer: 4 << 20,
    };
    let upstream = format!("127.0.0.1:{}", dst.port()).parse().unwrap();
    let server = tokio::spawn(relay::serve(listener, upstream, opts, shutdown.clone()));

    let via = NbdAddr::parse(&format!("nbd://127.0.0.1:{relay_port}/target")).unwrap();
    let probe = NbdClient::connect(&via, &ConnectOptions::default())
        .await
        .unwrap();
    assert!(probe.can_multi_conn(), "the target must offer multi-conn");
    probe.disconnect().await.unwrap();
    let copy_opts = CopyOptions {
        connections: 4,
        request_size: 64 * 1024,
        target_is_zero: true,
        ..Default::default()
    };
    let out = copy(&src.addr, &via, ExtentSource::Allocation, &copy_opts)
        .await
        .unwrap();
    assert_eq!(out.bytes_read, 11 * MIB, "{out:?}");
    assert_eq!(
        verify_checksums(&dst.addr, &out.checksums).await,
        out.bytes_written + out.bytes_zeroed
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
    src.stop();
    dst.stop();
    assert!(
        identical(&src_img, &dst_img),
        "the target differs from the source"
    );
}
