//! Restores against the real daemon: a registration that does not match the
//! snapshot (shape, dtype, a tensor missing or extra) is refused naming the
//! tensor and leaves the trainer's buffers untouched; another registration
//! order restores exact bytes; the hot tier serves a reconnecting client,
//! the disk serves older steps and a daemon without a hot tier; a missing
//! step is `NotFound`, a job without snapshots restores nothing; a step is
//! complete only once every rank of the job committed it.

mod daemon;

use daemon::{Daemon, State, client, pattern, snapshot_committed, verify_all, wait_rank_free};
use gpusnap::proto::RestoreSource;
use gpusnap::{Dtype, Error, HostTensor, Step};

const SENTINEL: u8 = 0xA5;

/// Named host tensors built from (name, dtype, shape).
struct Set(Vec<(String, HostTensor)>);

impl Set {
    fn new(specs: &[Spec<'_>]) -> Set {
        Set(specs
            .iter()
            .map(|(name, dtype, shape)| {
                (
                    (*name).to_owned(),
                    HostTensor::zeros(*dtype, shape.to_vec()).expect("tensor"),
                )
            })
            .collect())
    }

    fn register(&self, c: &mut gpusnap::Client) {
        for (name, t) in &self.0 {
            c.register_host(name.as_str(), t).expect("register");
        }
    }

    fn fill(&self, seed: u64) {
        for (index, (_, t)) in self.0.iter().enumerate() {
            for (i, b) in t.write().iter_mut().enumerate() {
                *b = pattern(seed, index, i);
            }
        }
    }

    fn fill_with(&self, byte: u8) {
        for (_, t) in &self.0 {
            t.write().fill(byte);
        }
    }

    /// Whether every byte of every tensor is `byte`.
    fn all(&self, byte: u8) -> bool {
        self.0
            .iter()
            .all(|(_, t)| t.read().iter().all(|b| *b == byte))
    }

    /// The bytes of tensor `name`.
    fn bytes(&self, name: &str) -> Vec<u8> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.read().to_vec())
            .expect("tensor")
    }
}

/// (name, dtype, shape) of one tensor.
type Spec<'a> = (&'a str, Dtype, &'a [u64]);

const BASE: &[Spec<'_>] = &[
    ("w", Dtype::F32, &[16, 8]),
    ("b", Dtype::F32, &[128]),
    ("emb", Dtype::BF16, &[64, 4]),
    ("step", Dtype::I64, &[]),
];

#[test]
fn a_registration_that_does_not_match_is_refused_naming_the_tensor_and_buffers_stay() {
    let daemon = Daemon::start(&[]);
    let base = Set::new(BASE);
    let mut c = client(&daemon, "mis", 0, 1);
    base.register(&mut c);
    base.fill(1);
    snapshot_committed(&mut c, 1);
    base.fill(2);
    snapshot_committed(&mut c, 2);
    let (stored_1, stored_2) = {
        base.fill(1);
        let one: Vec<Vec<u8>> = BASE.iter().map(|(n, ..)| base.bytes(n)).collect();
        base.fill(2);
        let two: Vec<Vec<u8>> = BASE.iter().map(|(n, ..)| base.bytes(n)).collect();
        (one, two)
    };
    drop(c);

    let variants: Vec<(&str, Vec<Spec<'_>>, &str)> = vec![
        (
            "another shape",
            vec![
                ("w", Dtype::F32, &[8, 16]),
                ("b", Dtype::F32, &[128]),
                ("emb", Dtype::BF16, &[64, 4]),
                ("step", Dtype::I64, &[]),
            ],
            "w",
        ),
        (
            "another dtype",
            vec![
                ("w", Dtype::F32, &[16, 8]),
                ("b", Dtype::I32, &[128]),
                ("emb", Dtype::BF16, &[64, 4]),
                ("step", Dtype::I64, &[]),
            ],
            "b",
        ),
        (
            "a tensor missing",
            vec![
                ("w", Dtype::F32, &[16, 8]),
                ("b", Dtype::F32, &[128]),
                ("step", Dtype::I64, &[]),
            ],
            "emb",
        ),
        (
            "an extra tensor",
            vec![
                ("w", Dtype::F32, &[16, 8]),
                ("b", Dtype::F32, &[128]),
                ("emb", Dtype::BF16, &[64, 4]),
                ("extra", Dtype::U8, &[32]),
                ("step", Dtype::I64, &[]),
            ],
            "extra",
        ),
    ];
    let mut refused = 0.0;
    for (what, specs, culprit) in &variants {
        wait_rank_free(&daemon, "mis", 0);
        let set = Set::new(specs);
        let mut c = client(&daemon, "mis", 0, 1);
        set.register(&mut c);
        // Latest is hot (step 2); step 1 is read from disk: both refuse.
        for step in [Step::Latest, Step::At(1)] {
            set.fill_with(SENTINEL);
            match c.restore(step) {
                Err(Error::Mismatch(message)) => {
                    assert!(
                        message.contains(&format!("{culprit:?}")),
                        "{what} ({step:?}): the message names {culprit:?}: {message}"
                    );
                }
                other => panic!("{what} ({step:?}): {other:?}"),
            }
            refused += 1.0;
            assert!(
                set.all(SENTINEL),
                "{what} ({step:?}): the buffers were written"
            );
        }
    }
    assert_eq!(
        daemon.metric("gpusnap_restores_total{job=\"mis\",outcome=\"failed\",source=\"none\"}"),
        refused
    );

    // The matching set still restores both steps, exactly.
    wait_rank_free(&daemon, "mis", 0);
    let mut c = client(&daemon, "mis", 0, 1);
    let set = Set::new(BASE);
    set.register(&mut c);
    for (step, stored) in [(2, &stored_2), (1, &stored_1)] {
        set.fill_with(SENTINEL);
        let r = c.restore(Step::At(step)).expect("restore").expect("a step");
        assert_eq!(r.step, step);
        for ((name, ..), bytes) in BASE.iter().zip(stored) {
            assert_eq!(&set.bytes(name), bytes, "step {step} tensor {name}");
        }
    }
}

