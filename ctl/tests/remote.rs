//! `gpusnapctl remote` against a real S3 server ([`S3Server`]): push two
//! ranks' snapshots, list the step complete, verify it, catch one flipped
//! byte in the bucket, pull an intact snapshot byte for byte, refuse to
//! pull over a local one, and fail fast and clearly on wrong credentials
//! and on a server that is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gpusnap::{Dtype, TensorSpec};
use gpusnapd::store::{SnapshotId, Source, SourceError, Store, StoreConfig};
use gpusnapd_testkit::S3Server;

const JOB: &str = "train";
const PREFIX: &str = "ckpt/ctl";
const WORLD: u32 = 2;

/// A scratch directory on the real disk (not tmpfs: O_DIRECT must work).
fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    tempfile::Builder::new()
        .prefix("gpusnapctl-remote-")
        .tempdir_in(base)
        .expect("scratch dir")
}

fn store_config(root: &Path) -> StoreConfig {
    StoreConfig {
        root: root.to_path_buf(),
        keep_snapshots: 3,
        queue_depth: 8,
        io_buffer_bytes: 64 << 10,
        io_pool_bytes: 2 << 20,
        ..StoreConfig::default()
    }
}

/// Six MiB and a bit per rank: two parts of an upload (5 MiB at least each).
fn tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("model.w", Dtype::F32, [1536, 1024]),
        TensorSpec::new("model.b", Dtype::BF16, [1000]),
        TensorSpec::new("step", Dtype::I64, []),
    ]
}

fn pattern(seed: u64, at: u64) -> u8 {
    let x = (at ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0x2545_f491_4f6c_dd1d);
    x.to_le_bytes()[usize::try_from(at % 8).expect("small")]
}

fn write(store: &Store, rank: u32, step: u64) {
    let seed = step * 16 + u64::from(rank);
    let mut fill = |offset: u64, dst: &mut [u8]| -> Result<(), SourceError> {
        for (i, b) in dst.iter_mut().enumerate() {
            *b = pattern(seed, offset + i as u64);
        }
        Ok(())
    };
    let id = SnapshotId::new(JOB, rank, step).expect("id");
    store
        .write_snapshot(&id, &tensors(), WORLD, Source::Stream(&mut fill))
        .expect("commit");
}

