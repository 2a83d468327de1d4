//! The long operations: `start_vm`, `terminate_vm`, `wait`, and the background exit waiter.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::controller::{lock, with_deadline, CleanupOwner, Controller, Inner};
use crate::error::{error_chain, ControllerError, HostError, SeamError};
use crate::machine::{Admit, Outcome};
use crate::seams::HostVm;
use crate::state::{Operation, Reason, StartStep, State, VmExit};

/// Why the start steps stopped early.
enum StartAbort {
    Cancelled,
    Failed { step: StartStep, source: SeamError },
}

impl Controller {
    /// Boot the VM and connect its guest: Created → Running. A no-op on Running.
    ///
    /// Steps, in order: prepare the guest listener (before the VM exists, so the guest's
    /// announcement cannot be missed) → start the VM → start the exit waiter → connect the guest
    /// (bounded by [`crate::Timeouts::guest_connect`], and cut short if the VM exits) → apply the
    /// security policy when one is configured → mount the disks and shares given at create. Any failure leaves the VM **Invalid** and names the
    /// step; `terminate_vm` then cleans up. A `terminate_vm` during the start cancels it: this call
    /// returns [`ControllerError::StartCancelled`] and the terminate ends the VM.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "start_vm"))]
    pub async fn start_vm(&self) -> Result<(), ControllerError> {
        let _op = self.inner.op_lock.lock().await;
        let (token, vm) = {
            let mut core = self.core();
            if self.admit(&core, Operation::Start)? == Admit::NoOp {
                return Ok(());
            }
            let Some(vm) = core.vm.clone() else {
                return Err(self.wrong_state(Operation::Start, core.machine.state()));
            };
            let token = CancellationToken::new();
            core.start_cancel = Some(token.clone());
            (token, vm)
        };
        let result = tokio::select! {
            biased;
            () = token.cancelled() => Err(StartAbort::Cancelled),
            r = self.start_steps(&vm) => r,
        };
        let mut core = self.core();
        core.start_cancel = None;
        match result {
            Ok(()) if !token.is_cancelled() => {
                core.started_at = Some(SystemTime::now());
                core.machine.commit(Operation::Start, Outcome::Succeeded);
                Ok(())
            }
            // Cancelled: the state stays Created and the cancelling terminate_vm finishes the job.
            Ok(()) | Err(StartAbort::Cancelled) => Err(ControllerError::StartCancelled {
                id: self.inner.id.clone(),
            }),
            Err(StartAbort::Failed { step, source }) => {
                tracing::warn!(%step, error = %source, "start failed; VM is Invalid");
                core.machine.commit(
                    Operation::Start,
                    Outcome::Failed(Reason::StartFailed {
                        step,
                        message: error_chain(&source),
                    }),
                );
                Err(ControllerError::StartFailed {
                    id: self.inner.id.clone(),
                    step,
                    source,
                })
            }
        }
    }

    async fn start_steps(&self, vm: &Arc<dyn HostVm>) -> Result<(), StartAbort> {
        let inner = &self.inner;
        let t = inner.timeouts;
        let failed = |step: StartStep| move |e: SeamError| StartAbort::Failed { step, source: e };

        let endpoint = vm.guest_endpoint();
        with_deadline(
            "prepare guest listener",
            t.guest_call,
            inner.guest.prepare_connection(&endpoint),
        )
        .await
        .map_err(|e| failed(StartStep::PrepareGuestListener)(e.into()))?;

        // From here a VM process may exist, even if start reports an error.
        self.core().vm_started = true;
        match tokio::time::timeout(t.vm_start, vm.start()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(failed(StartStep::StartVm)(e.into())),
            Err(_) => {
                let e = HostError::Timeout {
                    operation: "start VM",
                    after: t.vm_start,
                };
                return Err(failed(StartStep::StartVm)(e.into()));
            }
        }
        self.spawn_waiter(vm.clone());

        let mut exited = inner.exited.subscribe();
        let connect = with_deadline("connect guest", t.guest_connect, inner.guest.connect());
        tokio::select! {
            r = connect => {
                let info = r.map_err(|e| failed(StartStep::ConnectGuest)(e.into()))?;
                tracing::info!(agent = %info.agent_version, caps = ?info.capabilities.names, "guest connected");
                self.core().guest_info = Some(info);
            }
            _ = exited.wait_for(|e| *e) => {
                return Err(failed(StartStep::ConnectGuest)(HostError::Gone.into()));
            }
        }

        let policy = self
            .core()
            .config
            .as_ref()
            .and_then(|c| c.security_policy.clone());
        if let Some(policy) = policy {
            with_deadline(
                "apply security policy",
                t.guest_call,
                inner.guest.set_security_policy(&policy),
            )
            .await
            .map_err(|e| failed(StartStep::ApplySecurityPolicy)(e.into()))?;
        }

        let devices = self.core().devices.clone();
        if let Some(devices) = devices {
            devices
                .mount_cold(&**vm, &*inner.guest)
                .await
                .map_err(|e| failed(StartStep::MountDevices)(e.into_seam()))?;
        }
        Ok(())
    }