#[test]
fn another_registration_order_after_a_restart_restores_exact_bytes() {
    let mut daemon = Daemon::start(&[]);
    let state = State::new(7, 2 << 20);
    {
        let mut c = client(&daemon, "order", 0, 1);
        state.register(&mut c);
        state.fill(5);
        snapshot_committed(&mut c, 5);
    }
    let stopped = daemon.stop();
    assert!(stopped.success(), "{stopped}");
    daemon.restart();

    // Reversed: tensors of one element size swap places in the layout too.
    let mut c = client(&daemon, "order", 0, 1);
    for (name, t) in state.tensors.iter().rev() {
        c.register_host(name.as_str(), t).expect("register");
    }
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 5");
    assert_eq!((r.step, r.source), (5, RestoreSource::Disk));
    assert_eq!(state.differs_from(5), None);

    // Snapshotted in that order, restored in a third one from memory.
    state.fill(6);
    snapshot_committed(&mut c, 6);
    drop(c);
    wait_rank_free(&daemon, "order", 0);
    let mut c = client(&daemon, "order", 0, 1);
    let n = state.tensors.len();
    for i in 0..n {
        let (name, t) = &state.tensors[(i * 3 + 1) % n];
        c.register_host(name.as_str(), t).expect("register");
    }
    assert_eq!(c.tensors().count(), n, "a permutation of every tensor");
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 6");
    assert_eq!((r.step, r.source), (6, RestoreSource::Memory));
    assert_eq!(state.differs_from(6), None);
    state.zero();
    let r = c.restore(Step::At(5)).expect("restore").expect("step 5");
    assert_eq!((r.step, r.source), (5, RestoreSource::Disk));
    assert_eq!(state.differs_from(5), None);
    assert_eq!(verify_all(&daemon.root), 2);
}

