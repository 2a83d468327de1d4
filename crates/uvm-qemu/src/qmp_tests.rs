//! QMP parsing against lines recorded from QEMU 10.0.2, and the client against a scripted server.

use super::*;
use tokio::io::AsyncWriteExt;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;
const RETURN_EMPTY: &str = r#"{"return": {}, "id": 1}"#;
const RETURN_BALLOON: &str = r#"{"return": {"actual": 268435456}, "id": 2}"#;
const ERROR_NOT_FOUND: &str = r#"{"id": 6, "error": {"class": "CommandNotFound", "desc": "The command nonexist has not been found"}}"#;
const SHUTDOWN_QUIT: &str = r#"{"timestamp": {"seconds": 1795960611, "microseconds": 130520}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#;
const SHUTDOWN_GUEST: &str = r#"{"timestamp": {"seconds": 1795960611, "microseconds": 1}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;

#[test]
fn parses_the_greeting() {
    let msg = QmpMessage::parse(GREETING.as_bytes()).expect("valid greeting");
    let QmpMessage::Greeting(g) = msg else {
        panic!("not a greeting: {msg:?}");
    };
    assert_eq!(
        g.version,
        QemuVersion {
            major: 10,
            minor: 0,
            micro: 2
        }
    );
    assert_eq!(g.package, "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1");
    assert_eq!(g.capabilities, ["oob"]);
}

#[test]
fn parses_returns_with_their_ids() {
    assert_eq!(
        QmpMessage::parse(RETURN_EMPTY.as_bytes()).expect("valid"),
        QmpMessage::Return {
            id: Some(1.into()),
            value: serde_json::json!({})
        }
    );
    let QmpMessage::Return { id, value } =
        QmpMessage::parse(RETURN_BALLOON.as_bytes()).expect("valid")
    else {
        panic!("not a return");
    };
    assert_eq!(id, Some(2.into()));
    let info: BalloonInfo = serde_json::from_value(value).expect("balloon info");
    assert_eq!(info.actual, 256 << 20);
}

#[test]
fn parses_errors() {
    assert_eq!(
        QmpMessage::parse(ERROR_NOT_FOUND.as_bytes()).expect("valid"),
        QmpMessage::Error {
            id: Some(6.into()),
            class: "CommandNotFound".to_owned(),
            desc: "The command nonexist has not been found".to_owned()
        }
    );
}

#[test]
fn parses_shutdown_events_with_their_reason() {
    let QmpMessage::Event(ev) = QmpMessage::parse(SHUTDOWN_QUIT.as_bytes()).expect("valid") else {
        panic!("not an event");
    };
    assert_eq!(ev.name, "SHUTDOWN");
    assert_eq!(
        ev.shutdown(),
        Some(ShutdownEvent {
            guest: false,
            reason: "host-qmp-quit".to_owned()
        })
    );
    let QmpMessage::Event(ev) = QmpMessage::parse(SHUTDOWN_GUEST.as_bytes()).expect("valid") else {
        panic!("not an event");
    };
    assert_eq!(
        ev.shutdown().map(|s| s.reason),
        Some("guest-shutdown".into())
    );
}

#[test]
fn other_events_are_not_shutdowns() {
    let line = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BALLOON_CHANGE", "data": {"actual": 1}}"#;
    let QmpMessage::Event(ev) = QmpMessage::parse(line.as_bytes()).expect("valid") else {
        panic!("not an event");
    };
    assert_eq!(ev.shutdown(), None);
    // A newer cause this code has never heard of still comes through as text.
    let line = r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-new-cause"}}"#;
    let QmpMessage::Event(ev) = QmpMessage::parse(line.as_bytes()).expect("valid") else {
        panic!("not an event");
    };
    assert_eq!(
        ev.shutdown().map(|s| s.reason),
        Some("guest-new-cause".into())
    );
}

