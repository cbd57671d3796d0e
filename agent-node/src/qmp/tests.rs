//! The client against a scripted QMP peer on a unix socket.

use super::*;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

/// A scripted QMP peer: greets, then for each command line answers with `script(cmd)`
/// lines; `None` closes the socket.
async fn peer(
    listener: UnixListener,
    script: impl Fn(&Value) -> Option<Vec<String>> + Send + 'static,
) {
    let (mut s, _) = listener.accept().await.unwrap();
    s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        buf.clear();
        loop {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            if byte[0] == b'\n' {
                break;
            }
            buf.push(byte[0]);
        }
        let cmd: Value = serde_json::from_slice(&buf).unwrap();
        match script(&cmd) {
            Some(lines) => {
                for l in lines {
                    s.write_all(format!("{l}\n").as_bytes()).await.unwrap();
                }
            }
            None => return,
        }
    }
}

#[tokio::test]
async fn events_between_answers_errors_and_a_closed_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(peer(listener, |cmd| {
        let id = cmd["id"].clone();
        match cmd["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![json!({"return": {}, "id": id}).to_string()]),
            "query-status" => Some(vec![
                json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j"}}).to_string(),
                json!({"return": {"status": "paused"}, "id": id}).to_string(),
            ]),
            "bad" => Some(vec![
                json!({"error": {"class": "GenericError", "desc": "no way"}, "id": id}).to_string(),
            ]),
            _ => None,
        }
    }));
    let log = Arc::new(QmpLog::new(None));
    let c = QmpClient::connect(&path, "vm", log.clone()).await.unwrap();
    let r = c.execute("query-status", json!({})).await.unwrap();
    assert_eq!(r["status"], "paused");
    assert_eq!(c.events()[0].name, "JOB_STATUS_CHANGE");
    let e = c.execute("bad", json!({"x": 1})).await.unwrap_err();
    assert!(
        matches!(&e, QmpError::Command { class, desc, .. }
        if class == "GenericError" && desc == "no way"),
        "{e}"
    );
    let e = c.execute("hangup", json!({})).await.unwrap_err();
    assert!(matches!(e, QmpError::Closed { .. }), "{e}");
    assert!(c.is_closed());
    let names: Vec<_> = log
        .entries()
        .iter()
        .map(|e| e["execute"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["qmp_capabilities", "query-status", "bad", "hangup"]);
}

#[tokio::test]
async fn garbage_instead_of_a_greeting_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"this is not json\n").await.unwrap();
    });
    let e = QmpClient::connect(&path, "vm", Arc::new(QmpLog::new(None)))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
    let e = QmpClient::connect(&dir.path().join("none"), "vm", Arc::new(QmpLog::new(None)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("none"), "{e}");
}
