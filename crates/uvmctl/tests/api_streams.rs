//! The supervisor's Exec stream spoken to directly over its socket (the `uvm-api` client), for
//! what the CLI never sends: malformed streams, an oversized message, a half-close. Each is
//! refused with its documented code, and the supervisor keeps serving.

mod common;

use std::time::Duration;

use common::Root;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use uvm_api::v1;
use uvm_api::v1::exec_request::Frame as In;
use uvm_api::v1::exec_response::Frame as Out;
use uvm_api::v1::vm_service_client::VmServiceClient;

fn spec(args: &[&str], attach_stdin: bool) -> v1::ExecRequest {
    v1::ExecRequest {
        frame: Some(In::Spec(v1::ExecSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            attach_stdin,
            ..v1::ExecSpec::default()
        })),
    }
}

fn frame(f: In) -> v1::ExecRequest {
    v1::ExecRequest { frame: Some(f) }
}

/// What an exec stream gave back: its frames, and the status it ended with (`None` for OK).
#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    started: bool,
    exit: Option<i32>,
    status: Option<tonic::Status>,
}

/// Sends `frames` on a new Exec stream, half-closing after them unless `keep_open`, and reads
/// the responses to the end.
async fn exec(
    client: &mut VmServiceClient<Channel>,
    frames: Vec<v1::ExecRequest>,
    keep_open: bool,
) -> Outcome {
    let (tx, rx) = mpsc::channel(frames.len().max(1));
    for f in frames {
        tx.send(f).await.expect("queue");
    }
    let _open = keep_open.then_some(tx);
    let mut out = Outcome::default();
    let call = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stream = match client.exec(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                out.status = Some(status);
                return;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(v1::ExecResponse { frame: Some(f) })) => match f {
                    Out::Started(_) => out.started = true,
                    Out::Stdout(d) => out.stdout.extend(d),
                    Out::Stderr(_) => {}
                    Out::Exited(e) => out.exit = Some(e.exit_code),
                },
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(status) => {
                    out.status = Some(status);
                    return;
                }
            }
        }
    });
    call.await.expect("the exec stream ended");
    out
}

fn code(out: &Outcome) -> Option<Code> {
    out.status.as_ref().map(tonic::Status::code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_malformed_exec_streams_are_refused_and_the_supervisor_keeps_serving() {
    common::require_prerequisites();
    let root = Root::new();
    let id = root
        .ok(&["create", "--name", "api", "--start"])
        .trim()
        .to_owned();
    let socket = root.path().join(&id).join("api.sock");
    let mut client = uvm_api::connect_client(&socket).await.expect("connect");

    // A first frame that is not a spec.
    let out = exec(&mut client, vec![frame(In::Stdin(b"x".to_vec()))], false).await;
    assert_eq!(code(&out), Some(Code::InvalidArgument), "{out:?}");
    assert!(!out.started);

    // stdin without attach_stdin; resize without a terminal; a second spec; signal 0.
    for bad in [
        frame(In::Stdin(b"x".to_vec())),
        frame(In::Resize(v1::TerminalSize { rows: 10, cols: 10 })),
        spec(&["true"], false),
        frame(In::Signal(v1::Signal { number: 0 })),
    ] {
        let what = format!("{bad:?}");
        let out = exec(
            &mut client,
            vec![spec(&["sleep", "1000"], false), bad],
            true,
        )
        .await;
        assert_eq!(code(&out), Some(Code::InvalidArgument), "{what}: {out:?}");
        assert_eq!(out.exit, None, "{what}");
    }
    // Each refused stream's `sleep` was killed with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ps = exec(&mut client, vec![spec(&["ps"], false)], false).await;
        if !String::from_utf8_lossy(&ps.stdout).contains("sleep 1000") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refused execs' processes still run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An oversized message fails its own call; the next call works.
    let big = frame(In::Stdin(vec![0u8; uvm_api::MAX_MESSAGE_BYTES + 1]));
    let out = exec(&mut client, vec![spec(&["cat"], true), big], true).await;
    assert_eq!(code(&out), Some(Code::OutOfRange), "{out:?}");
    let inspect = client
        .inspect(v1::InspectRequest {})
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(inspect.id, id);

    // Half-closing closes stdin only: the process runs on and its output keeps coming.
    let out = exec(
        &mut client,
        vec![
            spec(&["sh", "-c", "cat; sleep 0.2; echo after"], true),
            frame(In::Stdin(b"in\n".to_vec())),
        ],
        false,
    )
    .await;
    assert_eq!(
        (out.status.as_ref().map(|s| s.code()), out.exit),
        (None, Some(0)),
        "{out:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in\nafter\n");

    // A copy over the supervisor's limit is refused before any data moves.
    let (tx, rx) = mpsc::channel(1);
    tx.send(v1::CopyInRequest {
        frame: Some(v1::copy_in_request::Frame::Header(v1::CopyInHeader {
            path: "/tmp/huge".into(),
            mode: 0o644,
            size: 1 << 40,
        })),
    })
    .await
    .expect("queue");
    let err = client
        .copy_in(ReceiverStream::new(rx))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop(tx);

    // A VM id other than the served one is NOT_FOUND.
    let mut request = tonic::Request::new(v1::InspectRequest {});
    request.metadata_mut().insert(
        uvm_api::VM_ID_METADATA,
        "0000000000000000".parse().expect("ascii"),
    );
    let err = client.inspect(request).await.expect_err("another VM");
    assert_eq!(err.code(), Code::NotFound);

    drop(client);
    root.ok(&["rm", "-f", "api"]);
    root.assert_clean();
}
