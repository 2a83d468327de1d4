//! The `uvm.v1.VmService` of one VM, over its controller: each call maps to one controller
//! operation, errors through [`uvm_api::controller_status`]; every call that can change the state
//! rewrites the record afterwards.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uvm::State;
use uvm_api::convert::{disk_request, duration, grace_period, share_request, timestamp};
use uvm_api::v1::events_response::Event;
use uvm_api::v1::vm_service_server::VmService;
use uvm_api::{controller_status, v1};

use crate::supervisor::Shared;

/// The grace period of a Terminate that names none (the proto's promise).
const DEFAULT_TERMINATE_GRACE: Duration = Duration::from_secs(10);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The API of one VM.
#[derive(Debug, Clone)]
pub(crate) struct VmApi {
    pub(crate) shared: Arc<Shared>,
}

impl VmApi {
    pub(crate) fn new(shared: Arc<Shared>) -> VmApi {
        VmApi { shared }
    }

    fn status(&self) -> v1::VmStatus {
        self.shared.vm.controller.status().into()
    }

    fn inspect_response(&self) -> v1::InspectResponse {
        let s = &self.shared;
        let c = &s.vm.controller;
        let guest = c.guest_info();
        let mut config = v1::VmConfig {
            memory_mib: s.config.memory_mib,
            max_memory_mib: s.config.max_memory_mib,
            cpus: s.config.cpus,
            max_cpus: s.config.max_cpus,
            security_policy: s.vm.options.security_policy.as_ref().map(|p| p.0.clone()),
            backend_options: s.config.backend.clone().into_iter().collect(),
            disks: s.vm.options.disks.iter().map(Into::into).collect(),
            shares: s.vm.options.shares.iter().map(Into::into).collect(),
            ..v1::VmConfig::default()
        };
        uvm_api::convert::set_network(&mut config, &uvm_vm::network_config(&s.vm.options.network));
        config.backend_options.retain(|_, v| !v.is_empty());
        let boot = guest.as_ref().map(|g| {
            let mut boot = v1::BootTimings::from(g);
            boot.start_total = uvm_util::lock(&s.start_total).map(uvm_api::convert::duration);
            boot
        });
        v1::InspectResponse {
            id: s.id().to_owned(),
            name: s.name.clone(),
            status: Some(self.status()),
            config: Some(config),
            guest: guest.as_ref().map(Into::into),
            boot,
            created_at: Some(timestamp(s.created_at)),
            started_at: c.start_time().ok().flatten().map(timestamp),
            exit_status: c.exit_status().ok().map(Into::into),
            transitions: c.history().into_iter().map(Into::into).collect(),
            processes: s
                .processes()
                .into_iter()
                .map(|(name, pid)| v1::HostProcess { name, pid })
                .collect(),
            last_event_sequence: s.events.newest(),
            devices: Some((&c.devices()).into()),
            policy: s
                .vm
                .options
                .security_policy
                .as_ref()
                .map(|p| v1::PolicyStatus {
                    sha256: uvm_policy::sha256_hex(&p.0),
                    fragments: u32::try_from(c.policy_fragments().len()).unwrap_or(u32::MAX),
                }),
            resources: c.resources().as_ref().map(Into::into),
            cgroup: s
                .vm
                .qemu_vm()
                .map(|q| q.cgroup_description())
                .unwrap_or_default(),
            network: Some((&c.network()).into()),
            pci_devices: c.pci_devices().iter().map(Into::into).collect(),
        }
    }

    /// After a device change: the record rewritten, and on success an event naming it.
    async fn device_changed<T>(
        &self,
        result: Result<T, uvm::ControllerError>,
        operation: v1::Operation,
        guest_path: String,
        host_path: String,
    ) -> Result<T, Status> {
        self.shared.persist().await;
        let done = result.map_err(|e| controller_status(&e))?;
        self.shared
            .push_event(Event::DeviceChanged(v1::DeviceChanged {
                operation: operation.into(),
                guest_path,
                host_path,
            }));
        Ok(done)
    }

