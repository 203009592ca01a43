//! The `COMPLETE` marker race on a real S3 server: the daemons of one job
//! each try to write a step's marker once every rank's manifest is there,
//! with a create-only conditional put. Eight racers on one step: exactly
//! one create succeeds, every other finds the same marker (`Matched`), and
//! a racer whose view of the ranks disagrees is a `Conflict`, never an
//! overwrite.

mod daemon;

use std::sync::Arc;

use gpusnap_proto::{Dtype, TensorSpec};
use gpusnapd::remote::catalog::{self, Completion};
use gpusnapd::remote::transfer::{self, Tier, Uploaded};
use gpusnapd::remote::{RemoteConfig, RemoteError};
use gpusnapd::store::{Snapshot, SnapshotId, Source, Store, StoreConfig};
use gpusnapd_testkit::S3Server;

/// A store under `dir` with (job, rank, step) committed, world of 2.
fn committed(
    dir: &std::path::Path,
    job: &str,
    rank: u32,
    step: u64,
    seed: u8,
) -> (Store, Snapshot) {
    let store = Store::open(StoreConfig {
        root: dir.to_path_buf(),
        ..StoreConfig::default()
    })
    .expect("store");
    let id = SnapshotId::new(job, rank, step).expect("id");
    let tensors = vec![TensorSpec::new("w", Dtype::F32, [1 << 20])];
    let mut fill = |offset: u64, buf: &mut [u8]| {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = seed ^ at.to_le_bytes()[0];
        }
        Ok(())
    };
    store
        .write_snapshot(&id, &tensors, 2, Source::Stream(&mut fill))
        .expect("commit");
    let snapshot = store.find(job, rank, Some(step)).expect("find");
    (store, snapshot)
}

/// The tier, and the sender that says "stopping" to it (kept for as long
/// as the tier is used: a dropped sender reads as stopping).
fn tier(server: &S3Server, prefix: &str) -> (Tier, tokio::sync::watch::Sender<bool>) {
    let mut config = RemoteConfig {
        enabled: true,
        ..RemoteConfig::default()
    };
    for (key, value) in server.remote_settings(prefix) {
        let value: toml::Value = toml::from_str(&format!("v = {value}")).expect("TOML value");
        let v = &value["v"];
        match key {
            "endpoint" => config.endpoint = v.as_str().expect("str").to_owned(),
            "bucket" => config.bucket = v.as_str().expect("str").to_owned(),
            "prefix" => config.prefix = v.as_str().expect("str").to_owned(),
            "region" => config.region = v.as_str().expect("str").to_owned(),
            "credentials_file" => {
                config.credentials_file = Some(v.as_str().expect("str").into());
            }
            _ => {}
        }
    }
    config.validate().expect("valid [remote]");
    let (stop, stopping) = tokio::sync::watch::channel(false);
    (
        Tier::open(&config, None, stopping, None).expect("tier"),
        stop,
    )
}

#[test]
fn eight_racers_on_one_marker_one_create_all_agree() {
    let dir = daemon::scratch();
    let server = S3Server::start(&dir.path().join("s3")).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (tier, stop) = tier(&server, "race");
    let tier = Arc::new(tier);
    let (store0, snap0) = committed(&dir.path().join("node0"), "job", 0, 7, 1);
    let (store1, snap1) = committed(&dir.path().join("node1"), "job", 1, 7, 2);
    let store0 = Arc::new(store0);
    runtime.block_on(async {
        for (store, snap) in [(&*store0, &snap0), (&store1, &snap1)] {
            let sent = transfer::upload(&tier, snap, store.checksum())
                .await
                .expect("upload");
            assert!(matches!(sent, Uploaded::Sent { .. }), "{sent:?}");
        }
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let tier = Arc::clone(&tier);
                let store = Arc::clone(&store0);
                tokio::spawn(async move { catalog::try_complete(&tier, &store, "job", 7, 2).await })
            })
            .collect();
        let mut created = 0;
        let mut matched = 0;
        for racer in racers {
            match racer.await.expect("racer") {
                Ok(Completion::Created) => created += 1,
                Ok(Completion::Matched) => matched += 1,
                other => panic!("a racer got {other:?}"),
            }
        }
        assert_eq!((created, matched), (1, 7), "exactly one create succeeds");
        let listing = catalog::list_job(&tier, "job").await.expect("list");
        let complete = catalog::complete_steps(&tier, "job", &listing)
            .await
            .expect("complete");
        assert_eq!(complete.len(), 1);
        assert_eq!(complete[0].0, 7);
        assert_eq!(complete[0].1.world_size, 2);
    });
    // A marker already there that names other manifests is a conflict
    // for whoever disagrees, and stays as it is.
    let (store0b, snap0b) = committed(&dir.path().join("node0b"), "job", 0, 8, 3);
    let (store1b, snap1b) = committed(&dir.path().join("node1b"), "job", 1, 8, 4);
    runtime.block_on(async {
        for (store, snap) in [(&store0b, &snap0b), (&store1b, &snap1b)] {
            transfer::upload(&tier, snap, store.checksum())
                .await
                .expect("upload step 8");
        }
    });
    let forged_key = "race/job/step-8/COMPLETE";
    let mut forged: serde_json::Value =
        serde_json::from_slice(&server.get("race/job/step-7/COMPLETE").expect("marker 7"))
            .expect("json");
    forged["step"] = 8.into();
    let forged = serde_json::to_vec(&forged).expect("json");
    server.put(forged_key, &forged).expect("put forged");
    let raced = runtime.block_on(catalog::try_complete(&tier, &store0b, "job", 8, 2));
    match raced {
        Err(RemoteError::Conflict { .. }) => {}
        other => panic!("a disagreeing marker: {other:?}"),
    }
    assert_eq!(
        server.get(forged_key).expect("marker"),
        forged,
        "never overwritten"
    );
    drop(stop);
}
