//! End to end over a real unix socket in a temporary directory: the generated server (with a
//! trivial implementation of a few calls) served by `uvm_api::serve`, reached by
//! `uvm_api::connect`. Proves the transport, the codegen, the bidirectional Exec stream, statuses
//! with their metadata, the `uvm-vm-id` check, and the message-size limit (an oversized message
//! fails its own call and the server keeps serving).

use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use uvm::{ControllerError, Operation, State};
use uvm_api::v1::vm_service_client::VmServiceClient;
use uvm_api::v1::vm_service_server::VmService;
use uvm_api::v1::{self, exec_request, exec_response};
use uvm_api::{controller_status, MAX_MESSAGE_BYTES, STATE_METADATA, VM_ID_METADATA};

const VM_ID: &str = "0123456789abcdef";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A VM that is Running and answers a few calls; everything else is UNIMPLEMENTED.
#[derive(Debug)]
struct TestVm;

fn unimplemented<T>(call: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{call} is not in the test VM"
    )))
}

/// Exec's test process: echoes stdin to stdout, writes its args to stderr, and exits with the
/// number of stdin frames it got once stdin is closed (or the client half-closed).
async fn echo_process(
    mut inbound: Streaming<v1::ExecRequest>,
    out: mpsc::Sender<Result<v1::ExecResponse, Status>>,
) {
    let frame = |f| Ok(v1::ExecResponse { frame: Some(f) });
    let spec = match inbound.next().await {
        Some(Ok(v1::ExecRequest {
            frame: Some(exec_request::Frame::Spec(spec)),
        })) => spec,
        Some(Err(status)) => {
            let _ = out.send(Err(status)).await;
            return;
        }
        _ => {
            let _ = out
                .send(Err(uvm_api::ApiError::InvalidRequest {
                    what: "exec stream",
                    message: "the first message must be a spec".into(),
                }
                .into()))
                .await;
            return;
        }
    };
    let _ = out
        .send(frame(exec_response::Frame::Started(v1::ExecStarted {
            exec_id: 1,
            pid: 42,
        })))
        .await;
    let _ = out
        .send(frame(exec_response::Frame::Stderr(
            spec.args.join(" ").into_bytes(),
        )))
        .await;
    let mut frames = 0;
    while let Some(message) = inbound.next().await {
        match message {
            Ok(v1::ExecRequest {
                frame: Some(exec_request::Frame::Stdin(data)),
            }) => {
                frames += 1;
                let _ = out.send(frame(exec_response::Frame::Stdout(data))).await;
            }
            Ok(v1::ExecRequest {
                frame: Some(exec_request::Frame::CloseStdin(_)),
            }) => break,
            Ok(_) => {}
            Err(status) => {
                let _ = out.send(Err(status)).await;
                return;
            }
        }
    }
    let _ = out
        .send(frame(exec_response::Frame::Exited(v1::ExecExited {
            exit_code: frames,
            signal: 0,
        })))
        .await;
}

#[tonic::async_trait]
impl VmService for TestVm {
    async fn start(
        &self,
        _: Request<v1::StartRequest>,
    ) -> Result<Response<v1::StartResponse>, Status> {
        unimplemented("Start")
    }

    async fn terminate(
        &self,
        _: Request<v1::TerminateRequest>,
    ) -> Result<Response<v1::TerminateResponse>, Status> {
        unimplemented("Terminate")
    }

    async fn wait(
        &self,
        _: Request<v1::WaitRequest>,
    ) -> Result<Response<v1::WaitResponse>, Status> {
        unimplemented("Wait")
    }

    async fn inspect(
        &self,
        _: Request<v1::InspectRequest>,
    ) -> Result<Response<v1::InspectResponse>, Status> {
        let mut status = v1::VmStatus::default();
        status.set_state(v1::State::Running);
        status.set_link(v1::LinkHealth::Connected);
        Ok(Response::new(v1::InspectResponse {
            id: VM_ID.into(),
            name: "test".into(),
            status: Some(status),
            ..Default::default()
        }))
    }