    /// The host path of what is mounted at `guest_path`, for a removal's event.
    fn host_path_at(&self, guest_path: &str) -> String {
        let devices = self.shared.vm.controller.devices();
        let disks = devices
            .disks
            .iter()
            .filter(|d| d.mounts.iter().any(|m| m.config.guest_path == guest_path))
            .map(|d| d.config.host_path.clone());
        let shares = devices
            .shares
            .iter()
            .filter(|s| s.mounts.iter().any(|m| m.config.guest_path == guest_path))
            .map(|s| s.config.host_path.clone());
        disks
            .chain(shares)
            .next()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn start(
        &self,
        _: Request<v1::StartRequest>,
    ) -> Result<Response<v1::StartResponse>, Status> {
        let t0 = Instant::now();
        // Each step as an event the moment it finished, with its time since the call began.
        let shared = self.shared.clone();
        let progress = move |step: uvm::StartStep| {
            shared.push_event(Event::BootPhase(v1::BootPhase {
                step: v1::StartStep::from(step).into(),
                elapsed: Some(duration(t0.elapsed())),
            }));
        };
        let r = self
            .shared
            .vm
            .controller
            .start_vm_with_progress(&progress)
            .await;
        self.shared.persist().await;
        r.map_err(|e| controller_status(&e))?;
        *uvm_util::lock(&self.shared.start_total) = Some(t0.elapsed());
        Ok(Response::new(v1::StartResponse {
            status: Some(self.status()),
        }))
    }

    async fn terminate(
        &self,
        request: Request<v1::TerminateRequest>,
    ) -> Result<Response<v1::TerminateResponse>, Status> {
        // The guest is asked to power off and gets the grace period to do it; then the VM is
        // stopped by force.
        let grace = grace_period(request.get_ref().grace_period.as_ref())?
            .unwrap_or(DEFAULT_TERMINATE_GRACE);
        let r = self.shared.vm.controller.terminate_vm_within(grace).await;
        self.shared.persist().await;
        r.map_err(|e| controller_status(&e))?;
        Ok(Response::new(v1::TerminateResponse {
            status: Some(self.status()),
        }))
    }

    async fn wait(
        &self,
        _: Request<v1::WaitRequest>,
    ) -> Result<Response<v1::WaitResponse>, Status> {
        let cancel: CancellationToken = self.shared.removed.child_token();
        let c = &self.shared.vm.controller;
        c.wait(&cancel).await.map_err(|e| controller_status(&e))?;
        self.shared.persist().await;
        Ok(Response::new(v1::WaitResponse {
            exit_status: c.exit_status().ok().map(Into::into),
            status: Some(self.status()),
        }))
    }

    async fn inspect(
        &self,
        _: Request<v1::InspectRequest>,
    ) -> Result<Response<v1::InspectResponse>, Status> {
        Ok(Response::new(self.inspect_response()))
    }

    type ExecStream = BoxStream<v1::ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<v1::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let stream = crate::exec::exec(self.shared.clone(), request.into_inner()).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let c = &self.shared.vm.controller;
        let (host, guest) = tokio::join!(c.stats(), c.guest_stats());
        Ok(Response::new(v1::StatsResponse {
            time: Some(timestamp(SystemTime::now())),
            host: Some(host.map_err(|e| controller_status(&e))?.into()),
            guest: Some(guest.map_err(|e| controller_status(&e))?.into()),
        }))
    }

    async fn dump_stacks(
        &self,
        _: Request<v1::DumpStacksRequest>,
    ) -> Result<Response<v1::DumpStacksResponse>, Status> {
        let c = &self.shared.vm.controller;
        let guest = c.dump_stacks().await.map_err(|e| controller_status(&e))?;
        let qemu = self
            .shared
            .processes()
            .get("qemu")
            .map(|&pid| crate::stacks::threads_of(pid))
            .unwrap_or_default();
        Ok(Response::new(v1::DumpStacksResponse {
            guest,
            supervisor: crate::stacks::threads_of(std::process::id()),
            qemu,
        }))
    }

    async fn update_memory(
        &self,
        request: Request<v1::UpdateMemoryRequest>,
    ) -> Result<Response<v1::UpdateMemoryResponse>, Status> {
        let bytes = request.get_ref().memory_bytes;
        let applied = self
            .shared
            .vm
            .controller
            .update_memory(bytes)
            .await
            .map_err(|e| controller_status(&e))?;
        Ok(Response::new(v1::UpdateMemoryResponse {
            memory_bytes: applied,
        }))
    }

    async fn update_cpus(
        &self,
        request: Request<v1::UpdateCpusRequest>,
    ) -> Result<Response<v1::UpdateCpusResponse>, Status> {
        self.shared
            .vm
            .controller
            .update_cpus(request.get_ref().cpus)
            .await
            .map_err(|e| controller_status(&e))?;
        Ok(Response::new(v1::UpdateCpusResponse {}))
    }

    async fn update_cpu_limits(
        &self,
        request: Request<v1::UpdateCpuLimitsRequest>,
    ) -> Result<Response<v1::UpdateCpuLimitsResponse>, Status> {
        self.shared
            .vm
            .controller
            .update_cpu_limits(request.get_ref().into())
            .await
            .map_err(|e| controller_status(&e))?;
        Ok(Response::new(v1::UpdateCpuLimitsResponse {}))
    }

