//! Controller-only costs, with the recording fakes (no VM): what the controller itself adds.
//!
//! - `state()` / `stats()` while a `start_vm` is blocked in flight (they must not wait for it),
//!   against the same calls on an idle Running VM as the baseline;
//! - a full create → start → terminate cycle;
//! - a disk and a share added and removed (the controller's books and tables around four fake
//!   calls each), and `devices()` while an attach is blocked in flight against an idle one.

use criterion::{criterion_group, criterion_main, Criterion};
use uvm::seams::{DiskConfig, DiskMount, ShareConfig, ShareMount, VmConfig};
use uvm::testing::{Call, Fakes};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn queries(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("queries");

    // Baseline: a Running VM, nothing in flight.
    let idle = rt.block_on(Fakes::running());
    group.bench_function("state/idle", |b| b.iter(|| idle.controller.state()));
    group.bench_function("stats/idle", |b| {
        b.to_async(&rt)
            .iter(|| async { idle.controller.stats().await.expect("stats") })
    });

    // A start blocked inside the backend for the whole measurement.
    let (busy, hold, task) = rt.block_on(async {
        let f = Fakes::created().await;
        let hold = f.script.hold(Call::Start);
        let c = f.controller.clone();
        let task = tokio::spawn(async move { c.start_vm().await });
        hold.entered().await;
        (f, hold, task)
    });
    group.bench_function("state/during_start", |b| b.iter(|| busy.controller.state()));
    group.bench_function("stats/during_start", |b| {
        // Refused (Created) at once: the point is that it answers without waiting.
        b.to_async(&rt)
            .iter(|| async { busy.controller.stats().await.is_err() })
    });
    group.finish();
    hold.release();
    rt.block_on(async {
        let _ = task.await;
    });
}

fn lifecycle(c: &mut Criterion) {
    let rt = runtime();
    c.bench_function("lifecycle/create_start_terminate", |b| {
        b.to_async(&rt).iter(|| async {
            let f = Fakes::new();
            f.controller
                .create_vm(VmConfig::default())
                .await
                .expect("create");
            f.controller.start_vm().await.expect("start");
            f.controller.terminate_vm().await.expect("terminate");
        })
    });
}

fn devices(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("devices");
    let f = rt.block_on(Fakes::running());
    group.bench_function("add_remove_disk", |b| {
        b.to_async(&rt).iter(|| async {
            f.controller
                .add_disk(DiskConfig::raw("/images/a.img"), DiskMount::at("/data"))
                .await
                .expect("add");
            f.controller.remove_disk("/data").await.expect("remove");
        })
    });
    group.bench_function("add_remove_share", |b| {
        b.to_async(&rt).iter(|| async {
            let share = ShareConfig {
                host_path: "/srv".into(),
                read_only: true,
            };
            let mount = ShareMount {
                guest_path: "/srv".into(),
                read_only: true,
            };
            f.controller.add_share(share, mount).await.expect("add");
            f.controller.remove_share("/srv").await.expect("remove");
        })
    });
    rt.block_on(
        f.controller
            .add_disk(DiskConfig::raw("/images/b.img"), DiskMount::at("/b")),
    )
    .expect("add");
    group.bench_function("devices/idle", |b| b.iter(|| f.controller.devices()));

    let hold = f.script.hold(Call::AttachDisk);
    let task = {
        let c = f.controller.clone();
        rt.spawn(async move {
            c.add_disk(DiskConfig::raw("/images/c.img"), DiskMount::at("/c"))
                .await
        })
    };
    rt.block_on(hold.entered());
    group.bench_function("devices/during_attach", |b| {
        b.iter(|| f.controller.devices())
    });
    group.finish();
    hold.release();
    rt.block_on(async {
        let _ = task.await;
    });
}

criterion_group!(benches, queries, lifecycle, devices);
criterion_main!(benches);