    type ExecStream = BoxStream<v1::ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<v1::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(echo_process(request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        // As a supervisor answers a refusal of its controller.
        Err(controller_status(&ControllerError::WrongState {
            id: VM_ID.into(),
            operation: Operation::Stats,
            state: State::Terminated,
        }))
    }

    async fn dump_stacks(
        &self,
        _: Request<v1::DumpStacksRequest>,
    ) -> Result<Response<v1::DumpStacksResponse>, Status> {
        unimplemented("DumpStacks")
    }

    async fn update_memory(
        &self,
        _: Request<v1::UpdateMemoryRequest>,
    ) -> Result<Response<v1::UpdateMemoryResponse>, Status> {
        unimplemented("UpdateMemory")
    }

    async fn update_cpus(
        &self,
        _: Request<v1::UpdateCpusRequest>,
    ) -> Result<Response<v1::UpdateCpusResponse>, Status> {
        unimplemented("UpdateCpus")
    }

    async fn update_cpu_limits(
        &self,
        _: Request<v1::UpdateCpuLimitsRequest>,
    ) -> Result<Response<v1::UpdateCpuLimitsResponse>, Status> {
        unimplemented("UpdateCpuLimits")
    }

    async fn update_cpu_group(
        &self,
        _: Request<v1::UpdateCpuGroupRequest>,
    ) -> Result<Response<v1::UpdateCpuGroupResponse>, Status> {
        unimplemented("UpdateCpuGroup")
    }

    async fn update_policy_fragment(
        &self,
        request: Request<v1::UpdatePolicyFragmentRequest>,
    ) -> Result<Response<v1::UpdatePolicyFragmentResponse>, Status> {
        if request.get_ref().fragment.is_empty() {
            return Err(Status::invalid_argument("empty fragment"));
        }
        Ok(Response::new(v1::UpdatePolicyFragmentResponse {}))
    }

    async fn copy_in(
        &self,
        _: Request<Streaming<v1::CopyInRequest>>,
    ) -> Result<Response<v1::CopyInResponse>, Status> {
        unimplemented("CopyIn")
    }

    type CopyOutStream = BoxStream<v1::CopyOutResponse>;

    async fn copy_out(
        &self,
        _: Request<v1::CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        unimplemented("CopyOut")
    }

    type LogsStream = BoxStream<v1::LogsResponse>;

    async fn logs(
        &self,
        _: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        unimplemented("Logs")
    }

    type EventsStream = BoxStream<v1::EventsResponse>;

    async fn events(
        &self,
        _: Request<v1::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        unimplemented("Events")
    }

    async fn add_disk(
        &self,
        _: Request<v1::AddDiskRequest>,
    ) -> Result<Response<v1::AddDiskResponse>, Status> {
        unimplemented("AddDisk")
    }

    async fn remove_disk(
        &self,
        _: Request<v1::RemoveDiskRequest>,
    ) -> Result<Response<v1::RemoveDiskResponse>, Status> {
        unimplemented("RemoveDisk")
    }

    async fn add_share(
        &self,
        _: Request<v1::AddShareRequest>,
    ) -> Result<Response<v1::AddShareResponse>, Status> {
        unimplemented("AddShare")
    }

    async fn remove_share(
        &self,
        _: Request<v1::RemoveShareRequest>,
    ) -> Result<Response<v1::RemoveShareResponse>, Status> {
        unimplemented("RemoveShare")
    }

    async fn list_devices(
        &self,
        _: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        unimplemented("ListDevices")
    }

    async fn add_nic(
        &self,
        _: Request<v1::AddNicRequest>,
    ) -> Result<Response<v1::AddNicResponse>, Status> {
        unimplemented("AddNic")
    }

    async fn remove_nic(
        &self,
        _: Request<v1::RemoveNicRequest>,
    ) -> Result<Response<v1::RemoveNicResponse>, Status> {
        unimplemented("RemoveNic")
    }

    async fn list_nics(
        &self,
        _: Request<v1::ListNicsRequest>,
    ) -> Result<Response<v1::ListNicsResponse>, Status> {
        unimplemented("ListNics")
    }

    async fn add_pci_device(
        &self,
        _: Request<v1::AddPciDeviceRequest>,
    ) -> Result<Response<v1::AddPciDeviceResponse>, Status> {
        unimplemented("AddPciDevice")
    }

    async fn remove_pci_device(
        &self,
        _: Request<v1::RemovePciDeviceRequest>,
    ) -> Result<Response<v1::RemovePciDeviceResponse>, Status> {
        unimplemented("RemovePciDevice")
    }

    async fn list_pci_devices(
        &self,
        _: Request<v1::ListPciDevicesRequest>,
    ) -> Result<Response<v1::ListPciDevicesResponse>, Status> {
        unimplemented("ListPciDevices")
    }

    async fn remove(
        &self,
        _: Request<v1::RemoveRequest>,
    ) -> Result<Response<v1::RemoveResponse>, Status> {
        unimplemented("Remove")
    }
}

/// A served test VM; stops serving when dropped.
struct Served {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Served {
    fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the server and returns how it ended.
    async fn shut_down(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await.expect("server task")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn serve_test_vm() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(uvm_api::serve(listener, TestVm, VM_ID, async move {
        let _ = stopped.await;
    }));
    Served {
        _dir: dir,
        socket,
        stop: Some(stop),
        server,
    }
}

#[tokio::test]
async fn unary_calls_reach_the_server_over_the_socket() {
    let served = serve_test_vm();
    let mut client = uvm_api::connect_client(served.socket())
        .await
        .expect("connect");

    let inspect = client
        .inspect(v1::InspectRequest {})
        .await
        .expect("inspect")
        .into_inner();
    assert_eq!(inspect.id, VM_ID);
    assert_eq!(
        inspect.status.as_ref().map(|s| s.state()),
        Some(v1::State::Running)
    );

    client
        .update_policy_fragment(v1::UpdatePolicyFragmentRequest {
            fragment: "package policy".into(),
        })
        .await
        .expect("update policy fragment");

    let unimplemented = client
        .start(v1::StartRequest {})
        .await
        .expect_err("Start is not in the test VM");
    assert_eq!(unimplemented.code(), Code::Unimplemented);

    served.shut_down().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_controller_refusal_arrives_with_its_code_message_and_state() {
    let served = serve_test_vm();
    let mut client = uvm_api::connect_client(served.socket())
        .await
        .expect("connect");
    let status = client
        .stats(v1::StatsRequest {})
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("Terminated"),
        "{}",
        status.message()
    );
    assert_eq!(
        status
            .metadata()
            .get(STATE_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some("STATE_TERMINATED")
    );
}

#[tokio::test]
async fn exec_streams_both_ways_and_several_run_at_once() {
    let served = serve_test_vm();
    let client = uvm_api::connect_client(served.socket())
        .await
        .expect("connect");

    let run = |mut client: VmServiceClient<_>, n: u8| async move {
        let (tx, rx) = mpsc::channel(8);
        let spec = v1::ExecSpec {
            args: vec!["cat".into(), format!("#{n}")],
            attach_stdin: true,
            ..Default::default()
        };
        let send = |f| v1::ExecRequest { frame: Some(f) };
        tx.send(send(exec_request::Frame::Spec(spec)))
            .await
            .expect("send spec");
        let mut responses = client
            .exec(ReceiverStream::new(rx))
            .await
            .expect("exec")
            .into_inner();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut started = None;
        let mut exited = None;
        // Interleave: send a stdin frame, read its echo, three times; then close stdin.
        for i in 0..3u8 {
            tx.send(send(exec_request::Frame::Stdin(vec![n, i])))
                .await
                .expect("send stdin");
            loop {
                let frame = responses.message().await.expect("frame").expect("open");
                match frame.frame {
                    Some(exec_response::Frame::Started(s)) => started = Some(s),
                    Some(exec_response::Frame::Stderr(b)) => stderr.extend(b),
                    Some(exec_response::Frame::Stdout(b)) => {
                        stdout.extend(b);
                        break;
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
        }
        tx.send(send(exec_request::Frame::CloseStdin(v1::CloseStdin {})))
            .await
            .expect("close stdin");
        while let Some(frame) = responses.message().await.expect("frame") {
            match frame.frame {
                Some(exec_response::Frame::Exited(e)) => exited = Some(e),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        (started, stdout, stderr, exited)
    };

    let (a, b) = tokio::join!(run(client.clone(), 1), run(client.clone(), 2));
    for (n, (started, stdout, stderr, exited)) in [(1u8, a), (2, b)] {
        assert_eq!(
            started,
            Some(v1::ExecStarted {
                exec_id: 1,
                pid: 42
            })
        );
        assert_eq!(stdout, [n, 0, n, 1, n, 2]);
        assert_eq!(String::from_utf8_lossy(&stderr), format!("cat #{n}"));
        assert_eq!(
            exited,
            Some(v1::ExecExited {
                exit_code: 3,
                signal: 0
            })
        );
    }
}

#[tokio::test]
async fn another_vm_id_is_not_found_and_the_served_one_passes() {
    let served = serve_test_vm();
    let mut client = uvm_api::connect_client(served.socket())
        .await
        .expect("connect");

    let mut wrong = Request::new(v1::InspectRequest {});
    wrong
        .metadata_mut()
        .insert(VM_ID_METADATA, "fedcba9876543210".parse().expect("ascii"));
    let status = client.inspect(wrong).await.expect_err("another VM");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(VM_ID), "{}", status.message());

    let mut right = Request::new(v1::InspectRequest {});
    right
        .metadata_mut()
        .insert(VM_ID_METADATA, VM_ID.parse().expect("ascii"));
    client.inspect(right).await.expect("the served VM");
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("api.sock");
    let err = uvm_api::connect(&missing).await.expect_err("no socket");
    assert_eq!(err.path, missing);
    assert!(err.to_string().contains("api.sock"), "{err}");
}

fn assert_too_large(status: &Status) {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large")
            && status.message().contains(&MAX_MESSAGE_BYTES.to_string()),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_server_keeps_serving() {
    let served = serve_test_vm();
    let channel = uvm_api::connect(served.socket()).await.expect("connect");
    let mut client = uvm_api::client(channel);
    let oversized = "x".repeat(MAX_MESSAGE_BYTES + 1);

    // A unary request over the limit.
    let status = client
        .update_policy_fragment(v1::UpdatePolicyFragmentRequest {
            fragment: oversized.clone(),
        })
        .await
        .expect_err("oversized");
    assert_too_large(&status);

    // A stream message over the limit fails that stream only.
    let spec = v1::ExecRequest {
        frame: Some(exec_request::Frame::Spec(v1::ExecSpec {
            args: vec!["cat".into()],
            attach_stdin: true,
            ..Default::default()
        })),
    };
    let big_stdin = v1::ExecRequest {
        frame: Some(exec_request::Frame::Stdin(oversized.clone().into_bytes())),
    };
    let mut responses = client
        .exec(tokio_stream::iter([spec, big_stdin]))
        .await
        .expect("exec starts")
        .into_inner();
    let status = loop {
        match responses.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the exec ended without refusing the oversized stdin"),
            Err(status) => break status,
        }
    };
    assert_too_large(&status);

    // The same connection and a new one are still served.
    client
        .update_policy_fragment(v1::UpdatePolicyFragmentRequest {
            fragment: "small".into(),
        })
        .await
        .expect("a small request on the same connection");
    let mut fresh = uvm_api::connect_client(served.socket())
        .await
        .expect("connect");
    fresh
        .inspect(v1::InspectRequest {})
        .await
        .expect("a new connection");
}

#[tokio::test]
async fn a_message_at_the_limit_is_accepted() {
    let served = serve_test_vm();
    let mut client = uvm_api::connect_client(served.socket())
        .await
        .expect("connect");
    // A string field costs a tag byte and a 4-byte length before its bytes.
    let fragment = "x".repeat(MAX_MESSAGE_BYTES - 5);
    client
        .update_policy_fragment(v1::UpdatePolicyFragmentRequest { fragment })
        .await
        .expect("exactly at the limit");
}
