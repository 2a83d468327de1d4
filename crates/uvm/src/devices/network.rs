//! The network sub-controller, in the manner of hcsshim's `internal/controller/network`: a VM's
//! network and its NICs, driving [`HostNetwork`] and [`GuestNetwork`].
//!
//! The network:
//!
//! ```text
//!                 setup ok                 teardown ok
//!  NotConfigured ─────────▶ Configured ───────────────▶ TornDown (terminal)
//!        │ setup fails          │ teardown fails          ▲
//!        ▼                      ▼                         │
//!     Invalid ◀─────────────────┘ ── teardown ok ─────────┘ (teardown fails: stays Invalid)
//! ```
//!
//! **Setup** runs once, at start: the NICs the backend plugged cold (every interface of the
//! namespace given at create, the primary one first, or the user-mode NIC) are configured in
//! the guest in that order, then the resolver. **Teardown** is idempotent (a no-op from
//! NotConfigured and TornDown) and continue-on-error: every NIC is attempted even when one
//! fails; any failure leaves Invalid, and a Teardown from Invalid tries again. While Configured,
//! NICs are hot-added (every interface of another namespace, all or nothing) and removed.
//!
//! A NIC:
//!
//! ```text
//!           host add ok          guest configure ok
//!  Reserved ───────────▶ Added ─────────────────────▶ Configured
//!     │ host add fails    │ ▲ ▲ guest configure fails      │ guest deconfigure ok
//!     ▼                   │ │ └────────────────────────────┘
//!  Removed ◀── host remove ok ── Invalid ◀── host remove fails
//! ```
//!
//! A NIC whose host side was added but whose guest configuration failed is unwound on the host
//! (Added → remove); if that removal fails too it is Invalid, shown as such and cleared by a
//! (retryable) remove or the teardown. Ids are `nic<n>`, counting up from the cold ones, never
//! reused within a VM. As in the other sub-controllers, a seam call records the state it would
//! lead to as *pending* first, and teardown treats a pending NIC as if the call had happened.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{guest_call, host_call, refused, Deadlines, DeviceError, Reach, Step};
use crate::controller::lock;
use crate::seams::{DnsConfig, GuestNetwork, HostNetwork, Nic, NicBacking};

/// Where a VM's network is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkState {
    /// Not set up yet.
    NotConfigured,
    /// Set up; NICs may be added and removed.
    Configured,
    /// Setup or teardown failed; only a teardown is accepted.
    Invalid,
    /// Torn down. Terminal.
    TornDown,
}

impl NetworkState {
    /// Every state, for tables and tests.
    pub const ALL: [NetworkState; 4] = [
        NetworkState::NotConfigured,
        NetworkState::Configured,
        NetworkState::Invalid,
        NetworkState::TornDown,
    ];

    /// The state's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            NetworkState::NotConfigured => "NotConfigured",
            NetworkState::Configured => "Configured",
            NetworkState::Invalid => "Invalid",
            NetworkState::TornDown => "TornDown",
        }
    }
}

impl fmt::Display for NetworkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkEvent {
    /// Configure the cold NICs and the resolver.
    Setup,
    /// Hot-add the NICs of a namespace.
    AddNics,
    /// Remove one NIC.
    RemoveNic,
    /// Take every NIC away.
    Teardown,
}

impl NetworkEvent {
    /// Every event, for tables and tests.
    pub const ALL: [NetworkEvent; 4] = [
        NetworkEvent::Setup,
        NetworkEvent::AddNics,
        NetworkEvent::RemoveNic,
        NetworkEvent::Teardown,
    ];

    /// The event's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            NetworkEvent::Setup => "set up",
            NetworkEvent::AddNics => "add NICs to",
            NetworkEvent::RemoveNic => "remove a NIC from",
            NetworkEvent::Teardown => "tear down",
        }
    }
}

/// The work a network's table asks for (each drives NIC tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkCall {
    /// Configure the cold NICs in order, then the resolver.
    Setup,
    /// Add and configure every interface of a namespace; unwind them all on a failure.
    AddNics,
    /// Deconfigure and unplug one NIC.
    RemoveNic,
    /// Deconfigure and unplug every NIC, continuing past failures.
    Teardown,
}

