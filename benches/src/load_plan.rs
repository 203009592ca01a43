//! What `gpusnap-bench load` runs: the trainers (size, staging policy, copy
//! device), one daemon per staging policy (the policy is the daemon's
//! `staging.policy`: a client cannot pick one, it learns its daemon's in
//! the staging description), each daemon's budgets, and the memory its
//! RSS must stay within.

use gpusnap::proto::BusyPolicy;
use serde::Serialize;

/// One MiB.
const MIB: u64 = 1 << 20;
/// The three staging policies, one daemon each, in this order.
pub const POLICIES: [BusyPolicy; 3] = [BusyPolicy::Block, BusyPolicy::Skip, BusyPolicy::Stream];
/// Trainers per size in the full run, MiB: 64 trainers, 2,552 MiB in all,
/// from 1 MiB to 256 MiB with most of them small (as a node's mix of
/// small and large models).
const FULL_SIZES_MIB: [(u64, usize); 9] = [
    (1, 8),
    (2, 8),
    (4, 8),
    (8, 8),
    (16, 8),
    (32, 8),
    (64, 8),
    (128, 4),
    (256, 4),
];
/// The smoke run's trainers, MiB: one per (policy, device).
const SMOKE_SIZES_MIB: [u64; 6] = [1, 2, 4, 8, 16, 4];
/// Each stream-policy client's ring (`staging.stream_ring_bytes`): four
/// 1 MiB chunks, not the default 64 MiB, so 21 rings stay small.
pub const STREAM_RING_BYTES: u64 = 4 * MIB;
/// Slack per trainer in the staging budget above its slot (the slot is the
/// data section rounded up to 4096 bytes; a MiB covers any layout padding).
const STAGING_SLACK_PER_TRAINER: u64 = MIB;
/// The daemon's memory besides its three budgets: the binary and its
/// libraries, the async runtime, connection and lane threads and their
/// buffers, manifests, metrics. On the 2-core VM a smoke run's debug
/// daemons used at most 18 MiB beyond their budgets' bytes, and in the
/// full run each daemon's peak stayed 9-12 MiB below the three budgets
/// alone (the hot tier and the pool are not all resident at once), so 64
/// MiB is a bound with room, not a fit: a daemon past staging + hot tier +
/// I/O pool + this has a leak or an unbounded buffer.
pub const RSS_CONSTANT_BYTES: u64 = 64 * MIB;
/// Snapshots kept per (job, rank): the newest two, so the disk holds at
/// most about twice the state.
pub const KEEP_SNAPSHOTS: usize = 2;
/// The store's I/O pool (`store.io_pool_bytes`, the daemon's default).
pub const IO_POOL_BYTES: u64 = 64 * MIB;

/// Where a trainer's state lives, and so which copy device captures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadDevice {
    /// `HostTensor`s, copied by the host device (memcpy threads).
    Host,
    /// CUDA device memory (`DeviceMemory`), copied by the CUDA device: on a
    /// GPU, or on the CUDA driver double.
    Cuda,
}

impl LoadDevice {
    /// `host` or `cuda`: the job name's suffix and the JSON's word.
    pub fn name(self) -> &'static str {
        match self {
            LoadDevice::Host => "host",
            LoadDevice::Cuda => "cuda",
        }
    }

    /// The job the trainers of this device file their snapshots under.
    pub fn job(self) -> String {
        format!("load-{}", self.name())
    }
}

impl std::str::FromStr for LoadDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(LoadDevice::Host),
            "cuda" => Ok(LoadDevice::Cuda),
            other => Err(format!("unknown device {other:?} (host, cuda)")),
        }
    }
}

/// One trainer of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrainerPlan {
    /// Its number, 0-based: its rank in its job, and how errors name it.
    pub id: usize,
    /// Its state: one U8 tensor of this many bytes.
    pub size_bytes: u64,
    /// Its daemon's staging policy.
    #[serde(serialize_with = "policy_name")]
    pub policy: BusyPolicy,
    pub device: LoadDevice,
}

impl TrainerPlan {
    /// `trainer 17 (block, cuda, 256 MiB)`, for errors.
    pub fn label(&self) -> String {
        format!(
            "trainer {} ({}, {}, {})",
            self.id,
            self.policy.name(),
            self.device.name(),
            crate::units::human_bytes(self.size_bytes)
        )
    }
}

/// Serializes a policy by its config name.
pub fn policy_name<S: serde::Serializer>(p: &BusyPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

/// The run's trainers: 64 of mixed sizes (6 small ones for `--smoke`), each
/// (policy, device) pair getting a spread of sizes: trainer `i` goes to
/// policy `i % 3` and to the host device when `i` is even, else to CUDA
/// (so `i % 6` picks the pair, and every run of 8 equal sizes reaches all
/// six).
pub fn trainers(smoke: bool) -> Vec<TrainerPlan> {
    let sizes: Vec<u64> = if smoke {
        SMOKE_SIZES_MIB.to_vec()
    } else {
        FULL_SIZES_MIB
            .iter()
            .flat_map(|&(mib, count)| std::iter::repeat_n(mib, count))
            .collect()
    };
    sizes
        .into_iter()
        .enumerate()
        .map(|(id, mib)| TrainerPlan {
            id,
            size_bytes: mib * MIB,
            policy: POLICIES[id % POLICIES.len()],
            device: if id.is_multiple_of(2) {
                LoadDevice::Host
            } else {
                LoadDevice::Cuda
            },
        })
        .collect()
}

/// One daemon's budgets and the resident memory allowed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Budgets {
    /// `staging.budget_bytes`: one slot per trainer (`staging.double =
    /// false`), the stream policy's rings, a MiB of slack each.
    pub staging_bytes: u64,
    /// `hot_tier.budget_bytes`: half the daemon's trainers' state (at least
    /// its largest trainer and a MiB), so the hot tier evicts.
    pub hot_tier_bytes: u64,
    /// `store.io_pool_bytes`.
    pub io_pool_bytes: u64,
    /// [`RSS_CONSTANT_BYTES`].
    pub constant_bytes: u64,
}