    /// Starts the background task that notices the VM ending by itself.
    fn spawn_waiter(&self, vm: Arc<dyn HostVm>) {
        let weak = Arc::downgrade(&self.inner);
        let stop = self.inner.waiter_stop.clone();
        let handle = tokio::spawn(async move {
            tokio::select! {
                exit = vm.wait() => on_vm_exit(weak, exit).await,
                // The last controller handle is gone: drop our hold on the VM so the backend's
                // own drop can reap it.
                () = stop.cancelled() => {}
            }
        });
        self.core().waiter = Some(handle);
    }

    /// End the VM and release everything it holds: → Terminated. A no-op on NotCreated and
    /// Terminated. Cancels an in-flight `start_vm` first.
    ///
    /// The chain is ordered **tear devices down → terminate VM → close guest connection →
    /// release VM**. The device teardown cancels in-flight device operations, then unmounts and
    /// ejects in the guest and detaches and removes on the host, every failure logged and
    /// swallowed (a VM or guest already gone is skipped). Failures of the
    /// first two are logged and the chain goes on; a failure of the release leaves the VM
    /// **Invalid** ([`ControllerError::ReleaseFailed`]) and a later call retries the whole chain.
    /// A VM that was never started skips the terminate step.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "terminate_vm"))]
    pub async fn terminate_vm(&self) -> Result<(), ControllerError> {
        let cancelled_start = {
            let core = self.core();
            if matches!(core.machine.admit(Operation::Terminate), Ok(Admit::Run)) {
                core.device_cancel.cancel();
            }
            match &core.start_cancel {
                Some(token) => {
                    token.cancel();
                    true
                }
                None => false,
            }
        };
        let _op = self.inner.op_lock.lock().await;
        // Claim the cleanup under the state lock. The waiter may own it (the VM ended by itself and
        // is being released): let it finish, then decide again from the state it left.
        let (vm, vm_started, waiter, from) = loop {
            let mut exited = self.inner.exited.subscribe();
            {
                let mut core = self.core();
                if core.cleanup != Some(CleanupOwner::Waiter) {
                    if self.admit(&core, Operation::Terminate)? == Admit::NoOp {
                        return Ok(());
                    }
                    core.cleanup = Some(CleanupOwner::Terminate);
                    break (
                        core.vm.clone(),
                        core.vm_started,
                        core.waiter.take(),
                        core.machine.state(),
                    );
                }
            }
            // The sender lives in `inner`: this cannot see a closed channel.
            let _ = exited.wait_for(|e| *e).await;
        };
        let t = self.inner.timeouts;

        self.teardown_devices(vm.as_ref(), vm_started).await;
        if let (Some(vm), true) = (&vm, vm_started) {
            match tokio::time::timeout(t.vm_terminate, vm.terminate()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), "terminating the VM failed; releasing anyway")
                }
                Err(_) => {
                    tracing::warn!(after = ?t.vm_terminate, "terminating the VM timed out; releasing anyway")
                }
            }
        }
        if let Err(source) = close_and_release(&self.inner, vm.as_deref()).await {
            let mut core = self.core();
            core.cleanup = None;
            core.waiter = waiter;
            core.machine.commit(
                Operation::Terminate,
                Outcome::Failed(Reason::ReleaseFailed {
                    message: error_chain(&source),
                }),
            );
            return Err(ControllerError::ReleaseFailed {
                id: self.inner.id.clone(),
                source,
            });
        }
        // The VM process is gone; let the waiter record how it ended before we commit.
        if let Some(waiter) = waiter {
            if tokio::time::timeout(t.release, waiter).await.is_err() {
                tracing::warn!("the exit waiter did not finish after release");
            }
        }
        let mut core = self.core();
        core.cleanup = None;
        let reason = if cancelled_start && from == State::Created {
            Reason::StartCancelled
        } else {
            Reason::TerminateRequested
        };
        let ending = core.ending(reason);
        core.machine
            .commit(Operation::Terminate, Outcome::Ended(ending));
        drop(core);
        self.inner.exited.send_replace(true);
        Ok(())
    }

    /// Wait until the VM has ended **and** the guest's log has been forwarded. Refused on
    /// NotCreated. Returns [`ControllerError::Cancelled`] when `cancel` fires first.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "wait"))]
    pub async fn wait(&self, cancel: &CancellationToken) -> Result<(), ControllerError> {
        self.admit(&self.core(), Operation::Wait)?;
        let mut exited = self.inner.exited.subscribe();
        let guest = self.inner.guest.clone();
        let done = async move {
            // The sender lives in `inner`, which `self` keeps alive: this cannot see a closed channel.
            let _ = exited.wait_for(|e| *e).await;
            guest.log_drained().await;
        };
        tokio::select! {
            () = cancel.cancelled() => Err(ControllerError::Cancelled {
                id: self.inner.id.clone(),
                operation: Operation::Wait,
            }),
            () = done => Ok(()),
        }
    }
}

