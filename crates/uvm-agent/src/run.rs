//! The agent's two ways to run: as `/init` (PID 1) and as an ordinary process (development,
//! a guest with another init). Both bind the API listener first, then announce.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use uvm_agent_proto::ttrpc::r#async::transport::Listener;
use uvm_agent_proto::AGENT_VSOCK_PORT;

use crate::announce::{self, AnnounceTarget};
use crate::clock::{self, BootTimes};
use crate::power::{self, ShutdownAction};
use crate::process::{Limits, Processes, ReapMode};
use crate::service::{self, AgentService, ServiceConfig};
use crate::{error, info, logging, modules, system};

/// How long binding the vsock listener is retried (the transport may appear late).
const BIND_PATIENCE: Duration = Duration::from_secs(5);

/// Why the agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The tokio runtime could not be built.
    #[error("cannot build the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The SIGCHLD handler could not be installed.
    #[error("cannot start the reaper")]
    Reaper(#[source] std::io::Error),
    /// The API listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The ttrpc address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The ttrpc server did not start.
    #[error("cannot start the ttrpc server")]
    Serve(#[source] uvm_agent_proto::ttrpc::Error),
    /// A helper thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

/// How to run when not PID 1.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// ttrpc listen address (`vsock://-1:1024`, `unix:///path`).
    pub listen: String,
    /// Where to announce readiness, if anywhere.
    pub announce: Option<AnnounceTarget>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            listen: format!("vsock://-1:{AGENT_VSOCK_PORT}"),
            announce: Some(AnnounceTarget::default()),
        }
    }
}

/// Runs as `/init`: never returns. `started` is the `CLOCK_BOOTTIME` reading taken first thing.
pub fn as_init(options: &ServiceOptions, started: Duration) -> ! {
    logging::init();
    // A panicking task dies alone (tokio catches it); make sure its reason reaches the host.
    std::panic::set_hook(Box::new(|info| error!("panic: {info}")));
    let outcome = std::panic::catch_unwind(|| {
        system::setup();
        // After devtmpfs is mounted: /dev/console exists.
        if let Err(e) = logging::spawn_console_writer(|| {
            std::fs::OpenOptions::new().write(true).open("/dev/console")
        }) {
            error!("cannot start the console writer: {e}");
        }
        let boot = Arc::new(BootTimes::new(started));
        let t0 = clock::boottime();
        let report = modules::load_all(std::path::Path::new(modules::MODULE_DIR));
        let spent = clock::boottime().saturating_sub(t0);
        boot.modules_ns
            .store(clock::nanos(spent), Ordering::Relaxed);
        info!(
            "kernel modules: {} loaded, {} already present, {} failed ({} ms)",
            report.loaded,
            report.already_loaded,
            report.failed,
            spent.as_millis()
        );
        serve_forever(
            options,
            boot,
            ReapMode::AllChildren,
            ShutdownAction::PowerOff,
            true,
        )
    });
    match outcome {
        Ok(Err(e)) => error!("fatal: {}", uvm_util::error_chain(&e)),
        Ok(Ok(())) => error!("fatal: the agent stopped serving"),
        Err(_) => error!("fatal: the agent panicked"),
    }
    power::power_off()
}

/// Runs as an ordinary process until a fatal error (or `Shutdown`, which exits).
pub fn as_service(options: &ServiceOptions, started: Duration) -> Result<(), RunError> {
    logging::init();
    logging::spawn_console_writer(|| Ok(std::io::stderr())).map_err(RunError::Thread)?;
    if options.announce.is_none() {
        if let Some(queue) = logging::host_queue() {
            queue.disable();
        }
    }
    let boot = Arc::new(BootTimes::new(started));
    serve_forever(
        options,
        boot,
        ReapMode::TrackedOnly,
        ShutdownAction::Exit,
        false,
    )
}

fn serve_forever(
    options: &ServiceOptions,
    boot: Arc<BootTimes>,
    mode: ReapMode,
    shutdown: ShutdownAction,
    system_duties: bool,
) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    runtime.block_on(async {
        let procs = Processes::new(mode, Limits::default());
        let _reaper = procs.spawn_reaper().map_err(RunError::Reaper)?;
        let listener = bind_with_retries(&options.listen).await?;
        let service = AgentService::new(
            procs,
            boot.clone(),
            ServiceConfig {
                system_duties,
                shutdown,
            },
        );
        let _server = service::serve(listener, service)
            .await
            .map_err(RunError::Serve)?;
        info!("serving the agent API on {}", options.listen);
        if let Some(target) = options.announce {
            announce::spawn(target, boot).map_err(RunError::Thread)?;
        }
        if system_duties {
            tokio::spawn(crate::cpus::online_hot_added());
        }
        std::future::pending::<()>().await;
        Ok(())
    })
}

async fn bind_with_retries(addr: &str) -> Result<Listener, RunError> {
    let deadline = tokio::time::Instant::now() + BIND_PATIENCE;
    loop {
        match Listener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(source) if tokio::time::Instant::now() >= deadline => {
                return Err(RunError::Listen {
                    addr: addr.to_owned(),
                    source,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