    async fn update_cpu_group(
        &self,
        request: Request<v1::UpdateCpuGroupRequest>,
    ) -> Result<Response<v1::UpdateCpuGroupResponse>, Status> {
        self.shared
            .vm
            .controller
            .update_cpu_group(&request.get_ref().group_id)
            .await
            .map_err(|e| controller_status(&e))?;
        Ok(Response::new(v1::UpdateCpuGroupResponse {}))
    }

    async fn update_policy_fragment(
        &self,
        request: Request<v1::UpdatePolicyFragmentRequest>,
    ) -> Result<Response<v1::UpdatePolicyFragmentResponse>, Status> {
        let fragment = uvm::seams::PolicyFragment(request.into_inner().fragment);
        self.shared
            .vm
            .controller
            .update_policy_fragment(&fragment)
            .await
            .map_err(|e| controller_status(&e))?;
        Ok(Response::new(v1::UpdatePolicyFragmentResponse {}))
    }

    async fn copy_in(
        &self,
        request: Request<Streaming<v1::CopyInRequest>>,
    ) -> Result<Response<v1::CopyInResponse>, Status> {
        let copied =
            crate::copy::copy_in(self.shared.vm.controller.clone(), request.into_inner()).await?;
        Ok(Response::new(copied))
    }

    type CopyOutStream = BoxStream<v1::CopyOutResponse>;

    async fn copy_out(
        &self,
        request: Request<v1::CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        let stream =
            crate::copy::copy_out(self.shared.vm.controller.clone(), request.into_inner().path)
                .await?;
        Ok(Response::new(Box::pin(stream)))
    }

    type LogsStream = BoxStream<v1::LogsResponse>;

    async fn logs(
        &self,
        request: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let stream = crate::logs::logs(self.shared.clone(), request.get_ref())?;
        Ok(Response::new(Box::pin(stream)))
    }

    type EventsStream = BoxStream<v1::EventsResponse>;