/// The network table: every (state, event) pair, no wildcard.
pub const fn network_step(
    state: NetworkState,
    event: NetworkEvent,
) -> Step<NetworkState, NetworkCall> {
    use NetworkEvent as E;
    use NetworkState as S;
    match event {
        E::Setup => match state {
            S::NotConfigured => Step::Call {
                call: NetworkCall::Setup,
                on_success: S::Configured,
                on_failure: S::Invalid,
            },
            S::Configured | S::Invalid | S::TornDown => Step::Refuse,
        },
        // A failed hot-add unwinds its own NICs: the network stays as it was.
        E::AddNics => match state {
            S::Configured => Step::Call {
                call: NetworkCall::AddNics,
                on_success: S::Configured,
                on_failure: S::Configured,
            },
            S::NotConfigured | S::Invalid | S::TornDown => Step::Refuse,
        },
        // A failed removal leaves that NIC where it got; a retry resumes there.
        E::RemoveNic => match state {
            S::Configured => Step::Call {
                call: NetworkCall::RemoveNic,
                on_success: S::Configured,
                on_failure: S::Configured,
            },
            S::NotConfigured | S::Invalid | S::TornDown => Step::Refuse,
        },
        E::Teardown => match state {
            S::NotConfigured | S::TornDown => Step::Stay,
            S::Configured | S::Invalid => Step::Call {
                call: NetworkCall::Teardown,
                on_success: S::TornDown,
                on_failure: S::Invalid,
            },
        },
    }
}

/// Where a NIC is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NicState {
    /// Has an id; not plugged yet.
    Reserved,
    /// Plugged on the host; not configured in the guest (yet, or any more).
    Added,
    /// Configured in the guest: in use.
    Configured,
    /// Its host removal failed: something of it may remain. Cleared by a remove.
    Invalid,
    /// Gone from the host and the guest. Terminal.
    Removed,
}

impl NicState {
    /// Every state, for tables and tests.
    pub const ALL: [NicState; 5] = [
        NicState::Reserved,
        NicState::Added,
        NicState::Configured,
        NicState::Invalid,
        NicState::Removed,
    ];

    /// The state's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            NicState::Reserved => "Reserved",
            NicState::Added => "Added",
            NicState::Configured => "Configured",
            NicState::Invalid => "Invalid",
            NicState::Removed => "Removed",
        }
    }
}

impl fmt::Display for NicState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NicEvent {
    /// Plug it on the host.
    Add,
    /// Configure it in the guest.
    Configure,
    /// Take it away (also the unwinding of a failed add).
    Remove,
    /// The network is torn down: take it away, guest failures tolerated.
    Teardown,
}

impl NicEvent {
    /// Every event, for tables and tests.
    pub const ALL: [NicEvent; 4] = [
        NicEvent::Add,
        NicEvent::Configure,
        NicEvent::Remove,
        NicEvent::Teardown,
    ];

    /// The event's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            NicEvent::Add => "add",
            NicEvent::Configure => "configure",
            NicEvent::Remove => "remove",
            NicEvent::Teardown => "tear down",
        }
    }
}

/// The seam calls a NIC's table asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NicCall {
    /// `HostNetwork::add_nic`.
    HostAdd,
    /// `GuestNetwork::configure_interface`.
    GuestConfigure,
    /// `GuestNetwork::deconfigure_interface`.
    GuestDeconfigure,
    /// `HostNetwork::remove_nic`.
    HostRemove,
}

