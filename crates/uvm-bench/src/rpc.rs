//! The exec of `true` taken apart: over a second connection of our own to the agent, each RPC
//! of the exec path (ExecProcess, ReadOutput on stdout and stderr until EOF, WaitProcess) is
//! timed on its own, next to a cheap RPC (GuestStats) that measures the bare transport round
//! trip (host → vhost-device-vsock → QEMU → guest kernel → agent and back).

use std::path::Path;
use std::time::{Duration, Instant};

use uvm_agent_proto::agent::{
    Empty, ExecRequest as WireExec, ExecResponse, OutputStream, ProcessRef, ReadOutputRequest,
};
use uvm_agent_proto::agent_ttrpc::AgentClient;
use uvm_agent_proto::ttrpc::context::Context;
use uvm_agent_proto::{hybrid_vsock, MAX_OUTPUT_CHUNK};

use super::BenchError;

/// Bound on each RPC here.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-RPC timings of `true` execs.
#[derive(Debug, Clone, Default)]
pub struct ExecBreakdown {
    /// GuestStats round trips: the transport's cost of one RPC.
    pub rpc_roundtrip: Vec<Duration>,
    /// ExecProcess: the agent spawned the process (fork + exec in the guest) and replied.
    pub exec_process: Vec<Duration>,
    /// ReadOutput on stdout and stderr, concurrently, until both reached EOF: the process's own
    /// life in the guest plus the long-poll replies.
    pub read_output: Vec<Duration>,
    /// WaitProcess: the exit status of a process that already closed its output.
    pub wait_process: Vec<Duration>,
    /// The whole sequence.
    pub total: Vec<Duration>,
    /// ExecProcess, then ReadOutput×2 and WaitProcess concurrently (what the guest link does
    /// when the agent keeps a waited-for process readable): the whole exec.
    pub pipelined: Vec<Duration>,
}

impl ExecBreakdown {
    /// Records one [`Probe::sequential`] result.
    pub fn push_sequential(&mut self, [exec, read, wait, total]: [Duration; 4]) {
        self.exec_process.push(exec);
        self.read_output.push(read);
        self.wait_process.push(wait);
        self.total.push(total);
    }
}

/// Our own API connection to the agent.
pub struct Probe {
    client: AgentClient,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe").finish_non_exhaustive()
    }
}

impl Probe {
    /// Connects to the agent through the hybrid vsock socket `uds`.
    pub async fn connect(uds: &Path) -> Result<Probe, BenchError> {
        let client = hybrid_vsock::connect_agent(uds)
            .await
            .map_err(|e| BenchError::Guest {
                message: format!("connecting to the agent: {}", uvm_util::error_chain(&e)),
            })?;
        Ok(Probe { client })
    }

    /// One GuestStats round trip.
    pub async fn roundtrip(&self) -> Result<Duration, BenchError> {
        let t = Instant::now();
        bounded(
            "GuestStats",
            self.client.guest_stats(Context::default(), &Empty::new()),
        )
        .await?;
        Ok(t.elapsed())
    }

    /// One exec of `true`, one RPC after the other: [ExecProcess, ReadOutput×2, WaitProcess,
    /// total].
    pub async fn sequential(&self) -> Result<[Duration; 4], BenchError> {
        exec_true(&self.client).await
    }

    /// One exec of `true` with the output reads and the wait in flight together.
    pub async fn pipelined(&self) -> Result<Duration, BenchError> {
        exec_true_pipelined(&self.client).await
    }
}

async fn exec_true(client: &AgentClient) -> Result<[Duration; 4], BenchError> {
    let begin = Instant::now();
    let started = start_true(client).await?;
    let exec = begin.elapsed();
    let (out, err) = tokio::join!(
        drain(client, &started.exec_id, OutputStream::STDOUT),
        drain(client, &started.exec_id, OutputStream::STDERR)
    );
    out?;
    err?;
    let read = begin.elapsed() - exec;
    let wait_req = ProcessRef {
        exec_id: started.exec_id.clone(),
        ..ProcessRef::default()
    };
    let status = bounded(
        "WaitProcess",
        client.wait_process(Context::default(), &wait_req),
    )
    .await?;
    let total = begin.elapsed();
    if status.exit_code != 0 {
        return Err(BenchError::WrongOutput {
            command: "true",
            exit_code: status.exit_code,
            bytes: 0,
        });
    }
    Ok([exec, read, total - exec - read, total])
}

async fn exec_true_pipelined(client: &AgentClient) -> Result<Duration, BenchError> {
    let begin = Instant::now();
    let started = start_true(client).await?;
    let wait_req = ProcessRef {
        exec_id: started.exec_id.clone(),
        ..ProcessRef::default()
    };
    let (out, err, status) = tokio::join!(
        drain(client, &started.exec_id, OutputStream::STDOUT),
        drain(client, &started.exec_id, OutputStream::STDERR),
        bounded(
            "WaitProcess",
            client.wait_process(Context::default(), &wait_req)
        )
    );
    out?;
    err?;
    let status = status?;
    if status.exit_code != 0 {
        return Err(BenchError::WrongOutput {
            command: "true",
            exit_code: status.exit_code,
            bytes: 0,
        });
    }
    Ok(begin.elapsed())
}

/// ExecProcess of `true`.
async fn start_true(client: &AgentClient) -> Result<ExecResponse, BenchError> {
    let wire = WireExec {
        args: vec!["true".to_owned()],
        ..WireExec::default()
    };
    bounded(
        "ExecProcess",
        client.exec_process(Context::default(), &wire),
    )
    .await
}

async fn drain(
    client: &AgentClient,
    exec_id: &str,
    stream: OutputStream,
) -> Result<(), BenchError> {
    let req = ReadOutputRequest {
        exec_id: exec_id.to_owned(),
        stream: stream.into(),
        max_bytes: MAX_OUTPUT_CHUNK,
        ..ReadOutputRequest::default()
    };
    loop {
        let chunk = bounded("ReadOutput", client.read_output(Context::default(), &req)).await?;
        if chunk.eof {
            return Ok(());
        }
    }
}

async fn bounded<T>(
    rpc: &'static str,
    fut: impl std::future::Future<Output = uvm_agent_proto::ttrpc::Result<T>>,
) -> Result<T, BenchError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BenchError::Guest {
            message: format!("{rpc}: {e}"),
        }),
        Err(_) => Err(BenchError::Timeout {
            what: rpc,
            after: RPC_TIMEOUT,
        }),
    }
}
