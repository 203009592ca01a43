//! gpusnap-demo: a small trainer whose state lives in host memory, killed
//! with SIGKILL in the middle of its schedule and resumed from the daemon,
//! ending bit-for-bit where an uninterrupted run ends.
//!
//! ```text
//! gpusnap-demo [run] [--socket S] [--job J] [--steps 60] [--every 10] [--kill-at 40]
//!                    [--state-mib 256] [--threads N] [--timeout-s 300]
//! gpusnap-demo reference [--steps 60] [--state-mib 256] [--threads N]
//! gpusnap-demo train [--socket S] [--job J] [--steps 60] [--every 10] [--kill-at K]
//!                    [--state-mib 256] [--threads N]
//! ```
//!
//! * `reference` runs the whole schedule without gpusnap and prints the
//!   CRC32 of every tensor's bytes, in registration order.
//! * `train` registers the state with `gpusnapd`, restores the newest
//!   snapshot of the job if there is one (the step counter is part of the
//!   state), trains to `--steps` and snapshots every `--every` steps. Each
//!   snapshot's copy overlaps the next step's gradient computation (which
//!   only reads the weights); the optimizer update waits for the capture.
//!   With `--kill-at K` it SIGKILLs itself at step K: when K is a snapshot
//!   step, right after the daemon accepted that capture and before its
//!   commit is known, so that what survives is a snapshot the trainer never
//!   saw committed. Every event is a line `@event key=value ...` on stdout.
//! * `run` (the default) computes the reference in-process, runs `train`
//!   as a child that kills itself, runs a second `train` child that resumes
//!   from what the daemon restores, and checks that the restored state is
//!   the reference's state at that step and that the final state is the
//!   reference's final state, bit for bit. It prints the figures (stall per
//!   snapshot, persist throughput, restore source and time), and exits
//!   non-zero, saying why, when anything did not hold.
//!
//! The state: per parameter an F32 weight and its Adam moments `m` and `v`
//! (a 12-layer transformer's shapes, sized to `--state-mib`), a BF16 shadow
//! of the embedding, a U8 data-loader mask, an I64 step counter and a U64
//! RNG state. The gradient is synthetic but deterministic (a pull towards a
//! hashed target plus hashed noise of the step), and every update is plain
//! f32 arithmetic, element by element, so the result does not depend on how
//! the work is split across threads.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpusnap::proto::convert::nanos;
use gpusnap::{Client, ClientConfig, Dtype, HostTensor, SnapshotOutcome, Step};

const USAGE: &str = "\
usage: gpusnap-demo [run] [--socket S] [--job J] [--steps 60] [--every 10] [--kill-at 40]
                          [--state-mib 256] [--threads N] [--timeout-s 300]
       gpusnap-demo reference [--steps 60] [--state-mib 256] [--threads N]
       gpusnap-demo train [--socket S] [--job J] [--steps 60] [--every 10] [--kill-at K]
                          [--state-mib 256] [--threads N]
The socket defaults to $GPUSNAP_SOCKET, else /run/gpusnap/gpusnapd.sock.";

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------- options

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Run,
    Reference,
    Train,
}

