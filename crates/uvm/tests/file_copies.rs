//! File copies through the controller: refusals first (state, arguments, limits, the guest's own
//! refusals, failures mid-copy), then round trips on the fake guest's in-memory file system.

use uvm::seams::FileMeta;
use uvm::testing::{Call, Capture, Fakes, FAKE_COPY_CHUNK};
use uvm::{ControllerError, GuestError, GuestRequest, Operation, Rejection, State};

/// Deterministic, not repetitive within a chunk: a misplaced chunk shows.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

async fn copy_in(f: &Fakes, path: &str, mode: u32, data: &[u8]) -> Result<(), ControllerError> {
    let mut source = data;
    f.controller
        .copy_in(path, mode, data.len() as u64, &mut source)
        .await
}

async fn copy_out(f: &Fakes, path: &str) -> Result<(FileMeta, Vec<u8>), ControllerError> {
    let sink = Capture::default();
    let mut headers = Vec::new();
    let meta = f
        .controller
        .copy_out(path, &mut |m| headers.push(m), &mut sink.clone())
        .await?;
    assert_eq!(headers, vec![meta], "one header, before the data");
    Ok((meta, sink.bytes()))
}

fn assert_wrong_state(err: &ControllerError, op: Operation, state: State) {
    assert!(
        matches!(err, ControllerError::WrongState { operation, state: s, .. } if *operation == op && *s == state),
        "expected WrongState({op}, {state}), got {err:?}"
    );
}

fn assert_refused(err: &ControllerError, op: Operation, request: GuestRequest, kind: Rejection) {
    assert!(
        matches!(
            err,
            ControllerError::Guest {
                operation,
                source: GuestError::Rejected { request: r, kind: k, .. },
                ..
            } if *operation == op && *r == request && *k == kind
        ),
        "expected {op} refused at {request} with {kind:?}, got {err:?}"
    );
}

#[tokio::test]
async fn copies_are_refused_outside_running_naming_the_state() {
    for (f, state) in [
        (Fakes::new(), State::NotCreated),
        (Fakes::created().await, State::Created),
        (Fakes::terminated().await, State::Terminated),
        (Fakes::invalid().await, State::Invalid),
    ] {
        f.script.clear_log();
        let err = copy_in(&f, "/tmp/x", 0o644, b"abc").await.expect_err("in");
        assert_wrong_state(&err, Operation::CopyIn, state);
        assert!(err.to_string().contains(&state.to_string()), "{err}");
        let err = copy_out(&f, "/tmp/x").await.expect_err("out");
        assert_wrong_state(&err, Operation::CopyOut, state);
        assert!(f.script.calls().is_empty(), "refusals touch no seam");
    }
}