    async fn events(
        &self,
        request: Request<v1::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let stream = crate::events::events(self.shared.clone(), request.get_ref())?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_disk(
        &self,
        request: Request<v1::AddDiskRequest>,
    ) -> Result<Response<v1::AddDiskResponse>, Status> {
        let spec = disk_request(request.into_inner())?;
        let guest_path = spec.mount.guest_path.clone();
        let host_path = spec.disk.host_path.to_string_lossy().into_owned();
        let c = &self.shared.vm.controller;
        let r = c.add_disk(spec.disk, spec.mount).await;
        let slot = self
            .device_changed(r, v1::Operation::AddDisk, guest_path, host_path)
            .await?;
        let disk = c
            .devices()
            .disks
            .iter()
            .find(|d| d.slot == slot)
            .map(Into::into);
        Ok(Response::new(v1::AddDiskResponse {
            slot: slot.index(),
            disk,
        }))
    }

    async fn remove_disk(
        &self,
        request: Request<v1::RemoveDiskRequest>,
    ) -> Result<Response<v1::RemoveDiskResponse>, Status> {
        let guest_path = request.into_inner().guest_path;
        let host_path = self.host_path_at(&guest_path);
        let r = self.shared.vm.controller.remove_disk(&guest_path).await;
        self.device_changed(r, v1::Operation::RemoveDisk, guest_path, host_path)
            .await?;
        Ok(Response::new(v1::RemoveDiskResponse {}))
    }

    async fn add_share(
        &self,
        request: Request<v1::AddShareRequest>,
    ) -> Result<Response<v1::AddShareResponse>, Status> {
        let spec = share_request(request.into_inner())?;
        let guest_path = spec.mount.guest_path.clone();
        let host_path = spec.share.host_path.to_string_lossy().into_owned();
        let c = &self.shared.vm.controller;
        let r = c.add_share(spec.share, spec.mount).await;
        let tag = self
            .device_changed(r, v1::Operation::AddShare, guest_path, host_path)
            .await?;
        let share = c
            .devices()
            .shares
            .iter()
            .find(|s| s.tag == tag)
            .map(Into::into);
        Ok(Response::new(v1::AddShareResponse { tag, share }))
    }

    async fn remove_share(
        &self,
        request: Request<v1::RemoveShareRequest>,
    ) -> Result<Response<v1::RemoveShareResponse>, Status> {
        let guest_path = request.into_inner().guest_path;
        let host_path = self.host_path_at(&guest_path);
        let r = self.shared.vm.controller.remove_share(&guest_path).await;
        self.device_changed(r, v1::Operation::RemoveShare, guest_path, host_path)
            .await?;
        Ok(Response::new(v1::RemoveShareResponse {}))
    }

    async fn list_devices(
        &self,
        _: Request<v1::ListDevicesRequest>,
    ) -> Result<Response<v1::ListDevicesResponse>, Status> {
        Ok(Response::new(v1::ListDevicesResponse {
            devices: Some((&self.shared.vm.controller.devices()).into()),
        }))
    }

    async fn add_nic(
        &self,
        request: Request<v1::AddNicRequest>,
    ) -> Result<Response<v1::AddNicResponse>, Status> {
        let netns = uvm_api::convert::nic_netns(request.get_ref())?;
        let c = &self.shared.vm.controller;
        let r = c.add_nics(&netns).await;
        let shown = netns.display().to_string();
        let ids = self
            .device_changed(r, v1::Operation::AddNic, String::new(), shown)
            .await?;
        let nics = c
            .network()
            .nics
            .iter()
            .filter(|n| ids.contains(&n.nic.id))
            .map(Into::into)
            .collect();
        Ok(Response::new(v1::AddNicResponse { nics }))
    }

    async fn remove_nic(
        &self,
        request: Request<v1::RemoveNicRequest>,
    ) -> Result<Response<v1::RemoveNicResponse>, Status> {
        let nic = request.into_inner().nic;
        let r = self.shared.vm.controller.remove_nic(&nic).await;
        self.device_changed(r, v1::Operation::RemoveNic, String::new(), nic)
            .await?;
        Ok(Response::new(v1::RemoveNicResponse {}))
    }

    async fn list_nics(
        &self,
        _: Request<v1::ListNicsRequest>,
    ) -> Result<Response<v1::ListNicsResponse>, Status> {
        Ok(Response::new(v1::ListNicsResponse {
            network: Some((&self.shared.vm.controller.network()).into()),
        }))
    }

    async fn add_pci_device(
        &self,
        request: Request<v1::AddPciDeviceRequest>,
    ) -> Result<Response<v1::AddPciDeviceResponse>, Status> {
        let address = uvm_api::convert::pci_address(request.get_ref())?;
        let c = &self.shared.vm.controller;
        let r = c.add_pci_device(address).await;
        let id = self
            .device_changed(
                r,
                v1::Operation::AddPciDevice,
                String::new(),
                address.to_string(),
            )
            .await?;
        let device = c.pci_devices().iter().find(|d| d.id == id).map(Into::into);
        Ok(Response::new(v1::AddPciDeviceResponse { device }))
    }

    async fn remove_pci_device(
        &self,
        request: Request<v1::RemovePciDeviceRequest>,
    ) -> Result<Response<v1::RemovePciDeviceResponse>, Status> {
        let id = request.into_inner().id;
        let r = self.shared.vm.controller.remove_pci_device(&id).await;
        self.device_changed(r, v1::Operation::RemovePciDevice, String::new(), id)
            .await?;
        Ok(Response::new(v1::RemovePciDeviceResponse {}))
    }

    async fn list_pci_devices(
        &self,
        _: Request<v1::ListPciDevicesRequest>,
    ) -> Result<Response<v1::ListPciDevicesResponse>, Status> {
        Ok(Response::new(v1::ListPciDevicesResponse {
            devices: self
                .shared
                .vm
                .controller
                .pci_devices()
                .iter()
                .map(Into::into)
                .collect(),
        }))
    }

    async fn remove(
        &self,
        request: Request<v1::RemoveRequest>,
    ) -> Result<Response<v1::RemoveResponse>, Status> {
        let c = &self.shared.vm.controller;
        let state = c.state();
        if state != State::Terminated {
            if !request.get_ref().force {
                let mut status = Status::failed_precondition(format!(
                    "VM {} is {state}: stop it first, or remove it with force",
                    self.shared.id()
                ));
                if let Ok(value) = v1::State::from(state).as_str_name().parse() {
                    status.metadata_mut().insert(uvm_api::STATE_METADATA, value);
                }
                return Err(status);
            }
            let r = c.terminate_vm().await;
            self.shared.persist().await;
            r.map_err(|e| controller_status(&e))?;
        }
        self.shared.remove_files().await.map_err(|e| {
            Status::internal(format!(
                "VM {} is terminated but its directory could not be removed: {e}",
                self.shared.id()
            ))
        })?;
        tracing::info!(vm = %self.shared.id(), "removed");
        self.shared.removed.cancel();
        Ok(Response::new(v1::RemoveResponse {}))
    }
}