#[derive(Debug, Clone)]
struct Opts {
    mode: Mode,
    socket: Option<PathBuf>,
    job: Option<String>,
    steps: u64,
    every: u64,
    kill_at: Option<u64>,
    state_mib: u64,
    threads: usize,
    timeout_s: u64,
}

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut opts = Opts {
            mode: Mode::Run,
            socket: None,
            job: None,
            steps: 60,
            every: 10,
            kill_at: None,
            state_mib: 256,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            timeout_s: 300,
        };
        let mut rest = args.iter();
        let mut first = true;
        while let Some(arg) = rest.next() {
            if first {
                first = false;
                let mode = match arg.as_str() {
                    "run" => Some(Mode::Run),
                    "reference" => Some(Mode::Reference),
                    "train" => Some(Mode::Train),
                    _ => None,
                };
                if let Some(mode) = mode {
                    opts.mode = mode;
                    continue;
                }
            }
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            if key == "-h" || key == "--help" {
                return Err(USAGE.to_owned());
            }
            let mut value = || -> Res<String> {
                inline
                    .clone()
                    .or_else(|| rest.next().cloned())
                    .ok_or_else(|| format!("{key} needs a value\n{USAGE}"))
            };
            let number = |v: String| -> Res<u64> {
                v.parse()
                    .map_err(|_| format!("{key} {v:?} is not a whole number"))
            };
            match key {
                "--socket" => opts.socket = Some(PathBuf::from(value()?)),
                "--job" => opts.job = Some(value()?),
                "--steps" => opts.steps = number(value()?)?,
                "--every" => opts.every = number(value()?)?,
                "--kill-at" => opts.kill_at = Some(number(value()?)?),
                "--state-mib" => opts.state_mib = number(value()?)?,
                "--threads" => {
                    opts.threads = usize::try_from(number(value()?)?)
                        .map_err(|_| "--threads is too large".to_owned())?;
                }
                "--timeout-s" => opts.timeout_s = number(value()?)?,
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        if opts.mode == Mode::Run && opts.kill_at.is_none() {
            // Two thirds into the schedule, on a snapshot step.
            opts.kill_at = Some((opts.steps * 2 / 3) / opts.every.max(1) * opts.every.max(1));
        }
        opts.check()?;
        Ok(opts)
    }

    fn check(&self) -> Res<()> {
        if self.steps == 0 {
            return Err("--steps must be at least 1".into());
        }
        if self.every == 0 {
            return Err("--every must be at least 1".into());
        }
        if !(1..=65536).contains(&self.state_mib) {
            return Err("--state-mib must be in 1..=65536".into());
        }
        if !(1..=256).contains(&self.threads) {
            return Err("--threads must be in 1..=256".into());
        }
        if let Some(k) = self.kill_at
            && (k < self.every || k >= self.steps)
        {
            return Err(format!(
                "--kill-at {k} must be at least --every {} (a snapshot must commit first) \
                 and below --steps {} (something must be left to resume)",
                self.every, self.steps
            ));
        }
        if let Some(job) = &self.job
            && job.is_empty()
        {
            return Err("--job must not be empty".into());
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ state

/// Deterministic 64-bit mix (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A value in [-1, 1) from the hash of (`seed`, `j`).
fn unit(seed: u64, j: u64) -> f32 {
    let h = mix(seed ^ j.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // 24 bits: exact in an f32.
    (h >> 40) as f32 * (2.0 / 16_777_216.0) - 1.0
}

/// f32 to bf16, round to nearest even (the inputs are finite).
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    let [_, _, lo, hi] = rounded.to_le_bytes();
    u16::from_le_bytes([lo, hi])
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
const LR: f32 = 1e-3;
const LAYERS: usize = 12;
const VOCAB: u64 = 2048;
const MASK_BYTES: u64 = 4096;

/// One parameter: its weight, Adam moments and gradient scratch.
struct Param {
    w: HostTensor,
    m: HostTensor,
    v: HostTensor,
    seed: u64,
    /// The gradient of the next step (not part of the state).
    grad: Vec<f32>,
}

/// The trainer's state, every tensor in registration order.
struct Model {
    /// (name, tensor) in registration (and digest) order.
    tensors: Vec<(String, HostTensor)>,
    params: Vec<Param>,
    /// Index in `params` of the embedding, which has a BF16 shadow.
    embed: usize,
    shadow: HostTensor,
    mask: HostTensor,
    step: HostTensor,
    rng: HostTensor,
    threads: usize,
}

/// Parameter shapes of a 12-layer transformer of width `d`.
fn param_shapes(d: u64) -> Vec<(String, Vec<u64>)> {
    let mut shapes = vec![("model.embed.weight".to_owned(), vec![VOCAB, d])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.ln1.weight"), vec![d]),
            (format!("{p}.attn.qkv.weight"), vec![3 * d, d]),
            (format!("{p}.attn.qkv.bias"), vec![3 * d]),
            (format!("{p}.attn.out.weight"), vec![d, d]),
            (format!("{p}.ln2.weight"), vec![d]),
            (format!("{p}.mlp.up.weight"), vec![4 * d, d]),
            (format!("{p}.mlp.up.bias"), vec![4 * d]),
            (format!("{p}.mlp.down.weight"), vec![d, 4 * d]),
        ]);
    }
    shapes.push(("model.norm.weight".to_owned(), vec![d]));
    shapes
}

fn state_bytes(d: u64) -> u64 {
    let params: u64 = param_shapes(d)
        .iter()
        .map(|(_, s)| s.iter().product::<u64>())
        .sum();
    // F32 weight, m, v; BF16 shadow of the embedding; mask; step; rng.
    params * 12 + VOCAB * d * 2 + MASK_BYTES + 8 + 16
}

impl Model {
    fn new(state_mib: u64, threads: usize) -> Res<Model> {
        let budget = state_mib << 20;
        let mut d = 8;
        while state_bytes(d + 8) <= budget {
            d += 8;
        }
        let zeros = |dtype, shape: &[u64]| {
            HostTensor::zeros(dtype, shape.to_vec()).map_err(|e| format!("allocating: {e}"))
        };
        let mut tensors = Vec::new();
        let mut params = Vec::new();
        for (i, (name, shape)) in param_shapes(d).into_iter().enumerate() {
            let seed = mix(0x6770_7573_6e61_7000 ^ i as u64);
            let w = zeros(Dtype::F32, &shape)?;
            {
                let mut guard = w.write();
                for (j, x) in guard.as_mut_slice::<f32>().iter_mut().enumerate() {
                    *x = 0.02 * unit(seed, j as u64);
                }
            }
            let m = zeros(Dtype::F32, &shape)?;
            let v = zeros(Dtype::F32, &shape)?;
            tensors.push((name.clone(), w.clone()));
            tensors.push((format!("optim.adam.m.{name}"), m.clone()));
            tensors.push((format!("optim.adam.v.{name}"), v.clone()));
            let n = usize::try_from(shape.iter().product::<u64>())
                .map_err(|_| "the state does not fit in memory".to_owned())?;
            params.push(Param {
                w,
                m,
                v,
                seed,
                grad: vec![0.0; n],
            });
        }
        let shadow = zeros(Dtype::BF16, &[VOCAB, d])?;
        let mask = zeros(Dtype::U8, &[MASK_BYTES])?;
        let step = zeros(Dtype::I64, &[1])?;
        let rng = HostTensor::from_slice(Dtype::U64, vec![2], &[0x853c_49e6_748f_ea9b_u64, 1])
            .map_err(|e| format!("allocating: {e}"))?;
        tensors.push(("model.embed.weight.bf16".into(), shadow.clone()));
        tensors.push(("data.loader.mask".into(), mask.clone()));
        tensors.push(("trainer.step".into(), step.clone()));
        tensors.push(("trainer.rng".into(), rng.clone()));
        let model = Model {
            tensors,
            params,
            embed: 0,
            shadow,
            mask,
            step,
            rng,
            threads,
        };
        model.update_shadow();
        Ok(model)
    }

    fn bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, t)| t.byte_len() as u64).sum()
    }

    /// The completed steps, as the state says.
    fn step_value(&self) -> Res<u64> {
        let value = self.step.read().as_slice::<i64>().first().copied();
        value
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| format!("trainer.step holds {value:?}"))
    }

    /// CRC32 of every tensor's bytes, in registration order.
    fn digest(&self) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        for (_, t) in &self.tensors {
            crc.update(&t.read());
        }
        crc.finalize()
    }

    /// Runs `work` on every parameter, spread over the threads.
    fn each_param(&mut self, work: impl Fn(&mut Param) + Sync) {
        let queue = Mutex::new(self.params.iter_mut());
        let next = || queue.lock().unwrap_or_else(PoisonError::into_inner).next();
        std::thread::scope(|scope| {
            for _ in 1..self.threads {
                scope.spawn(|| {
                    while let Some(p) = next() {
                        work(p);
                    }
                });
            }
            while let Some(p) = next() {
                work(p);
            }
        });
    }

    /// "Forward and backward" of `step`: reads the weights only, so it runs
    /// while a capture holds them.
    fn gradients(&mut self, step: u64) {
        self.each_param(|p| {
            let w = p.w.read();
            let noise_seed = mix(p.seed ^ step.wrapping_mul(0xd6e8_feb8_6659_fd93));
            for (j, (g, &x)) in p.grad.iter_mut().zip(w.as_slice::<f32>()).enumerate() {
                let j = j as u64;
                *g = (x - 0.5 * unit(p.seed, j)) + 0.1 * unit(noise_seed, j);
            }
        });
    }

    /// The optimizer step `step` with the gradients of that step, and the
    /// rest of the state: shadow, mask, RNG, counter.
    fn apply(&mut self, step: u64) -> Res<()> {
        let t = step as f32;
        let bc1 = 1.0 - BETA1.powf(t);
        let bc2 = 1.0 - BETA2.powf(t);
        self.each_param(|p| {
            let mut w = p.w.write();
            let mut m = p.m.write();
            let mut v = p.v.write();
            let w = w.as_mut_slice::<f32>();
            let m = m.as_mut_slice::<f32>();
            let v = v.as_mut_slice::<f32>();
            for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(&p.grad) {
                *m = BETA1 * *m + (1.0 - BETA1) * g;
                *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                *w -= LR * (*m / bc1) / ((*v / bc2).sqrt() + EPS);
            }
        });
        self.update_shadow();
        let draw = {
            let mut rng = self.rng.write();
            let s = rng.as_mut_slice::<u64>();
            let [a, b] = [s[0], s[1]];
            // xorshift128+
            let mut x = a;
            x ^= x << 23;
            let next = x ^ b ^ (x >> 17) ^ (b >> 26);
            s[0] = b;
            s[1] = next;
            next.wrapping_add(b)
        };
        for (j, byte) in self.mask.write().iter_mut().enumerate() {
            *byte ^= mix(draw ^ j as u64).to_le_bytes()[0];
        }
        let counter = i64::try_from(step).map_err(|_| format!("step {step} is too large"))?;
        self.step.write().as_mut_slice::<i64>()[0] = counter;
        Ok(())
    }

    fn update_shadow(&self) {
        let w = self.params[self.embed].w.read();
        let mut shadow = self.shadow.write();
        for (s, &x) in shadow
            .as_mut_slice::<u16>()
            .iter_mut()
            .zip(w.as_slice::<f32>())
        {
            *s = bf16(x);
        }
    }

    /// The uninterrupted schedule; the digest after every snapshot step and
    /// after the last.
    fn reference(&mut self, steps: u64, every: u64) -> Res<BTreeMap<u64, u32>> {
        let mut digests = BTreeMap::new();
        for s in 1..=steps {
            self.gradients(s);
            self.apply(s)?;
            if s % every == 0 || s == steps {
                digests.insert(s, self.digest());
            }
        }
        Ok(digests)
    }
}

