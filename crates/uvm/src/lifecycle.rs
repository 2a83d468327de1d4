//! The long operations: `start_vm`, `terminate_vm`, `wait`, and the background exit waiter.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

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
    pub async fn start_vm(&self) -> Result<(), ControllerError> {
        self.start_vm_with_progress(&|_| {}).await
    }

    /// [`Controller::start_vm`], calling `progress` with each step as soon as it has finished
    /// (in order; a step that fails or is cancelled is not reported). A start that is a no-op
    /// reports nothing.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "start_vm"))]
    pub async fn start_vm_with_progress(
        &self,
        progress: &(dyn Fn(StartStep) + Send + Sync),
    ) -> Result<(), ControllerError> {
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
            r = self.start_steps(&vm, progress) => r,
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

    async fn start_steps(
        &self,
        vm: &Arc<dyn HostVm>,
        progress: &(dyn Fn(StartStep) + Send + Sync),
    ) -> Result<(), StartAbort> {
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
        progress(StartStep::PrepareGuestListener);

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
        progress(StartStep::StartVm);

        let mut exited = inner.exited.subscribe();
        let connect = with_deadline("connect guest", t.guest_connect, inner.guest.connect());
        tokio::select! {
            r = connect => {
                let info = r.map_err(|e| failed(StartStep::ConnectGuest)(e.into()))?;
                tracing::info!(agent = %info.agent_version, caps = ?info.capabilities.names, "guest connected");
                self.core().guest_info = Some(info);
                progress(StartStep::ConnectGuest);
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
            progress(StartStep::ApplySecurityPolicy);
        }

        let devices = self.core().devices.clone();
        if let Some(devices) = &devices {
            devices
                .configure_network(&**vm, &*inner.guest)
                .await
                .map_err(|e| failed(StartStep::ConfigureNetwork)(e.into_seam()))?;
            if devices.network.has_setup_work() {
                progress(StartStep::ConfigureNetwork);
            }
        }
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
    /// A VM that was never started skips the terminate step. The VM is stopped by force at once:
    /// [`Controller::terminate_vm_within`] gives the guest time to shut down cleanly first.
    pub async fn terminate_vm(&self) -> Result<(), ControllerError> {
        self.terminate_vm_within(Duration::ZERO).await
    }

    /// [`Controller::terminate_vm`] with a grace period: a Running VM's guest is first asked to
    /// power off ([`crate::seams::GuestPower::shutdown`]) and gets until `grace` has passed to
    /// do so; the terminate step (the backend's forced stop) runs only if the VM has not ended
    /// by then, or the guest could not be asked. A zero grace, or a VM that is not Running,
    /// goes straight to the forced stop. The rest of the chain is the same.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "terminate_vm", grace = ?grace))]
    pub async fn terminate_vm_within(&self, grace: Duration) -> Result<(), ControllerError> {
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
        let clean = match (&vm, vm_started, from) {
            (Some(vm), true, State::Running) if !grace.is_zero() => {
                self.shut_down_cleanly(vm.as_ref(), grace).await
            }
            _ => false,
        };
        if let (Some(vm), true, false) = (&vm, vm_started, clean) {
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
            // A VM process that ended has ended, even if its release failed (Invalid).
            let ended = core.exit.is_some();
            drop(core);
            if ended {
                self.inner.exited.send_replace(true);
            }
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

    /// Asks the guest to power off and waits for the VM process to end, all within `grace`;
    /// says whether it ended. A guest that cannot be asked, or does not power off in time, is
    /// logged: the caller stops the VM by force.
    async fn shut_down_cleanly(&self, vm: &dyn HostVm, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        let ask = with_deadline(
            "ask the guest to shut down",
            self.inner.timeouts.guest_call.min(grace),
            self.inner.guest.shutdown(),
        );
        match ask.await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot ask the guest to shut down; stopping the VM by force");
                return false;
            }
        }
        match tokio::time::timeout_at(deadline, vm.wait()).await {
            Ok(exit) => {
                tracing::info!(%exit, "the guest shut down within its grace period");
                true
            }
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "the guest did not shut down within its grace period; stopping the VM by force"
                );
                false
            }
        }
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
/// During a start or a terminate it only records the exit: those operations finish the job. It
/// announces the exit (`exited`, what `wait` waits for) unless a terminate runs the chain: that
/// terminate announces it once it has committed, so a `wait` never returns before the state
/// says how the VM ended.
async fn on_vm_exit(weak: Weak<Inner>, exit: VmExit) {
    let Some(inner) = weak.upgrade() else {
        return;
    };
    let (vm, terminating) = {
        let mut core = lock(&inner.core);
        let state = core.machine.state();
        tracing::info!(vm = %inner.id, %exit, %state, "VM process ended");
        core.exit = Some(exit.clone());
        core.stopped_at.get_or_insert_with(SystemTime::now);
        let terminating = core.cleanup == Some(CleanupOwner::Terminate);
        // Only the table decides whether the exit is ours to clean up; a terminate already
        // running the chain owns it even then.
        let vm = match (core.machine.admit(Operation::VmExited), core.cleanup) {
            (Ok(Admit::Run), None) => {
                core.cleanup = Some(CleanupOwner::Waiter);
                core.device_cancel.cancel();
                core.vm.clone()
            }
            (Ok(Admit::Run), Some(_)) | (Ok(Admit::NoOp), _) | (Err(_), _) => None,
        };
        (vm, terminating)
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
    if !terminating {
        inner.exited.send_replace(true);
    }
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
