//! The client's error wording against canned hubs.
use super::*;
use crate::api::RestoreProgress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A hub that answers every request with `status` and `body`, and hands back the request
/// lines it saw.
async fn canned(
    status: &'static str,
    body: &'static str,
) -> (String, tokio::task::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&req).into_owned();
        seen.extend(text.lines().take(1).map(str::to_string));
        seen.extend(
            text.lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                .map(str::to_string),
        );
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        seen
    });
    (url, task)
}

#[tokio::test]
async fn a_refusal_carries_the_hubs_error_and_detail() {
    let (url, hub) = canned(
        "409 Conflict",
        r#"{"error":"wrong_state","detail":"restore r-1 is already completed"}"#,
    )
    .await;
    let c = HubClient::new(&url, Some("tok".into()));
    let e = c.cancel_restore("r-1").await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.is_refused());
    assert_eq!(
        e.to_string(),
        format!(
            "hub answered 409 to POST {}api/v1/restores/r-1/cancel: wrong_state: restore r-1 is already completed",
            url
        )
    );
    let seen = hub.await.unwrap();
    assert_eq!(
        seen,
        vec![
            "POST /api/v1/restores/r-1/cancel HTTP/1.1".to_string(),
            "authorization: Bearer tok".to_string()
        ]
    );
}

#[tokio::test]
async fn not_found_names_what_was_asked_for() {
    let (url, _hub) = canned(
        "404 Not Found",
        r#"{"error":"not_found","detail":"no restore r-9"}"#,
    )
    .await;
    let e = HubClient::new(&url, None).restore("r-9").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "restore r-9: not_found (404 Not Found): no restore r-9"
    );
    assert!(e.is_refused() && !e.is_unreachable());
}

#[tokio::test]
async fn a_report_taken_is_done_whatever_the_answer_body() {
    let (url, hub) = canned("202 Accepted", "").await;
    let c = HubClient::new(&url, Some("tok".into()));
    c.restore_progress(
        "r-1",
        &RestoreProgress {
            bytes_done: 1,
            bytes_total: 2,
            rate_bps: 0,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        hub.await.unwrap()[0],
        "POST /api/v1/restores/r-1/progress HTTP/1.1"
    );
}

#[tokio::test]
async fn a_closed_port_is_unreachable_not_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let e = HubClient::new(&url, None).health().await.unwrap_err();
    assert!(e.is_unreachable() && !e.is_refused() && e.status().is_none());
    assert!(crate::errors::chain(&e).starts_with(&format!("hub unreachable at {url}/health")));
}