// ------------------------------------------------------------- formatting

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        return f64::INFINITY;
    }
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// One `@event key=value ...` line on stdout, flushed.
fn emit(event: &str, fields: &[(&str, String)]) -> Res<()> {
    let mut line = format!("@{event}");
    for (k, v) in fields {
        line.push_str(&format!(" {k}={v}"));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing to stdout: {e}"))
}

fn hex(crc: u32) -> String {
    format!("0x{crc:08x}")
}

// ------------------------------------------------------------------ train

fn connect(opts: &Opts, job: &str) -> Res<Client> {
    let mut config = ClientConfig::new(job);
    if let Some(s) = &opts.socket {
        config.socket = s.clone();
    }
    Client::with_config(config)
        .map_err(|e| format!("{e} (is gpusnapd running? --socket names its socket)"))
}

fn kill_self() -> Res<()> {
    use nix::sys::signal::{Signal, kill};
    kill(nix::unistd::Pid::this(), Signal::SIGKILL).map_err(|e| format!("kill(SIGKILL): {e}"))?;
    // SIGKILL to oneself is delivered before kill(2) returns; never reached.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits for the commit of `step` and reports it.
fn await_commit(client: &mut Client, step: u64) -> Res<()> {
    let info = client
        .wait_committed(step)
        .map_err(|e| format!("snapshot {step} did not commit: {e}"))?;
    emit(
        "committed",
        &[
            ("step", step.to_string()),
            ("bytes", info.bytes.to_string()),
            ("persist_ns", nanos(info.persist).to_string()),
        ],
    )
}

fn train(opts: &Opts) -> Res<()> {
    let job = opts
        .job
        .clone()
        .ok_or_else(|| "train needs --job".to_owned())?;
    let who = format!("gpusnap-demo train (pid {})", std::process::id());
    let mut model = Model::new(opts.state_mib, opts.threads)?;
    let mut client = connect(opts, &job)?;
    for (name, t) in &model.tensors {
        client
            .register_host(name.clone(), t)
            .map_err(|e| format!("registering {name}: {e}"))?;
    }
    let started = Instant::now();
    let restored = client
        .restore(Step::Latest)
        .map_err(|e| format!("restore: {e}"))?;
    let restore_wall = started.elapsed();
    let start = match restored {
        None => {
            emit("start", &[("step", "0".into())])?;
            eprintln!("{who}: no snapshot of job {job}: starting at step 0");
            0
        }
        Some(info) => {
            let step = model.step_value()?;
            if step != info.step {
                return Err(format!(
                    "restored snapshot {} but its trainer.step says {step}",
                    info.step
                ));
            }
            emit(
                "restored",
                &[
                    ("step", step.to_string()),
                    ("source", info.source.name().into()),
                    ("bytes", info.bytes.to_string()),
                    ("daemon_fill_ns", nanos(info.daemon_fill).to_string()),
                    ("copy_ns", nanos(info.copy).to_string()),
                    ("wall_ns", nanos(restore_wall).to_string()),
                    ("digest", hex(model.digest())),
                ],
            )?;
            eprintln!(
                "{who}: restored step {step} from {} in {:.1} ms",
                info.source.name(),
                ms(restore_wall)
            );
            step
        }
    };
    if start > opts.steps {
        return Err(format!(
            "the job's newest snapshot is step {start}, past --steps {}",
            opts.steps
        ));
    }
    // Captured, commit not yet reported; oldest first.
    let mut outstanding: Vec<u64> = Vec::new();
    let mut committed = 0_usize;
    if start < opts.steps {
        model.gradients(start + 1);
    }
    for s in start + 1..=opts.steps {
        model.apply(s)?;
        let last = s == opts.steps;
        if s % opts.every == 0 {
            // At most two snapshots in flight (the daemon's double slots):
            // report the older ones' commits before the next capture.
            while outstanding.len() > 1 {
                let step = outstanding.remove(0);
                await_commit(&mut client, step)?;
                committed += 1;
            }
            let mut handle = client
                .snapshot_begin(s)
                .map_err(|e| format!("snapshot {s}: {e}"))?;
            if !last {
                // Forward and backward of the next step, while the copy runs.
                model.gradients(s + 1);
            }
            let outcome = handle
                .wait_captured()
                .map_err(|e| format!("snapshot {s}: {e}"))?;
            drop(handle);
            match outcome {
                SnapshotOutcome::Captured(info) => {
                    outstanding.push(s);
                    emit(
                        "captured",
                        &[
                            ("step", s.to_string()),
                            ("bytes", info.bytes.to_string()),
                            ("capture_ns", nanos(info.capture).to_string()),
                            ("stall_ns", nanos(info.stall).to_string()),
                        ],
                    )?;
                    eprintln!(
                        "{who}: step {s}: snapshot captured, stall {:.2} ms",
                        ms(info.stall)
                    );
                }
                SnapshotOutcome::Skipped { step, reason } => {
                    emit("skipped", &[("step", step.to_string())])?;
                    eprintln!("{who}: step {s}: snapshot skipped by the daemon: {reason}");
                }
            }
        } else if !last {
            model.gradients(s + 1);
        }
        if opts.kill_at == Some(s) {
            // Every commit but the newest capture's is reported first (and
            // that one too if nothing has committed yet): what the restore
            // then finds is a snapshot this process never saw committed.
            while outstanding.len() > 1 || (committed == 0 && !outstanding.is_empty()) {
                let step = outstanding.remove(0);
                await_commit(&mut client, step)?;
                committed += 1;
            }
            if committed == 0 {
                return Err(format!("no snapshot committed before step {s}"));
            }
            let newest = outstanding.last().copied();
            emit(
                "killing",
                &[
                    ("step", s.to_string()),
                    (
                        "uncommitted",
                        newest.map_or("none".into(), |n| n.to_string()),
                    ),
                ],
            )?;
            eprintln!("{who}: step {s}: SIGKILL");
            kill_self()?;
        }
    }
    for step in std::mem::take(&mut outstanding) {
        await_commit(&mut client, step)?;
    }
    let digest = model.digest();
    emit(
        "done",
        &[("step", opts.steps.to_string()), ("digest", hex(digest))],
    )?;
    eprintln!("{who}: finished step {}: crc32 {}", opts.steps, hex(digest));
    Ok(())
}

// -------------------------------------------------------------------- run

/// One `@event` line, parsed.
#[derive(Debug, Clone)]
struct Event {
    kind: String,
    fields: BTreeMap<String, String>,
}

impl Event {
    fn parse(line: &str) -> Option<Event> {
        let mut words = line.strip_prefix('@')?.split_whitespace();
        let kind = words.next()?.to_owned();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Event { kind, fields })
    }

    fn text(&self, key: &str) -> Res<&str> {
        self.fields
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("trainer event @{} has no {key}", self.kind))
    }

    fn num(&self, key: &str) -> Res<u64> {
        let t = self.text(key)?;
        t.parse()
            .map_err(|_| format!("trainer event @{} has {key}={t}", self.kind))
    }

    fn ns(&self, key: &str) -> Res<Duration> {
        self.num(key).map(Duration::from_nanos)
    }
}