/// The VM process ended. When it ended by itself while Running, the waiter owns the cleanup:
/// collapse the guest connection (releasing anything waiting on the guest) and release the VM, then
/// Running → Terminated (or Invalid if the release fails) — so Terminated always means released.
/// During a start or a terminate it only records the exit: those operations finish the job.
async fn on_vm_exit(weak: Weak<Inner>, exit: VmExit) {
    let Some(inner) = weak.upgrade() else {
        return;
    };
    let vm = {
        let mut core = lock(&inner.core);
        let state = core.machine.state();
        tracing::info!(vm = %inner.id, %exit, %state, "VM process ended");
        core.exit = Some(exit.clone());
        core.stopped_at.get_or_insert_with(SystemTime::now);
        // Only the table decides whether the exit is ours to clean up; a terminate already
        // running the chain owns it even then.
        match (core.machine.admit(Operation::VmExited), core.cleanup) {
            (Ok(Admit::Run), None) => {
                core.cleanup = Some(CleanupOwner::Waiter);
                core.device_cancel.cancel();
                core.vm.clone()
            }
            (Ok(Admit::Run), Some(_)) | (Ok(Admit::NoOp), _) | (Err(_), _) => None,
        }
    };
    if let Some(vm) = vm {
        let released = close_and_release(&inner, Some(&*vm)).await;
        // The VM is gone and released: its devices went with it. Forget them through their
        // tables, with neither side reachable.
        let devices = lock(&inner.core).devices.clone();
        if let Some(devices) = devices {
            let _dev = inner.device_lock.lock().await;
            let gone = crate::devices::Reach {
                guest: false,
                host: false,
            };
            devices.teardown(&*vm, &*inner.guest, gone).await;
        }
        let mut core = lock(&inner.core);
        core.cleanup = None;
        let outcome = match released {
            Ok(()) => Outcome::Ended(core.ending(Reason::Exited(exit))),
            Err(e) => Outcome::Failed(Reason::ReleaseFailed {
                message: error_chain(&e),
            }),
        };
        core.machine.commit(Operation::VmExited, outcome);
    }
    inner.exited.send_replace(true);
}

/// The tail of the cleanup chain: close the guest connection (failure logged and swallowed), then
/// release the VM (failure returned).
async fn close_and_release(inner: &Inner, vm: Option<&dyn HostVm>) -> Result<(), HostError> {
    let t = inner.timeouts;
    if let Err(e) = with_deadline(
        "close guest connection",
        t.guest_call,
        inner.guest.close_connection(),
    )
    .await
    {
        tracing::warn!(vm = %inner.id, error = %error_chain(&e), "closing the guest connection failed; releasing anyway");
    }
    let Some(vm) = vm else {
        return Ok(());
    };
    match tokio::time::timeout(t.release, vm.release()).await {
        Ok(r) => r,
        Err(_) => Err(HostError::Timeout {
            operation: "release VM",
            after: t.release,
        }),
    }
}
