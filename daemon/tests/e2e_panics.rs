//! A panic inside the real daemon, injected through its test-only
//! `[testing]` table: in a connection task (while it handles a `captured`)
//! and in a persist lane (while it persists one step). Either way the
//! daemon keeps serving its other clients, the rank registers again at once
//! (never `Busy`), the step is reported failed (`Internal` to the client,
//! `failed` in the metrics), a restore does not hang and gets the last
//! committed step, the staging budget returns to zero once the clients are
//! gone, the panic is counted by where it was caught
//! (`gpusnap_panics_total{site}`), and a SIGTERM stop does not wait out the
//! shutdown deadline. A
//! `[testing]` table without `GPUSNAP_TESTING=1` is refused at start.

mod daemon;
mod raw;

use std::process::Command;
use std::time::{Duration, Instant};

use daemon::{
    Daemon, Image, State, allow_testing_table, client, dir_names, snapshot_committed,
    staging_settled, wait_for, wait_rank_free,
};
use gpusnap::proto::ErrorKind;
use gpusnap::{Error, SnapshotOutcome, Step};
use raw::Raw;
use serde_json::json;

/// A stop that waits for nothing finishes well within this (the launcher's
/// shutdown deadline is 30 s).
const QUICK_STOP: Duration = Duration::from_secs(10);

/// Waits until nothing is in flight and no live registration holds staging,
/// then checks the budget in use is zero (status and the gauge agree).
fn staging_back_to_zero(daemon: &Daemon) {
    let status = staging_settled(daemon);
    assert!(status.sessions.is_empty(), "{status:#?}");
    assert_eq!(status.staging_bytes_used, 0, "{status:#?}");
    assert_eq!(daemon.metric("gpusnap_staging_bytes"), 0.0);
}

/// SIGTERM: exits 0 without waiting out the shutdown deadline (nothing
/// leaked stays in flight).
fn stops_quickly(daemon: &mut Daemon) {
    let started = Instant::now();
    assert!(daemon.stop().success());
    assert!(
        started.elapsed() < QUICK_STOP,
        "the stop took {:?}: something stayed in flight",
        started.elapsed()
    );
}