/// The daemon's config file: the store root and the `[remote]` table.
fn write_config(dir: &Path, name: &str, root: &Path, remote: &[(&'static str, String)]) -> PathBuf {
    let mut text = format!(
        "[store]\nroot = {:?}\nio_buffer_bytes = 65536\nio_pool_bytes = 2097152\nqueue_depth = 8\n\n[remote]\n",
        root.display().to_string()
    );
    let have = |key: &str| remote.iter().any(|(k, _)| *k == key);
    for (key, value) in remote {
        text.push_str(&format!("{key} = {value}\n"));
    }
    for (key, value) in [
        ("enabled", "true"),
        ("part_bytes", "\"5MiB\""),
        ("concurrency", "4"),
        ("request_timeout_s", "5"),
        ("retry_deadline_s", "5"),
    ] {
        if !have(key) {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A secret only its owner reads (the daemon's library warns otherwise).
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn ctl(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpusnapctl"));
    cmd.args(args).arg("--config").arg(config);
    // Credentials come from the file the config names, never from here.
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.output().expect("run gpusnapctl")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

fn data_key(rank: u32, step: u64) -> String {
    format!("{PREFIX}/{JOB}/{rank}/step-{step}/state.safetensors")
}

#[test]
fn push_list_verify_corrupt_pull_and_refuse() {
    let dir = scratch();
    let mut server = S3Server::start(&dir.path().join("s3")).expect("start the S3 server");
    let root = dir.path().join("store");
    {
        let store = Store::open(store_config(&root)).expect("open store");
        for rank in 0..WORLD {
            write(&store, rank, 3);
            write(&store, rank, 5);
        }
    }
    // The daemon's job directories always name their owner.
    std::fs::write(
        root.join(JOB).join("OWNER"),
        format!("{}\n", nix::unistd::getuid().as_raw()),
    )
    .expect("OWNER");
    let config = write_config(
        dir.path(),
        "gpusnapd.toml",
        &root,
        &server.remote_settings(PREFIX),
    );
    private(server.credentials_file());

    // Push: each rank's newest step goes up, and the step is complete.
    let out = ctl(&config, &["--json", "remote", "push"]);
    assert!(out.status.success(), "{}", text(&out));
    let pushed = json(&out);
    let uploads = pushed["uploads"].as_array().expect("uploads");
    assert_eq!(uploads.len(), 2, "{pushed:#}");
    for u in uploads {
        assert_eq!(u["outcome"], "sent", "{pushed:#}");
        assert_eq!(u["step"], 5, "{pushed:#}");
    }
    assert_eq!(pushed["steps"][0]["complete"], true, "{pushed:#}");
    assert_eq!(pushed["steps"][0]["marker"], "created", "{pushed:#}");
    assert!(
        server
            .list_keys(&format!("{PREFIX}/{JOB}/"))
            .expect("list")
            .contains(&format!("{PREFIX}/{JOB}/step-5/COMPLETE")),
        "{:?}",
        server.list_keys(PREFIX)
    );
    // The job's owner went up with it, as the local OWNER says.
    let local_owner = std::fs::read(root.join(JOB).join("OWNER")).expect("local OWNER");
    assert_eq!(
        server
            .get(&format!("{PREFIX}/{JOB}/OWNER"))
            .expect("OWNER object"),
        local_owner
    );
    // Again: nothing goes up twice, the marker agrees.
    let out = ctl(&config, &["--json", "remote", "push", "--rank", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let again = json(&out);
    assert_eq!(again["uploads"][0]["outcome"], "already_there", "{again:#}");
    assert_eq!(again["steps"][0]["marker"], "matched", "{again:#}");

    // List: the step is complete, both ranks there with their bytes.
    let out = ctl(&config, &["--json", "remote", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = json(&out);
    assert_eq!(listed["bucket"], S3Server::BUCKET, "{listed:#}");
    let jobs = listed["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{listed:#}");
    assert_eq!(jobs[0]["job"], JOB);
    let steps = jobs[0]["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1, "only step 5 was pushed: {listed:#}");
    let step = &steps[0];
    assert_eq!(step["step"], 5);
    assert_eq!(step["complete"], true, "{listed:#}");
    assert_eq!(step["marker"], "valid", "{listed:#}");
    assert_eq!(step["world_size"], WORLD);
    let ranks = step["ranks"].as_array().expect("ranks");
    assert_eq!(ranks.len(), 2);
    let local = Store::open_read_only(store_config(&root)).expect("reader");
    for (rank, r) in (0..WORLD).zip(ranks) {
        let snap = local.find(JOB, rank, Some(5)).expect("local snapshot");
        assert_eq!(r["rank"], rank);
        assert_eq!(r["manifest"], true);
        assert_eq!(r["data_bytes"], snap.manifest.file_len, "{listed:#}");
    }
    let out = ctl(&config, &["remote", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("complete"),
        "{}",
        text(&out)
    );

    // Verify: intact.
    let out = ctl(&config, &["remote", "verify", "--job", JOB]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ctl(
        &config,
        &["--json", "remote", "verify", "--job", JOB, "--step", "5"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let verified = json(&out);
    assert_eq!(verified["ok"], true, "{verified:#}");
    assert!(
        verified["steps"][0]["ranks"][1]["parts_checked"]
            .as_u64()
            .expect("parts")
            >= 2
    );

    // One byte flipped in rank 1's data object, deep in the data section.
    let key = data_key(1, 5);
    let mut object = server.get(&key).expect("get");
    let at = object.len() - 1000;
    object[at] ^= 0x20;
    server.put(&key, &object).expect("put");
    let out = ctl(&config, &["remote", "verify", "--job", JOB]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&key) && report.contains("CRC32"),
        "{}",
        text(&out)
    );
    assert!(
        report.contains("OK       train step 5 rank 0"),
        "{}",
        text(&out)
    );
    let out = ctl(&config, &["--json", "remote", "verify", "--job", JOB]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let verified = json(&out);
    assert_eq!(verified["ok"], false);
    assert_eq!(verified["steps"][0]["ranks"][0]["ok"], true, "{verified:#}");
    let bad = &verified["steps"][0]["ranks"][1];
    assert_eq!(bad["ok"], false, "{verified:#}");
    assert_eq!(
        bad["problems"].as_array().expect("problems").len(),
        1,
        "{verified:#}"
    );
    assert_eq!(bad["problems"][0]["key"], key.as_str(), "{verified:#}");

    // Pull the intact rank into an empty root: byte for byte the original.
    let fresh = dir.path().join("fresh");
    let out = ctl(
        &config,
        &[
            "remote",
            "pull",
            "--job",
            JOB,
            "--rank",
            "0",
            "--root",
            fresh.to_str().expect("utf8"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let pulled_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let original = local.find(JOB, 0, Some(5)).expect("original");
    assert_eq!(
        std::fs::read(pulled_dir.join("state.safetensors")).expect("pulled data"),
        std::fs::read(original.data_path()).expect("original data"),
    );
    let copy = Store::open_read_only(store_config(&fresh))
        .expect("fresh reader")
        .find(JOB, 0, None)
        .expect("the pulled snapshot is listed");
    assert_eq!(copy.dir, pulled_dir);
    assert!(
        fresh.join(JOB).join("OWNER").is_file(),
        "the pull claimed the job"
    );
    // The corrupt rank is refused on the way, and leaves nothing behind.
    let out = ctl(
        &config,
        &[
            "remote",
            "pull",
            "--job",
            JOB,
            "--rank",
            "1",
            "--root",
            fresh.to_str().expect("utf8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&key),
        "{}",
        text(&out)
    );
    assert!(!fresh.join(JOB).join("1").join("step-5").exists());
    // Over a local snapshot: refused.
    let out = ctl(
        &config,
        &[
            "remote",
            "pull",
            "--job",
            JOB,
            "--rank",
            "0",
            "--step",
            "5",
            "--root",
            root.to_str().expect("utf8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists locally"),
        "{}",
        text(&out)
    );

    // One rank of a newer step only: pushed, but the step is not complete.
    {
        let store = Store::open(store_config(&root)).expect("open store");
        write(&store, 0, 7);
    }
    let out = ctl(
        &config,
        &["--json", "remote", "push", "--job", JOB, "--rank", "0"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let partial = json(&out);
    assert_eq!(partial["uploads"][0]["step"], 7, "{partial:#}");
    assert_eq!(partial["steps"][0]["complete"], false, "{partial:#}");
    assert_eq!(
        partial["steps"][0]["missing_ranks"],
        serde_json::json!([1]),
        "{partial:#}"
    );
    let out = ctl(&config, &["--json", "remote", "list", "--job", JOB]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = json(&out);
    let step7 = &listed["jobs"][0]["steps"][1];
    assert_eq!(step7["step"], 7, "{listed:#}");
    assert_eq!(step7["complete"], false, "{listed:#}");
    assert_eq!(step7["marker"], "absent", "{listed:#}");
    assert_eq!(step7["world_size"], WORLD, "{listed:#}");
    assert_eq!(step7["missing_ranks"], serde_json::json!([1]), "{listed:#}");
    let out = ctl(&config, &["remote", "verify", "--job", JOB, "--step", "7"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no COMPLETE marker"),
        "{}",
        text(&out)
    );

    // Wrong credentials: a clear error naming the endpoint, at once.
    let mut wrong = server.remote_settings(PREFIX);
    wrong.retain(|(k, _)| *k != "credentials_file");
    wrong.push((
        "credentials_file",
        format!(
            "{:?}",
            server.wrong_credentials_file().display().to_string()
        ),
    ));
    private(&server.wrong_credentials_file());
    let wrong_config = write_config(dir.path(), "wrong.toml", &root, &wrong);
    let started = Instant::now();
    let out = ctl(&wrong_config, &["remote", "list"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&server.endpoint()) && stderr.contains("refused the credentials"),
        "{}",
        text(&out)
    );
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}: {}",
        text(&out)
    );

    // The server gone: a clear error within the retry deadline.
    server.kill().expect("kill");
    let started = Instant::now();
    let out = ctl(&config, &["remote", "list", "--retry-deadline-s", "2"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&server.endpoint()),
        "{}",
        text(&out)
    );
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}: {}",
        text(&out)
    );
}