/// The NIC table: every (state, event) pair, no wildcard.
pub const fn nic_step(state: NicState, event: NicEvent) -> Step<NicState, NicCall> {
    use NicEvent as E;
    use NicState as S;
    match event {
        E::Add => match state {
            // A failed plug leaves nothing on the host (the seam's promise).
            S::Reserved => Step::Call {
                call: NicCall::HostAdd,
                on_success: S::Added,
                on_failure: S::Removed,
            },
            S::Added | S::Configured => Step::Stay,
            S::Invalid | S::Removed => Step::Refuse,
        },
        E::Configure => match state {
            // A failed configuration is unwound by the caller (Remove from Added).
            S::Added => Step::Call {
                call: NicCall::GuestConfigure,
                on_success: S::Configured,
                on_failure: S::Added,
            },
            S::Configured => Step::Stay,
            S::Reserved | S::Invalid | S::Removed => Step::Refuse,
        },
        E::Remove => match state {
            S::Reserved => Step::Become(S::Removed),
            S::Configured => Step::Call {
                call: NicCall::GuestDeconfigure,
                on_success: S::Added,
                on_failure: S::Configured,
            },
            S::Added | S::Invalid => Step::Call {
                call: NicCall::HostRemove,
                on_success: S::Removed,
                on_failure: S::Invalid,
            },
            S::Removed => Step::Stay,
        },
        E::Teardown => match state {
            S::Reserved => Step::Become(S::Removed),
            // The host removal follows whether or not the guest let go.
            S::Configured => Step::Call {
                call: NicCall::GuestDeconfigure,
                on_success: S::Added,
                on_failure: S::Added,
            },
            S::Added | S::Invalid => Step::Call {
                call: NicCall::HostRemove,
                on_success: S::Removed,
                on_failure: S::Invalid,
            },
            S::Removed => Step::Stay,
        },
    }
}

/// The id of the `index`-th NIC the backend plugs cold.
pub fn cold_nic_id(index: usize) -> String {
    format!("nic{index}")
}

/// A NIC as [`NetworkController::snapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    /// The NIC (id, endpoint, backing).
    pub nic: Nic,
    /// Its state.
    pub state: NicState,
    /// Plugged cold at create rather than hot-added.
    pub cold: bool,
}

/// A VM's network as [`NetworkController::snapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    /// The network's state.
    pub state: NetworkState,
    /// Its NICs, by id.
    pub nics: Vec<NicInfo>,
}