#[tokio::test]
async fn bad_modes_and_paths_are_invalid_before_the_state_is_looked_at() {
    // NotCreated: an argument error wins over the state.
    let f = Fakes::new();
    for mode in [0o10000, 0o100644, u32::MAX] {
        let err = copy_in(&f, "/tmp/x", mode, b"").await.expect_err("mode");
        assert!(
            matches!(err, ControllerError::InvalidArgument { what: "mode", .. }),
            "{mode:#o}: {err:?}"
        );
    }
    for path in [
        "tmp/x",
        "",
        "/",
        "/tmp/../x",
        "/tmp//x",
        "/tmp/x/",
        "/tmp/\0",
    ] {
        let err = copy_in(&f, path, 0o644, b"").await.expect_err("path in");
        assert!(
            matches!(
                err,
                ControllerError::InvalidArgument {
                    what: "guest path",
                    ..
                }
            ),
            "{path:?}: {err:?}"
        );
        let err = copy_out(&f, path).await.expect_err("path out");
        assert!(
            matches!(
                err,
                ControllerError::InvalidArgument {
                    what: "guest path",
                    ..
                }
            ),
            "{path:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_file_above_the_limit_is_refused_before_any_data() {
    let f = Fakes::running().await;
    f.controller.set_copy_limit(1000);
    let data = content(1001);
    let mut source = &data[..];
    let err = f
        .controller
        .copy_in("/tmp/big", 0o644, 1001, &mut source)
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err,
            ControllerError::TooLarge {
                size: 1001,
                limit: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(source.len(), 1001, "nothing was read");
    assert!(f.script.calls().is_empty(), "nothing reached the guest");

    f.guest.put_file("/tmp/big", 0o644, &data);
    let sink = Capture::default();
    let mut headers = 0;
    let err = f
        .controller
        .copy_out("/tmp/big", &mut |_| headers += 1, &mut sink.clone())
        .await
        .expect_err("too large");
    assert_refused(
        &err,
        Operation::CopyOut,
        GuestRequest::OpenRead,
        Rejection::ResourceExhausted,
    );
    assert_eq!((headers, sink.bytes().len()), (0, 0), "no header, no data");
    assert_eq!(f.script.calls(), vec![Call::CopyOut]);
}

#[tokio::test]
async fn a_guest_refusal_propagates_with_its_kind() {
    let f = Fakes::running().await;
    f.guest
        .refuse_path("/proc/forbidden", Rejection::PermissionDenied);
    let err = copy_in(&f, "/proc/forbidden", 0o644, b"x")
        .await
        .expect_err("refused");
    assert_refused(
        &err,
        Operation::CopyIn,
        GuestRequest::OpenWrite,
        Rejection::PermissionDenied,
    );
    let err = copy_out(&f, "/nonexistent").await.expect_err("missing");
    assert_refused(
        &err,
        Operation::CopyOut,
        GuestRequest::OpenRead,
        Rejection::NotFound,
    );
    assert_eq!(
        f.controller.state(),
        State::Running,
        "refusals change no state"
    );
}

#[tokio::test]
async fn a_failure_mid_copy_leaves_the_old_file_and_the_vm_running() {
    let f = Fakes::running().await;
    f.guest.put_file("/srv/data", 0o600, b"old");
    f.script.fail_nth(Call::WriteChunk, 2);
    let err = copy_in(&f, "/srv/data", 0o644, &content(3 * FAKE_COPY_CHUNK))
        .await
        .expect_err("second chunk fails");
    assert_refused(
        &err,
        Operation::CopyIn,
        GuestRequest::WriteChunk,
        Rejection::Other,
    );
    assert_eq!(
        f.script.calls(),
        vec![Call::CopyIn, Call::WriteChunk, Call::WriteChunk],
        "stopped at the failing chunk"
    );
    let (meta, data) = f.guest.file("/srv/data").expect("old file kept");
    assert_eq!((meta.mode, data), (0o600, b"old".to_vec()));

    f.guest
        .put_file("/srv/out", 0o644, &content(3 * FAKE_COPY_CHUNK));
    f.script.fail_nth(Call::ReadChunk, 3);
    let err = copy_out(&f, "/srv/out")
        .await
        .expect_err("third chunk fails");
    assert_refused(
        &err,
        Operation::CopyOut,
        GuestRequest::ReadChunk,
        Rejection::Other,
    );
    assert_eq!(f.controller.state(), State::Running);
}

#[tokio::test]
async fn a_source_that_ends_early_fails_the_copy_and_writes_nothing() {
    let f = Fakes::running().await;
    let data = content(100);
    let mut source = &data[..];
    let err = f
        .controller
        .copy_in("/tmp/short", 0o644, 101, &mut source)
        .await
        .expect_err("short");
    assert!(
        matches!(&err, ControllerError::Guest { source: GuestError::Io { source, .. }, .. }
            if source.kind() == std::io::ErrorKind::UnexpectedEof),
        "{err:?}"
    );
    assert!(f.guest.file("/tmp/short").is_none());
}

#[tokio::test]
async fn a_guest_without_the_files_capability_is_unsupported() {
    let f = Fakes::created().await;
    f.guest.set_capabilities(&["exec"]);
    f.controller.start_vm().await.expect("start");
    let err = copy_in(&f, "/tmp/x", 0o644, b"x")
        .await
        .expect_err("no files");
    assert!(
        matches!(
            err,
            ControllerError::Guest {
                operation: Operation::CopyIn,
                source: GuestError::Unsupported { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn files_round_trip_byte_exact_with_their_mode_and_a_file_there_is_replaced() {
    let f = Fakes::running().await;
    let data = content(10 << 20);
    f.guest.put_file("/srv/blob", 0o600, b"previous");
    copy_in(&f, "/srv/blob", 0o4755, &data).await.expect("in");
    let (meta, back) = copy_out(&f, "/srv/blob").await.expect("out");
    assert_eq!(
        meta,
        FileMeta {
            mode: 0o4755,
            size: data.len() as u64
        }
    );
    assert!(back == data, "10 MiB came back byte-exact");
    assert_eq!(
        f.script.count(Call::WriteChunk),
        (10 << 20) / FAKE_COPY_CHUNK
    );

    copy_in(&f, "/srv/empty", 0o644, b"")
        .await
        .expect("empty in");
    let (meta, back) = copy_out(&f, "/srv/empty").await.expect("empty out");
    assert_eq!((meta.size, back.len()), (0, 0));
}