impl Budgets {
    /// The budgets of the daemon serving `trainers` under `policy`.
    pub fn for_daemon(policy: BusyPolicy, trainers: &[TrainerPlan]) -> Budgets {
        let mine = trainers.iter().filter(|t| t.policy == policy);
        let (mut sum, mut largest, mut count) = (0u64, 0u64, 0u64);
        for t in mine {
            sum += t.size_bytes.next_multiple_of(4096);
            largest = largest.max(t.size_bytes);
            count += 1;
        }
        let rings = if policy == BusyPolicy::Stream {
            count * STREAM_RING_BYTES
        } else {
            0
        };
        Budgets {
            staging_bytes: sum + rings + count * STAGING_SLACK_PER_TRAINER,
            hot_tier_bytes: (sum / 2).next_multiple_of(MIB).max(largest + MIB),
            io_pool_bytes: IO_POOL_BYTES,
            constant_bytes: RSS_CONSTANT_BYTES,
        }
    }

    /// The resident memory the daemon may reach: the three budgets and the
    /// constant.
    pub fn rss_limit_bytes(&self) -> u64 {
        self.staging_bytes + self.hot_tier_bytes + self.io_pool_bytes + self.constant_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_run_is_64_mixed_trainers_over_every_policy_and_device() {
        let t = trainers(false);
        assert_eq!(t.len(), 64);
        assert_eq!(t.iter().map(|t| t.size_bytes).sum::<u64>(), 2552 * MIB);
        assert_eq!(t.iter().map(|t| t.size_bytes).min(), Some(MIB));
        assert_eq!(t.iter().map(|t| t.size_bytes).max(), Some(256 * MIB));
        for policy in POLICIES {
            for device in [LoadDevice::Host, LoadDevice::Cuda] {
                let group: Vec<_> = t
                    .iter()
                    .filter(|t| t.policy == policy && t.device == device)
                    .collect();
                assert!(
                    group.len() >= 10,
                    "{} {}: {} trainers",
                    policy.name(),
                    device.name(),
                    group.len()
                );
                let sizes: std::collections::BTreeSet<u64> =
                    group.iter().map(|t| t.size_bytes).collect();
                assert!(
                    sizes.len() >= 6,
                    "{} {}: sizes {sizes:?}",
                    policy.name(),
                    device.name()
                );
            }
            assert!(
                t.iter()
                    .any(|t| t.policy == policy && t.size_bytes == 256 * MIB),
                "every policy has a 256 MiB trainer"
            );
        }
        let cuda = t.iter().filter(|t| t.device == LoadDevice::Cuda).count();
        assert_eq!(cuda, 32, "half on each device");
    }

    #[test]
    fn the_smoke_run_has_one_trainer_per_policy_and_device() {
        let t = trainers(true);
        let pairs: std::collections::BTreeSet<(&str, LoadDevice)> =
            t.iter().map(|t| (t.policy.name(), t.device)).collect();
        assert_eq!(pairs.len(), 6);
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn staging_holds_one_slot_each_and_the_hot_tier_less_than_all() {
        let t = trainers(false);
        for policy in POLICIES {
            let mine: Vec<_> = t.iter().filter(|t| t.policy == policy).collect();
            let sum: u64 = mine.iter().map(|t| t.size_bytes).sum();
            let largest = mine.iter().map(|t| t.size_bytes).max().unwrap_or(0);
            let b = Budgets::for_daemon(policy, &t);
            assert!(b.staging_bytes >= sum, "every trainer gets a slot");
            assert!(
                b.staging_bytes < 2 * sum,
                "two slots each would not fit: the policy decides"
            );
            assert!(b.hot_tier_bytes > largest && b.hot_tier_bytes < sum);
            assert_eq!(
                b.rss_limit_bytes(),
                b.staging_bytes + b.hot_tier_bytes + IO_POOL_BYTES + RSS_CONSTANT_BYTES
            );
        }
        let stream = Budgets::for_daemon(BusyPolicy::Stream, &t);
        let block = Budgets::for_daemon(BusyPolicy::Block, &t);
        let n = |p| t.iter().filter(|t| t.policy == p).count() as u64;
        let sum = |p| {
            t.iter()
                .filter(|t| t.policy == p)
                .map(|t| t.size_bytes)
                .sum::<u64>()
        };
        assert_eq!(
            stream.staging_bytes,
            sum(BusyPolicy::Stream) + n(BusyPolicy::Stream) * (STREAM_RING_BYTES + MIB),
            "the stream daemon's budget has each client's ring"
        );
        assert_eq!(
            block.staging_bytes,
            sum(BusyPolicy::Block) + n(BusyPolicy::Block) * MIB
        );
    }

    #[test]
    fn labels_and_devices_read_back() {
        let t = TrainerPlan {
            id: 17,
            size_bytes: 256 * MIB,
            policy: BusyPolicy::Block,
            device: LoadDevice::Cuda,
        };
        assert_eq!(t.label(), "trainer 17 (block, cuda, 256 MiB)");
        assert_eq!("cuda".parse::<LoadDevice>(), Ok(LoadDevice::Cuda));
        assert_eq!(LoadDevice::Host.job(), "load-host");
        assert!("gpu".parse::<LoadDevice>().is_err());
    }
}
