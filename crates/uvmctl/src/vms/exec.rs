//! `uvmctl exec`: one process in a running VM over the API's Exec stream, with the exit codes of
//! `uvmctl run` (CMD's own; 127 not found, 126 not executable, 125 uvmctl's failure). With `-i`
//! our stdin feeds it; with `-t` it runs on a terminal, ours goes raw and its size follows ours.
//! SIGINT, SIGTERM and SIGHUP sent to us go to the process.

use std::os::fd::AsFd as _;
use std::path::Path;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::Code;
use uvm_api::v1;
use uvm_api::v1::exec_request::Frame as In;
use uvm_api::v1::exec_response::Frame as Out;

use super::Target;

/// `uvmctl exec`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  uvmctl exec web -- sh -c 'echo hi > /tmp/f'\n  echo data | uvmctl exec -i web -- cat\n  uvmctl exec -it web -- sh"
)]
pub struct ExecArgs {
    /// Feed our stdin to CMD (otherwise its stdin is empty).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run CMD on a pseudo-terminal in the guest (stderr merged into stdout).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable for CMD (repeatable); CMD otherwise gets only a default
    /// PATH.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = crate::parse_env)]
    env: Vec<String>,
    /// CMD's working directory in the guest (default /).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// Command and arguments to run in the guest.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

const STDIN_CHUNK: usize = 64 << 10;

fn send(frame: In) -> v1::ExecRequest {
    v1::ExecRequest { frame: Some(frame) }
}

/// The exit code for a refusal, as `run` gives it: 127 not found, 126 not executable, 125
/// anything else (the message says what).
fn refusal(status: &tonic::Status) -> u8 {
    eprintln!("uvmctl: {}", status.message());
    match status.code() {
        Code::NotFound => 127,
        Code::PermissionDenied => 126,
        _ => 125,
    }
}

pub async fn exec(args: ExecArgs, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let mut client = target.client().await?;
    let spec = v1::ExecSpec {
        args: args.cmd.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone().unwrap_or_default(),
        terminal: args.tty,
        terminal_size: args.tty.then(local_size).flatten(),
        attach_stdin: args.interactive,
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(send(In::Spec(spec)))
        .await
        .context("queueing the exec spec")?;
    let mut responses = match client.exec(target.request(ReceiverStream::new(rx))).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(refusal(&status)),
    };

    let _stdin = args.interactive.then(|| pump_stdin(tx.clone()));
    let _signals = forward_signals(tx.clone())?;
    let _raw = args.tty.then(enter_raw_mode).flatten();
    let _resizes = args.tty.then(|| follow_window_size(tx.clone())).flatten();

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        match responses.message().await {
            Ok(Some(v1::ExecResponse { frame: Some(frame) })) => match frame {
                Out::Started(_) => {}
                Out::Stdout(data) => {
                    stdout.write_all(&data).await?;
                    stdout.flush().await?;
                }
                Out::Stderr(data) => {
                    stderr.write_all(&data).await?;
                    stderr.flush().await?;
                }
                Out::Exited(exited) => return Ok(shell_status(&exited)),
            },
            Ok(Some(v1::ExecResponse { frame: None })) => {}
            Ok(None) => anyhow::bail!("the exec stream ended without an exit status"),
            Err(status) => return Ok(refusal(&status)),
        }
    }
}

/// Our stdin as `stdin` frames, then `close_stdin` at its end.
fn pump_stdin(tx: mpsc::Sender<v1::ExecRequest>) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut input = tokio::io::stdin();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match input.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(send(In::Stdin(buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(send(In::CloseStdin(v1::CloseStdin {}))).await;
    }))
}

/// SIGINT, SIGTERM and SIGHUP to us become `signal` frames for the process.
fn forward_signals(tx: mpsc::Sender<v1::ExecRequest>) -> anyhow::Result<AbortOnDropHandle<()>> {
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            let number = tokio::select! {
                _ = int.recv() => 2,
                _ = term.recv() => 15,
                _ = hup.recv() => 1,
            };
            if tx
                .send(send(In::Signal(v1::Signal { number })))
                .await
                .is_err()
            {
                return;
            }
        }
    })))
}

fn enter_raw_mode() -> Option<uvmctl::terminal::RawMode> {
    uvmctl::terminal::RawMode::enter(std::io::stdin().as_fd()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot put the terminal into raw mode");
        None
    })
}

fn local_size() -> Option<v1::TerminalSize> {
    uvmctl::terminal::size_of(std::io::stdout().as_fd())
        .or_else(|| uvmctl::terminal::size_of(std::io::stdin().as_fd()))
        .map(Into::into)
}

/// Our window size as `resize` frames on every SIGWINCH.
fn follow_window_size(tx: mpsc::Sender<v1::ExecRequest>) -> Option<AbortOnDropHandle<()>> {
    let mut winch = signal(SignalKind::window_change()).ok()?;
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(size) = local_size() {
                if tx.send(send(In::Resize(size))).await.is_err() {
                    return;
                }
            }
        }
    })))
}

/// Our exit status for the process's, as a shell gives it: 128 + the signal for a process a
/// signal ended, its exit code (mod 256) otherwise.
fn shell_status(exited: &v1::ExecExited) -> u8 {
    let status = match exited.signal {
        0 => exited.exit_code,
        signal => 128 + signal,
    };
    u8::try_from(status.rem_euclid(256)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signalled_process_exits_128_plus_the_signal_and_others_their_code_mod_256() {
        let status = |exit_code, signal| shell_status(&v1::ExecExited { exit_code, signal });
        assert_eq!(status(137, 9), 137);
        assert_eq!(status(0, 15), 143);
        assert_eq!(status(3, 0), 3);
        assert_eq!(status(256 + 7, 0), 7);
    }
}
