//! 1, 8 and 32 trainers at once against the real daemon: each snapshots a
//! few steps, restores, and gets back exactly the bytes it registered; every
//! file on disk loads with the safetensors crate.

mod daemon;

use daemon::{Daemon, State, client, snapshot_committed, verify_all};
use gpusnap::Step;

fn trainers(count: usize) {
    let daemon = Daemon::start(&[]);
    let steps = 3u64;
    std::thread::scope(|scope| {
        for t in 0..count {
            let daemon = &daemon;
            scope.spawn(move || {
                // Two ranks per job, so complete steps are exercised too.
                let job = format!("job{}", t / 2);
                let rank = u32::try_from(t % 2).expect("rank");
                let world = if count == 1 { 1 } else { 2 };
                let state = State::new(5 + t % 7, 256 * 1024 + (t as u64) * 4099);
                let mut c = client(daemon, &job, rank, world);
                state.register(&mut c);
                for step in 1..=steps {
                    state.fill(step * 1000 + t as u64);
                    let info = snapshot_committed(&mut c, step);
                    assert!(info.bytes > state.byte_len(), "file holds header and data");
                }
                state.zero();
                let restored = c
                    .restore(Step::Latest)
                    .expect("restore")
                    .expect("a snapshot");
                assert_eq!(restored.step, steps);
                assert_eq!(restored.bytes, state.byte_len());
                assert_eq!(
                    state.differs_from(steps * 1000 + t as u64),
                    None,
                    "trainer {t}"
                );
                state.zero();
                let older = c.restore(Step::At(2)).expect("restore").expect("step 2");
                assert_eq!(older.step, 2);
                assert_eq!(
                    state.differs_from(2000 + t as u64),
                    None,
                    "trainer {t} step 2"
                );
            });
        }
    });
    assert_eq!(verify_all(&daemon.root), count * 3);
    // Every data file is plain safetensors.
    for entry in walk(&daemon.root) {
        if entry.file_name().and_then(|n| n.to_str()) == Some("state.safetensors") {
            let bytes = std::fs::read(&entry).expect("read");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors loads it");
            assert!(st.names().contains(&"step"));
        }
    }
    let mut c = client(&daemon, "job0", 0, if count == 1 { 1 } else { 2 });
    let listing = c.list().expect("list");
    let complete: Vec<u64> = listing
        .complete
        .iter()
        .find(|j| j.job == "job0")
        .map(|j| j.steps.clone())
        .unwrap_or_default();
    assert_eq!(
        complete,
        vec![1, 2, 3],
        "every rank of job0 committed every step"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn one_trainer() {
    trainers(1);
}

#[test]
fn eight_trainers() {
    trainers(8);
}

#[test]
fn thirty_two_trainers() {
    trainers(32);
}