#[test]
fn a_connection_that_panics_gives_back_its_rank_slot_and_staging() {
    allow_testing_table();
    let mut daemon = Daemon::start(&[("testing", "panic_once_on_request", "\"captured\"")]);
    // A trainer registered before the panic, served after it.
    let bystander = State::new(2, 1 << 20);
    let mut other = client(&daemon, "bystander", 0, 1);
    bystander.register(&mut other);
    other.sync_registration().expect("registered");

    // The victim holds a capturing slot when its `captured` panics.
    let mut victim = Raw::connect(&daemon.socket);
    assert_eq!(victim.register("doomed", 1024)["type"], "registered");
    let slot = victim.call(json!({ "type": "begin", "step": 1 }));
    assert_eq!(slot["type"], "slot", "{slot}");
    victim.send(json!({ "type": "captured", "step": 1, "capture_ns": 1, "stall_ns": 1 }));
    assert!(
        victim.next().is_none(),
        "the panicking connection is closed"
    );

    // Once its socket closed, the rank is free: no Busy, not even once.
    let mut again = Raw::connect(&daemon.socket);
    let registered = again.register("doomed", 1024);
    assert_eq!(registered["type"], "registered", "{registered}");
    drop(again);

    // The bystander is served.
    bystander.fill(1);
    snapshot_committed(&mut other, 1);

    // The panicked capture counts as failed, with no OS error behind it.
    assert_eq!(
        daemon.metric("gpusnap_snapshots_total{job=\"doomed\",outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        daemon.metric("gpusnap_snapshot_failures_total{errno=\"none\",job=\"doomed\"}"),
        1.0
    );
    // Counted where it was caught, once the accept loop reaped the task.
    let connection_panics = "gpusnap_panics_total{site=\"connection\"}";
    wait_for(
        "the accept loop counts the panic",
        Duration::from_secs(30),
        || daemon.exports("gpusnap_panics_total") && daemon.metric(connection_panics) >= 1.0,
    );
    assert_eq!(daemon.metric(connection_panics), 1.0);
    for site in ["lane", "stream"] {
        assert_eq!(
            daemon.metric(&format!("gpusnap_panics_total{{site=\"{site}\"}}")),
            0.0,
            "{site}"
        );
    }

    // The rank works end to end; nothing of the panicked step was written.
    wait_rank_free(&daemon, "doomed", 0);
    let state = State::new(2, 1 << 20);
    let mut c = client(&daemon, "doomed", 0, 1);
    state.register(&mut c);
    let image = Image::of(&state, 2);
    snapshot_committed(&mut c, 2);
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("a step");
    assert_eq!(r.step, 2);
    assert_eq!(image.differs(&state), None);
    assert_eq!(dir_names(&daemon.root.join("doomed").join("0")), ["step-2"]);

    drop(c);
    drop(other);
    wait_rank_free(&daemon, "doomed", 0);
    wait_rank_free(&daemon, "bystander", 0);
    staging_back_to_zero(&daemon);
    stops_quickly(&mut daemon);
}

#[test]
fn a_lane_that_panics_fails_that_step_and_persists_the_next() {
    allow_testing_table();
    let mut daemon = Daemon::start(&[("testing", "panic_persisting_step", "2")]);
    let state = State::new(3, 2 << 20);
    let mut c = client(&daemon, "lane", 0, 1);
    state.register(&mut c);
    let images = [
        Image::of(&state, 1),
        Image::of(&state, 2),
        Image::of(&state, 3),
    ];
    images[0].load(&state);
    snapshot_committed(&mut c, 1);

    images[1].load(&state);
    assert!(matches!(
        c.snapshot(2).expect("snapshot"),
        SnapshotOutcome::Captured(_)
    ));
    match c.wait_committed(2) {
        Err(Error::SnapshotFailed {
            step: 2,
            kind: ErrorKind::Internal,
            message,
            os_error: None,
        }) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("step 2 under a panicking lane: {other:?}"),
    }

    // The failed step is not in flight: a restore does not wait for it.
    state.zero();
    let asked = Instant::now();
    let r = c.restore(Step::Latest).expect("restore").expect("a step");
    assert!(asked.elapsed() < QUICK_STOP, "{:?}", asked.elapsed());
    assert_eq!(r.step, 1);
    assert_eq!(images[0].differs(&state), None);

    // The lane goes on with the next step.
    images[2].load(&state);
    snapshot_committed(&mut c, 3);
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("a step");
    assert_eq!(r.step, 3);
    assert_eq!(images[2].differs(&state), None);
    assert_eq!(
        dir_names(&daemon.root.join("lane").join("0")),
        ["step-1", "step-3"]
    );
    for (outcome, count) in [("committed", 2.0), ("failed", 1.0)] {
        assert_eq!(
            daemon.metric(&format!(
                "gpusnap_snapshots_total{{job=\"lane\",outcome=\"{outcome}\"}}"
            )),
            count,
            "{outcome}"
        );
    }
    assert_eq!(
        daemon.metric("gpusnap_snapshot_failures_total{errno=\"none\",job=\"lane\"}"),
        1.0
    );
    // Counted where it was caught, before the step was reported failed.
    assert_eq!(daemon.metric("gpusnap_panics_total{site=\"lane\"}"), 1.0);
    assert_eq!(
        daemon.metric("gpusnap_panics_total{site=\"connection\"}"),
        0.0
    );

    // Another connection takes the rank as soon as this one is gone.
    drop(c);
    wait_rank_free(&daemon, "lane", 0);
    let mut again = Raw::connect(&daemon.socket);
    let registered = again.register("lane", 1024);
    assert_eq!(registered["type"], "registered", "{registered}");
    drop(again);

    wait_rank_free(&daemon, "lane", 0);
    staging_back_to_zero(&daemon);
    stops_quickly(&mut daemon);
}

#[test]
fn a_testing_table_is_refused_without_gpusnap_testing() {
    let dir = daemon::scratch();
    let config = dir.path().join("gpusnapd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\n[metrics]\nlisten = \"\"\n[store]\nroot = \"{}\"\n[testing]\npanic_persisting_step = 1\n",
            dir.path().join("gpusnapd.sock").display(),
            dir.path().join("root").display()
        ),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_gpusnapd"))
        .arg("--config")
        .arg(&config)
        .env_remove("GPUSNAP_TESTING")
        .output()
        .expect("run gpusnapd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("GPUSNAP_TESTING=1") && stderr.contains("[testing]"),
        "the refusal names the table and the variable: {stderr}"
    );
    assert!(
        !dir.path().join("gpusnapd.sock").exists(),
        "it never listened"
    );
}