#[test]
fn memory_for_the_newest_after_a_reconnect_disk_for_older_steps_and_missing_ones() {
    let daemon = Daemon::start(&[]);
    let state = State::new(5, 1 << 20);
    {
        let mut c = client(&daemon, "src", 0, 1);
        state.register(&mut c);
        for step in 1..=3 {
            state.fill(step);
            snapshot_committed(&mut c, step);
        }
    }
    wait_rank_free(&daemon, "src", 0);
    let mut c = client(&daemon, "src", 0, 1);
    state.register(&mut c);
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 3");
    assert_eq!((r.step, r.source), (3, RestoreSource::Memory));
    assert_eq!(r.bytes, state.byte_len());
    assert_eq!(state.differs_from(3), None);
    for step in [1, 2] {
        state.zero();
        let r = c.restore(Step::At(step)).expect("restore").expect("older");
        assert_eq!((r.step, r.source), (step, RestoreSource::Disk));
        assert_eq!(state.differs_from(step), None, "step {step}");
    }
    state.fill(42);
    match c.restore(Step::At(99)) {
        Err(Error::NotFound(message)) => assert!(message.contains("99"), "{message}"),
        other => panic!("a step never taken: {other:?}"),
    }
    assert_eq!(
        state.differs_from(42),
        None,
        "a failed restore writes nothing"
    );
    // Hot again, asked for by number.
    state.zero();
    let r = c.restore(Step::At(3)).expect("restore").expect("step 3");
    assert_eq!((r.step, r.source), (3, RestoreSource::Memory));
    assert_eq!(state.differs_from(3), None);

    // A job without snapshots.
    let mut e = client(&daemon, "nothing-yet", 0, 1);
    state.register(&mut e);
    state.fill(42);
    assert_eq!(e.restore(Step::Latest).expect("restore"), None);
    assert!(matches!(e.restore(Step::At(1)), Err(Error::NotFound(_))));
    assert_eq!(state.differs_from(42), None);
}

#[test]
fn without_a_hot_tier_every_restore_reads_the_disk() {
    let daemon = Daemon::start(&[("hot_tier", "budget_bytes", "0")]);
    let state = State::new(5, 1 << 20);
    let mut c = client(&daemon, "cold", 0, 1);
    state.register(&mut c);
    for step in 1..=2 {
        state.fill(step);
        snapshot_committed(&mut c, step);
    }
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 2");
    assert_eq!((r.step, r.source), (2, RestoreSource::Disk));
    assert_eq!(state.differs_from(2), None);
    drop(c);
    wait_rank_free(&daemon, "cold", 0);
    let mut c = client(&daemon, "cold", 0, 1);
    state.register(&mut c);
    state.zero();
    let r = c.restore(Step::Latest).expect("restore").expect("step 2");
    assert_eq!((r.step, r.source), (2, RestoreSource::Disk));
    assert_eq!(state.differs_from(2), None);
    let status = c.status().expect("status");
    assert_eq!(
        (status.hot_tier_bytes, status.hot_tier_budget_bytes),
        (0, 0)
    );
    assert_eq!(
        status
            .jobs
            .iter()
            .find(|j| j.job == "cold")
            .map(|j| j.hot_step),
        Some(None)
    );
}

#[test]
fn a_step_is_complete_only_when_every_rank_committed_it() {
    let daemon = Daemon::start(&[]);
    let s0 = State::new(3, 256 << 10);
    let s1 = State::new(4, 300 << 10);
    let mut r0 = client(&daemon, "duo", 0, 2);
    let mut r1 = client(&daemon, "duo", 1, 2);
    s0.register(&mut r0);
    s1.register(&mut r1);
    let complete = |c: &mut gpusnap::Client| -> Vec<u64> {
        let listing = c.list().expect("list");
        assert!(listing.snapshots.iter().all(|s| s.world_size == 2));
        listing
            .complete
            .iter()
            .find(|j| j.job == "duo")
            .map(|j| j.steps.clone())
            .unwrap_or_default()
    };

    s0.fill(100);
    snapshot_committed(&mut r0, 1);
    assert_eq!(complete(&mut r0), Vec::<u64>::new(), "rank 1 has no step 1");
    s0.fill(200);
    snapshot_committed(&mut r0, 2);
    s1.fill(101);
    snapshot_committed(&mut r1, 1);
    assert_eq!(complete(&mut r1), vec![1]);
    assert_eq!(r1.list().expect("list").snapshots.len(), 3);
    s1.fill(201);
    snapshot_committed(&mut r1, 2);
    assert_eq!(complete(&mut r0), vec![1, 2]);
    s0.fill(300);
    snapshot_committed(&mut r0, 3);
    assert_eq!(complete(&mut r0), vec![1, 2], "step 3 is rank 0's only");

    // Each rank restores its own bytes.
    s1.zero();
    let r = r1.restore(Step::Latest).expect("restore").expect("step 2");
    assert_eq!(r.step, 2);
    assert_eq!(s1.differs_from(201), None);
    s0.zero();
    let r = r0.restore(Step::At(2)).expect("restore").expect("step 2");
    assert_eq!(r.step, 2);
    assert_eq!(s0.differs_from(200), None);
}