#[test]
fn rejects_garbage() {
    assert!(matches!(
        QmpMessage::parse(b"not json"),
        Err(QmpError::Protocol { .. })
    ));
    assert!(matches!(
        QmpMessage::parse(br#"{"something": 1}"#),
        Err(QmpError::Protocol { .. })
    ));
}

#[test]
fn requests_carry_name_id_and_only_non_empty_arguments() {
    let quit = request_line(&Quit {}, 7).expect("encodes");
    let v: Value = serde_json::from_slice(&quit).expect("json");
    assert_eq!(v, serde_json::json!({"execute": "quit", "id": 7}));
    assert_eq!(quit.last(), Some(&b'\n'));
    let balloon = request_line(&Balloon { value: 128 << 20 }, 8).expect("encodes");
    let v: Value = serde_json::from_slice(&balloon).expect("json");
    assert_eq!(
        v,
        serde_json::json!({"execute": "balloon", "id": 8, "arguments": {"value": 134217728}})
    );
}

#[derive(Default)]
struct Events(Mutex<Vec<QmpEvent>>);
impl QmpObserver for Events {
    fn event(&self, event: &QmpEvent) {
        self.0.lock().expect("not poisoned").push(event.clone());
    }
}

/// A server that sends the greeting, then answers each request line from `script` (a function of
/// the request's command name and id), then closes.
async fn serve(server: UnixStream, script: fn(&str, u64) -> Vec<String>) {
    let (read, mut write) = server.into_split();
    write
        .write_all(format!("{GREETING}\n").as_bytes())
        .await
        .expect("write greeting");
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let req: Value = serde_json::from_str(&line).expect("client sends JSON");
        let name = req["execute"].as_str().expect("execute").to_owned();
        let id = req["id"].as_u64().expect("numeric id");
        for reply in script(&name, id) {
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .expect("write reply");
        }
        if name == "quit" {
            return;
        }
    }
}

#[tokio::test]
async fn client_negotiates_runs_commands_and_sees_shutdown() {
    let (client_end, server_end) = UnixStream::pair().expect("socketpair");
    let server = tokio::spawn(serve(server_end, |name, id| match name {
        "qmp_capabilities" => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
        "query-balloon" => vec![format!(r#"{{"return": {{"actual": 42}}, "id": {id}}}"#)],
        "balloon" => vec![format!(
            r#"{{"id": {id}, "error": {{"class": "DeviceNotActive", "desc": "No balloon device has been activated"}}}}"#
        )],
        // QEMU sends SHUTDOWN before the reply to quit.
        "quit" => vec![
            SHUTDOWN_QUIT.to_owned(),
            format!(r#"{{"return": {{}}, "id": {id}}}"#),
        ],
        _ => vec![],
    }));
    let events = Arc::new(Events::default());
    let (guard_tx, guard_rx) = oneshot::channel::<()>();
    let client = QmpClient::connect(client_end, events.clone(), guard_tx)
        .await
        .expect("handshake");
    assert_eq!(client.greeting().version.major, 10);
    let info = client.execute(&QueryBalloon {}).await.expect("query");
    assert_eq!(info.actual, 42);
    let err = client
        .execute(&Balloon { value: 1 })
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, QmpError::Command { command: "balloon", class, .. } if class == "DeviceNotActive"),
        "{err:?}"
    );
    client.execute(&Quit {}).await.expect("quit");
    server.await.expect("server ran");
    // The server closed: the reader ends, drops its guard and refuses further commands.
    assert!(
        guard_rx.await.is_err(),
        "guard dropped when the reader ended"
    );
    assert!(client.is_closed());
    assert!(matches!(
        client.execute(&QueryBalloon {}).await,
        Err(QmpError::Closed)
    ));
    let seen = events.0.lock().expect("not poisoned").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].shutdown().map(|s| s.reason),
        Some("host-qmp-quit".into())
    );
}

#[tokio::test]
async fn a_command_pending_when_the_server_dies_fails_closed() {
    let (client_end, server_end) = UnixStream::pair().expect("socketpair");
    // Negotiates, then never answers anything and closes on the next request.
    let server = tokio::spawn(serve(server_end, |name, id| match name {
        "qmp_capabilities" => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
        _ => vec![],
    }));
    let client = QmpClient::connect(client_end, Arc::new(Events::default()), ())
        .await
        .expect("handshake");
    let pending = client.execute(&QueryBalloon {});
    let (result, ()) = tokio::join!(pending, async {
        tokio::task::yield_now().await;
        server.abort();
    });
    assert!(matches!(result, Err(QmpError::Closed)), "{result:?}");
}

#[tokio::test]
async fn a_server_that_does_not_greet_is_a_protocol_error() {
    let (client_end, mut server_end) = UnixStream::pair().expect("socketpair");
    server_end
        .write_all(RETURN_EMPTY.as_bytes())
        .await
        .expect("write");
    server_end.write_all(b"\n").await.expect("write");
    let r = QmpClient::connect(client_end, Arc::new(Events::default()), ()).await;
    assert!(matches!(r, Err(QmpError::Protocol { .. })), "{r:?}");
    drop(server_end);
}

#[tokio::test]
async fn an_overlong_line_is_a_protocol_error() {
    let (client_end, mut server_end) = UnixStream::pair().expect("socketpair");
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..(MAX_LINE / chunk.len() + 2) {
            if server_end.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let r = QmpClient::connect(client_end, Arc::new(Events::default()), ()).await;
    assert!(matches!(r, Err(QmpError::Protocol { .. })), "{r:?}");
    writer.abort();
}