/// A finished `train` child.
struct Child {
    pid: u32,
    status: ExitStatus,
    events: Vec<Event>,
}

impl Child {
    fn of(&self, kind: &str) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |e| e.kind == kind)
    }

    fn one(&self, kind: &str) -> Option<&Event> {
        self.of(kind).next()
    }
}

fn spawn_train(opts: &Opts, job: &str, kill_at: Option<u64>) -> Res<Child> {
    let exe = std::env::current_exe().map_err(|e| format!("finding my own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("train")
        .args(["--job", job])
        .args(["--steps", &opts.steps.to_string()])
        .args(["--every", &opts.every.to_string()])
        .args(["--state-mib", &opts.state_mib.to_string()])
        .args(["--threads", &opts.threads.to_string()]);
    if let Some(s) = &opts.socket {
        cmd.arg("--socket").arg(s);
    }
    if let Some(k) = kill_at {
        cmd.args(["--kill-at", &k.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the trainer: {e}"))?;
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| "the trainer has no stdout".to_owned())?;
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| Event::parse(&l))
            .collect::<Vec<Event>>()
    });
    let deadline = Instant::now() + Duration::from_secs(opts.timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "trainer pid {pid} did not finish within --timeout-s {}; killed it",
                    opts.timeout_s
                ));
            }
            Err(e) => return Err(format!("waiting for trainer pid {pid}: {e}")),
        }
    };
    let events = reader
        .join()
        .map_err(|_| "the trainer's output reader panicked".to_owned())?;
    Ok(Child {
        pid,
        status,
        events,
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn run(opts: &Opts) -> Res<()> {
    let kill_at = opts
        .kill_at
        .ok_or_else(|| "run needs --kill-at".to_owned())?;
    let job = opts.job.clone().unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("gpusnap-demo-{secs}-{}", std::process::id())
    });
    let say = |line: String| println!("gpusnap-demo: {line}");

    // The job must be new: the first trainer starts from step 0.
    let mut client = connect(opts, &job)?;
    let listing = client
        .list()
        .map_err(|e| format!("listing job {job}: {e}"))?;
    let existing: Vec<u64> = listing
        .snapshots
        .iter()
        .filter(|s| s.job == job)
        .map(|s| s.step)
        .collect();
    if !existing.is_empty() {
        return Err(format!(
            "job {job} already has snapshots (steps {existing:?}); pass a new --job"
        ));
    }
    let socket = client.config().socket.display().to_string();
    drop(client);

    let started = Instant::now();
    let mut model = Model::new(opts.state_mib, opts.threads)?;
    say(format!(
        "state: {} tensors, {:.1} MiB (F32 weights and Adam moments, BF16, U8, I64, U64); \
         {} steps, a snapshot every {}, SIGKILL at step {kill_at}; daemon {socket}, job {job}",
        model.tensors.len(),
        mib(model.bytes()),
        opts.steps,
        opts.every
    ));
    let digests = model.reference(opts.steps, opts.every)?;
    let reference = *digests
        .get(&opts.steps)
        .ok_or_else(|| "the reference has no final digest".to_owned())?;
    say(format!(
        "reference: {} steps uninterrupted, without gpusnap, in {:.1} s: crc32 {}",
        opts.steps,
        started.elapsed().as_secs_f64(),
        hex(reference)
    ));
    let state_bytes = model.bytes();
    drop(model);

    // Trainer 1: from step 0 until it kills itself.
    let first = spawn_train(opts, &job, Some(kill_at))?;
    let fail1 = |why: String| format!("trainer 1 (pid {}): {why}", first.pid);
    if first.status.signal() != Some(libc::SIGKILL) {
        return Err(fail1(format!(
            "ended with {} instead of SIGKILL at step {kill_at}",
            first.status
        )));
    }
    if first.one("start").is_none() {
        return Err(fail1("did not start from step 0".into()));
    }
    let killed = first
        .one("killing")
        .ok_or_else(|| fail1("was killed before it reached the kill step".into()))?;
    if killed.num("step")? != kill_at {
        return Err(fail1(format!(
            "killed itself at step {}, not {kill_at}",
            killed.text("step")?
        )));
    }
    let captured1: Vec<u64> = first
        .of("captured")
        .map(|e| e.num("step"))
        .collect::<Res<_>>()?;
    let newest = *captured1
        .last()
        .ok_or_else(|| fail1("captured no snapshot".into()))?;
    if first.one("committed").is_none() {
        return Err(fail1("saw no snapshot commit before the kill".into()));
    }
    let uncommitted = killed.text("uncommitted")?.to_owned();

    // Trainer 2: restores, resumes, finishes.
    let second = spawn_train(opts, &job, None)?;
    let fail2 = |why: String| format!("trainer 2 (pid {}): {why}", second.pid);
    if !second.status.success() {
        return Err(fail2(format!("ended with {}", second.status)));
    }
    let restored = second
        .one("restored")
        .ok_or_else(|| fail2("restored nothing".into()))?;
    let resumed = restored.num("step")?;
    if resumed != newest {
        return Err(fail2(format!(
            "restored step {resumed}, but step {newest} was captured (accepted by the \
             daemon) before trainer 1 died: a captured snapshot must survive its trainer"
        )));
    }
    let want = *digests
        .get(&resumed)
        .ok_or_else(|| format!("the reference has no digest of step {resumed}"))?;
    let got = restored.text("digest")?;
    if got != hex(want) {
        return Err(fail2(format!(
            "the restored state of step {resumed} has crc32 {got}; the reference's state \
             after step {resumed} has {}",
            hex(want)
        )));
    }
    let done = second
        .one("done")
        .ok_or_else(|| fail2("did not report its final state".into()))?;
    let captured2: Vec<u64> = second
        .of("captured")
        .map(|e| e.num("step"))
        .collect::<Res<_>>()?;

    // Figures.
    let captures: Vec<&Event> = first.of("captured").chain(second.of("captured")).collect();
    let stalls: Vec<Duration> = captures
        .iter()
        .map(|e| e.ns("stall_ns"))
        .collect::<Res<_>>()?;
    let copies: Vec<Duration> = captures
        .iter()
        .map(|e| e.ns("capture_ns"))
        .collect::<Res<_>>()?;
    let mut rates = Vec::new();
    for e in first.of("committed").chain(second.of("committed")) {
        let persist = e.ns("persist_ns")?;
        if !persist.is_zero() {
            rates.push(mb_per_s(e.num("bytes")?, persist));
        }
    }
    rates.sort_by(f64::total_cmp);
    let skipped = first.of("skipped").count() + second.of("skipped").count();
    let list = |v: &[u64]| {
        if v.is_empty() {
            return "none".to_owned();
        }
        v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
    };
    let kill_note = if uncommitted != newest.to_string() {
        format!("at step {kill_at}, after its last snapshot (step {newest}) committed")
    } else if kill_at == newest {
        format!(
            "right after the daemon accepted step {newest}'s capture, before its commit was reported"
        )
    } else {
        format!(
            "at step {kill_at}, before the commit of its last snapshot (step {newest}) was reported"
        )
    };
    say(format!(
        "trainer 1 (pid {}): steps 1..{kill_at}, snapshots {}; SIGKILLed {kill_note}",
        first.pid,
        list(&captured1)
    ));
    say(format!(
        "trainer 2 (pid {}): restored step {resumed} (state identical to the reference's at step {resumed}), \
         trained {}..{}, snapshots {}",
        second.pid,
        resumed + 1,
        opts.steps,
        list(&captured2)
    ));
    let restore_bytes = restored.num("bytes")?;
    let restore_wall = restored.ns("wall_ns")?;
    println!(
        "figures ({:.1} MiB of state per snapshot):",
        mib(state_bytes)
    );
    println!(
        "  stall per snapshot   min {:.2} ms, median {:.2} ms over {} snapshots{}",
        ms(stalls.iter().min().copied().unwrap_or_default()),
        ms(median(stalls.clone())),
        stalls.len(),
        if skipped > 0 {
            format!(" ({skipped} skipped)")
        } else {
            String::new()
        }
    );
    let by_step = captures
        .iter()
        .zip(&stalls)
        .map(|(e, stall)| Ok(format!("{}: {:.1}", e.num("step")?, ms(*stall))))
        .collect::<Res<Vec<String>>>()?
        .join(", ");
    println!("    by step (ms)       {by_step}");
    println!(
        "    the copy (median {:.1} ms) runs while the next step's gradient is computed; the \
         last step's has nothing to overlap, and a staging slot's first capture also faults \
         in its pages",
        ms(median(copies))
    );
    match (rates.first(), rates.last()) {
        (Some(lo), Some(hi)) => println!(
            "  persist              median {:.0} MB/s (min {lo:.0}, max {hi:.0}) over {} commits",
            rates[rates.len() / 2],
            rates.len()
        ),
        _ => println!("  persist              no commit reported its persist time"),
    }
    println!(
        "  restore              step {resumed} from {}: {:.1} ms ({:.0} MB/s; daemon fill {:.1} ms, copy into the tensors {:.1} ms)",
        restored.text("source")?,
        ms(restore_wall),
        mb_per_s(restore_bytes, restore_wall),
        ms(restored.ns("daemon_fill_ns")?),
        ms(restored.ns("copy_ns")?)
    );
    println!(
        "  wall time            {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    let final_digest = done.text("digest")?;
    if done.num("step")? != opts.steps || final_digest != hex(reference) {
        return Err(fail2(format!(
            "the final state (step {}) has crc32 {final_digest}; the uninterrupted run's has {}",
            done.text("step")?,
            hex(reference)
        )));
    }
    say(format!(
        "OK: resumed from step {resumed} after SIGKILL; final state is bit-for-bit the \
         uninterrupted run's (crc32 {})",
        hex(reference)
    ));
    Ok(())
}

fn reference(opts: &Opts) -> Res<()> {
    let started = Instant::now();
    let mut model = Model::new(opts.state_mib, opts.threads)?;
    let digests = model.reference(opts.steps, opts.every)?;
    let last = digests
        .get(&opts.steps)
        .ok_or_else(|| "no final digest".to_owned())?;
    println!(
        "gpusnap-demo: reference: {} tensors, {:.1} MiB, {} steps in {:.1} s: crc32 {}",
        model.tensors.len(),
        mib(model.bytes()),
        opts.steps,
        started.elapsed().as_secs_f64(),
        hex(*last)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("gpusnap-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match opts.mode {
        Mode::Run => run(&opts),
        Mode::Reference => reference(&opts),
        Mode::Train => train(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpusnap-demo: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}