impl Default for NetworkInfo {
    fn default() -> Self {
        NetworkInfo {
            state: NetworkState::NotConfigured,
            nics: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct NicEntry {
    nic: Nic,
    state: NicState,
    pending: Option<NicState>,
    cold: bool,
}

#[derive(Debug)]
struct Books {
    state: NetworkState,
    nics: BTreeMap<String, NicEntry>,
    /// The order NICs were plugged in (the primary first).
    order: Vec<String>,
    next_id: usize,
}

/// One VM's network. Its operations are serialised by the caller (the VM's device lock);
/// [`NetworkController::snapshot`] never waits behind one.
#[derive(Debug)]
pub struct NetworkController {
    books: Mutex<Books>,
    dns: DnsConfig,
    deadlines: Deadlines,
}

impl NetworkController {
    /// A network NotConfigured with no NICs; `dns` is written at setup when not empty.
    pub fn new(dns: DnsConfig, deadlines: Deadlines) -> NetworkController {
        NetworkController {
            books: Mutex::new(Books {
                state: NetworkState::NotConfigured,
                nics: BTreeMap::new(),
                order: Vec::new(),
                next_id: 0,
            }),
            dns,
            deadlines,
        }
    }

    /// Books the NICs the backend plugged cold at create, in its order (the primary first):
    /// born Added, configured by [`NetworkController::setup`]. Hot NICs count on from them.
    pub fn add_cold(&self, cold: Vec<Nic>) {
        let mut b = lock(&self.books);
        for nic in cold {
            b.next_id += 1;
            b.order.push(nic.id.clone());
            b.nics.insert(
                nic.id.clone(),
                NicEntry {
                    nic,
                    state: NicState::Added,
                    pending: None,
                    cold: true,
                },
            );
        }
    }

    /// Whether setup has anything to do (cold NICs or a resolver to configure).
    pub fn has_setup_work(&self) -> bool {
        !lock(&self.books).order.is_empty() || !self.dns.is_empty()
    }

    /// The network's state.
    pub fn state(&self) -> NetworkState {
        lock(&self.books).state
    }

    /// Setup: configure the cold NICs in the guest, the primary first, then the resolver. Runs
    /// once; a failure leaves the network Invalid (the VM's start fails and tears it down).
    ///
    /// # Errors
    /// [`DeviceError::WrongDeviceState`] outside NotConfigured, or the failing step's error.
    pub async fn setup(
        &self,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
    ) -> Result<(), DeviceError> {
        self.run(NetworkEvent::Setup, |this| async move {
            let ids = lock(&this.books).order.clone();
            for id in ids {
                this.nic_until_done(&id, NicEvent::Configure, host, guest)
                    .await?;
            }
            if !this.dns.is_empty() {
                guest_call(
                    "configure DNS",
                    this.deadlines.guest,
                    guest.configure_dns(&this.dns),
                )
                .await
                .map_err(|source| DeviceError::Guest {
                    step: "configure DNS",
                    source,
                })?;
            }
            Ok(())
        })
        .await
    }

    /// Hot-add a NIC for every interface of the namespace at `path`, the primary first, each
    /// plugged then configured. All or nothing: on a failure every NIC of this call is unwound
    /// (one whose unwinding fails stays, Invalid). Returns the new NICs' ids.
    ///
    /// # Errors
    /// [`DeviceError::WrongDeviceState`] outside Configured; the host's refusal of the
    /// namespace (nothing changed); or the failing step's error.
    pub async fn add_nics(
        &self,
        path: &Path,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
    ) -> Result<Vec<String>, DeviceError> {
        let state = self.state();
        if let Step::Refuse = network_step(state, NetworkEvent::AddNics) {
            return Err(refused(
                "network",
                state.as_str(),
                NetworkEvent::AddNics.as_str(),
            ));
        }
        let endpoints = host_call(
            "read the namespace",
            self.deadlines.host,
            host.namespace_endpoints(path),
        )
        .await
        .map_err(|source| DeviceError::Host {
            step: "read the namespace",
            source,
        })?;
        let mut added = Vec::new();
        let result = self
            .run(NetworkEvent::AddNics, |this| async {
                for endpoint in endpoints {
                    let id = this.reserve(Nic {
                        id: String::new(),
                        endpoint,
                        backing: NicBacking::Namespace {
                            path: PathBuf::from(path),
                        },
                    });
                    added.push(id.clone());
                    this.nic_until_done(&id, NicEvent::Add, host, guest).await?;
                    this.nic_until_done(&id, NicEvent::Configure, host, guest)
                        .await?;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => Ok(added),
            Err(e) => {
                for id in added.iter().rev() {
                    if let Err(undo) = self.nic_until_done(id, NicEvent::Remove, host, guest).await
                    {
                        tracing::warn!(nic = %id, error = %crate::error_chain(&undo), "unwinding a NIC of a failed add failed; remove it to retry");
                    }
                    self.forget_if_removed(id);
                }
                Err(e)
            }
        }
    }

    /// Deconfigure the NIC `id` in the guest, then unplug it on the host. Retryable: a failure
    /// leaves it where it got.
    ///
    /// # Errors
    /// [`DeviceError::UnknownNic`], [`DeviceError::WrongDeviceState`] outside Configured, or the
    /// failing step's error.
    pub async fn remove_nic(
        &self,
        id: &str,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
    ) -> Result<(), DeviceError> {
        if !lock(&self.books).nics.contains_key(id) {
            return Err(DeviceError::UnknownNic { id: id.to_owned() });
        }
        // Refused before the guest lets go of it, where the host could not unplug it after.
        host.check_nic_hotplug()
            .map_err(|source| DeviceError::Host {
                step: "remove NIC",
                source,
            })?;
        self.run(NetworkEvent::RemoveNic, |this| async move {
            this.nic_until_done(id, NicEvent::Remove, host, guest).await
        })
        .await?;
        self.forget_if_removed(id);
        Ok(())
    }

    /// Teardown: every NIC deconfigured (when the guest answers; failures tolerated) and
    /// unplugged, continuing past failures. A no-op from NotConfigured and TornDown; any host
    /// failure leaves Invalid, from where another teardown tries again.
    ///
    /// # Errors
    /// [`DeviceError::Incomplete`] with the first failure, when any NIC could not be removed.
    pub async fn teardown(
        &self,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
        reach: &mut Reach,
    ) -> Result<(), DeviceError> {
        let mut r = *reach;
        let result = self
            .run(NetworkEvent::Teardown, |this| {
                let r = &mut r;
                async move {
                    let ids = lock(&this.books).order.clone();
                    let mut failures: Vec<DeviceError> = Vec::new();
                    for id in ids {
                        if let Err(e) = this.teardown_nic(&id, host, guest, r).await {
                            tracing::warn!(nic = %id, error = %crate::error_chain(&e), "teardown: a NIC could not be removed; going on");
                            failures.push(e);
                        }
                        this.forget_if_removed(&id);
                    }
                    let count = failures.len();
                    match failures.into_iter().next() {
                        None => Ok(()),
                        Some(first) => Err(DeviceError::Incomplete {
                            what: "network teardown",
                            failures: count,
                            first: Box::new(first),
                        }),
                    }
                }
            })
            .await;
        *reach = r;
        result
    }

    /// Forget every NIC without calls: the VM ended and took its NICs with it, and the
    /// backend's release removed what carried them.
    pub fn forget(&self) {
        let mut b = lock(&self.books);
        b.nics.clear();
        b.order.clear();
        b.state = match network_step(b.state, NetworkEvent::Teardown) {
            Step::Stay | Step::Refuse | Step::Become(_) => b.state,
            Step::Call { on_success, .. } => on_success,
        };
    }

    /// The network now. Never waits behind an operation.
    pub fn snapshot(&self) -> NetworkInfo {
        let b = lock(&self.books);
        NetworkInfo {
            state: b.state,
            nics: b
                .order
                .iter()
                .filter_map(|id| b.nics.get(id))
                .map(|n| NicInfo {
                    nic: n.nic.clone(),
                    state: n.state,
                    cold: n.cold,
                })
                .collect(),
        }
    }

    /// Runs `work` as the network table says for `event`, committing its outcome.
    async fn run<'a, F, Fut>(&'a self, event: NetworkEvent, work: F) -> Result<(), DeviceError>
    where
        F: FnOnce(&'a Self) -> Fut,
        Fut: std::future::Future<Output = Result<(), DeviceError>>,
    {
        let state = self.state();
        let (on_success, on_failure) = match network_step(state, event) {
            Step::Refuse => return Err(refused("network", state.as_str(), event.as_str())),
            Step::Stay => return Ok(()),
            Step::Become(to) => {
                lock(&self.books).state = to;
                return Ok(());
            }
            Step::Call {
                call: _,
                on_success,
                on_failure,
            } => (on_success, on_failure),
        };
        let result = work(self).await;
        lock(&self.books).state = if result.is_ok() {
            on_success
        } else {
            on_failure
        };
        result
    }

    fn reserve(&self, mut nic: Nic) -> String {
        let mut b = lock(&self.books);
        let id = cold_nic_id(b.next_id);
        b.next_id += 1;
        nic.id = id.clone();
        b.order.push(id.clone());
        b.nics.insert(
            id.clone(),
            NicEntry {
                nic,
                state: NicState::Reserved,
                pending: None,
                cold: false,
            },
        );
        id
    }

    fn forget_if_removed(&self, id: &str) {
        let mut b = lock(&self.books);
        if b.nics.get(id).is_some_and(|n| n.state == NicState::Removed) {
            b.nics.remove(id);
            b.order.retain(|o| o != id);
        }
    }

    /// Steps the NIC through `event` until its table says there is nothing more to do.
    async fn nic_until_done(
        &self,
        id: &str,
        event: NicEvent,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
    ) -> Result<(), DeviceError> {
        loop {
            // A call cut short may have happened: the way out treats it as done.
            let Some((state, nic)) = lock(&self.books).nics.get(id).map(|n| {
                let state = match event {
                    NicEvent::Remove | NicEvent::Teardown => n.pending.unwrap_or(n.state),
                    NicEvent::Add | NicEvent::Configure => n.state,
                };
                (state, n.nic.clone())
            }) else {
                return Err(DeviceError::UnknownNic { id: id.to_owned() });
            };
            let (to, result) = match nic_step(state, event) {
                Step::Refuse => return Err(refused("NIC", state.as_str(), event.as_str())),
                Step::Stay => return Ok(()),
                Step::Become(to) => (to, Ok(())),
                Step::Call {
                    call,
                    on_success,
                    on_failure,
                } => {
                    self.set_pending(id, Some(on_success));
                    match self.nic_call(call, &nic, host, guest).await {
                        Ok(()) => (on_success, Ok(())),
                        Err(e) => (on_failure, Err(e)),
                    }
                }
            };
            self.commit(id, to);
            result?;
            // Configure and Add are one step each; Remove walks to Removed.
            if matches!(event, NicEvent::Add | NicEvent::Configure) {
                return Ok(());
            }
        }
    }

    async fn teardown_nic(
        &self,
        id: &str,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
        reach: &mut Reach,
    ) -> Result<(), DeviceError> {
        loop {
            let Some((state, nic)) = lock(&self.books)
                .nics
                .get(id)
                .map(|n| (n.pending.unwrap_or(n.state), n.nic.clone()))
            else {
                return Ok(());
            };
            let to = match nic_step(state, NicEvent::Teardown) {
                Step::Refuse | Step::Stay => return Ok(()),
                Step::Become(to) => to,
                Step::Call {
                    call: call @ NicCall::GuestDeconfigure,
                    on_success,
                    on_failure,
                } => {
                    if !reach.guest {
                        on_failure
                    } else {
                        match self.nic_call(call, &nic, host, guest).await {
                            Ok(()) => on_success,
                            Err(DeviceError::Guest { step, source }) => {
                                reach.guest_failed(step, &source);
                                on_failure
                            }
                            Err(_) => on_failure,
                        }
                    }
                }
                // Asked while the VM answers; once it is found gone the VM's release removes
                // the rest (the tap, the tc filters).
                Step::Call {
                    call,
                    on_success,
                    on_failure,
                } => {
                    if !reach.host {
                        self.commit(id, on_failure);
                        return Err(DeviceError::Host {
                            step: "remove NIC",
                            source: crate::error::HostError::Gone,
                        });
                    }
                    match self.nic_call(call, &nic, host, guest).await {
                        Ok(()) => on_success,
                        Err(e) => {
                            if let DeviceError::Host { step, source } = &e {
                                reach.host_failed(step, source);
                            }
                            self.commit(id, on_failure);
                            return Err(e);
                        }
                    }
                }
            };
            self.commit(id, to);
        }
    }

    fn set_pending(&self, id: &str, pending: Option<NicState>) {
        if let Some(n) = lock(&self.books).nics.get_mut(id) {
            n.pending = pending;
        }
    }

    fn commit(&self, id: &str, to: NicState) {
        if let Some(n) = lock(&self.books).nics.get_mut(id) {
            n.state = to;
            n.pending = None;
        }
    }

    async fn nic_call(
        &self,
        call: NicCall,
        nic: &Nic,
        host: &dyn HostNetwork,
        guest: &dyn GuestNetwork,
    ) -> Result<(), DeviceError> {
        let (host_dl, guest_dl) = (self.deadlines.host, self.deadlines.guest);
        match call {
            NicCall::HostAdd => host_call("add NIC", host_dl, host.add_nic(nic))
                .await
                .map_err(|source| DeviceError::Host {
                    step: "add NIC",
                    source,
                }),
            NicCall::HostRemove => host_call("remove NIC", host_dl, host.remove_nic(&nic.id))
                .await
                .map_err(|source| DeviceError::Host {
                    step: "remove NIC",
                    source,
                }),
            NicCall::GuestConfigure => guest_call(
                "configure interface",
                guest_dl,
                guest.configure_interface(&nic.endpoint),
            )
            .await
            .map_err(|source| DeviceError::Guest {
                step: "configure interface",
                source,
            }),
            NicCall::GuestDeconfigure => guest_call(
                "deconfigure interface",
                guest_dl,
                guest.deconfigure_interface(nic.endpoint.mac),
            )
            .await
            .map_err(|source| DeviceError::Guest {
                step: "deconfigure interface",
                source,
            }),
        }
    }
}
