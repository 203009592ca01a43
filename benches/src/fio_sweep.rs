//! The disk's limit as fio finds it: a small sweep of settings (iodepth
//! 16/32/64 × block 1 MiB/4 MiB), each a write then a read of the same
//! size on the same directory as the run's other figures, and the best
//! MB/s per direction (the single-setting run of the same benchmark counts
//! too: [`SweepSummary::consider`]). `store` and `e2e` report their figures
//! against this best beside the single setting (`--fio-iodepth`, 1 MiB),
//! which is not always the disk's limit.

use std::path::Path;

use serde::Serialize;

use crate::fio::{self, Direction, Setting};
use crate::workdir::CacheDropper;

/// The swept settings, in the order they run.
pub const SETTINGS: [Setting; 6] = [
    Setting {
        iodepth: 16,
        block: 1 << 20,
    },
    Setting {
        iodepth: 32,
        block: 1 << 20,
    },
    Setting {
        iodepth: 64,
        block: 1 << 20,
    },
    Setting {
        iodepth: 16,
        block: 4 << 20,
    },
    Setting {
        iodepth: 32,
        block: 4 << 20,
    },
    Setting {
        iodepth: 64,
        block: 4 << 20,
    },
];

/// One setting's write and read, MB/s (1e6 bytes); `None` where that fio
/// run failed (the failure is in [`Sweep::errors`]).
#[derive(Debug, Clone, Serialize)]
pub struct SweepEntry {
    pub setting: Setting,
    #[serde(rename = "write_MBps")]
    pub write_mb_per_s: Option<f64>,
    #[serde(rename = "read_MBps")]
    pub read_mb_per_s: Option<f64>,
}

/// Every setting's figures and what failed.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub entries: Vec<SweepEntry>,
    pub errors: Vec<String>,
}

/// The best figure of one direction and the setting that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Best {
    pub setting: Setting,
    #[serde(rename = "MBps")]
    pub mb_per_s: f64,
}

/// What a report carries of the sweep (flattened into its JSON): every
/// entry and the best per direction; all empty when the sweep did not run
/// (`--no-fio-sweep`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepSummary {
    /// Whether the sweep ran.
    pub fio_sweep_ran: bool,
    /// Every setting's write and read MB/s, in the order they ran.
    pub fio_sweep: Vec<SweepEntry>,
    /// The best write of the sweep: the disk's limit for a write.
    #[serde(rename = "fio_best_write_MBps")]
    pub fio_best_write_mb_per_s: Option<f64>,
    /// The setting that gave it.
    pub fio_best_write_setting: Option<Setting>,
    /// The best read of the sweep: the disk's limit for a read.
    #[serde(rename = "fio_best_read_MBps")]
    pub fio_best_read_mb_per_s: Option<f64>,
    /// The setting that gave it.
    pub fio_best_read_setting: Option<Setting>,
}

impl SweepSummary {
    /// Counts one more fio run of this run (the single-setting one) toward
    /// the best of `direction`, so the limit is never below a figure fio
    /// reached in the same run; nothing when the sweep did not run.
    /// Counts the single-setting run (`iodepth`, 1 MiB blocks) toward the
    /// best of both directions, so the limit is never below what fio
    /// reached in the same run.
    pub fn consider_single(&mut self, iodepth: usize, write: Option<f64>, read: Option<f64>) {
        let single = Setting::mib_blocks(iodepth);
        self.consider(Direction::Write, single, write);
        self.consider(Direction::Read, single, read);
    }

    pub fn consider(&mut self, direction: Direction, setting: Setting, mb_per_s: Option<f64>) {
        let Some(mb) = mb_per_s.filter(|mb| mb.is_finite() && *mb > 0.0) else {
            return;
        };
        if !self.fio_sweep_ran {
            return;
        }
        let (best, best_setting) = match direction {
            Direction::Write => (
                &mut self.fio_best_write_mb_per_s,
                &mut self.fio_best_write_setting,
            ),
            Direction::Read => (
                &mut self.fio_best_read_mb_per_s,
                &mut self.fio_best_read_setting,
            ),
        };
        if best.is_none_or(|b| mb > b) {
            *best = Some(mb);
            *best_setting = Some(setting);
        }
    }

    /// A one-line account of the best per direction, for the tables.
    pub fn best_line(&self) -> String {
        let one = |mb: Option<f64>, setting: Option<Setting>| match (mb, setting) {
            (Some(mb), Some(s)) => format!("{mb:.1} MB/s ({})", s.label()),
            _ => "-".to_owned(),
        };
        format!(
            "fio best (sweep of {} settings and the single-setting run): write {}, read {}",
            self.fio_sweep.len(),
            one(self.fio_best_write_mb_per_s, self.fio_best_write_setting),
            one(self.fio_best_read_mb_per_s, self.fio_best_read_setting)
        )
    }
}

impl Sweep {
    /// The summary a report keeps.
    pub fn summary(&self) -> SweepSummary {
        let write = self.best(Direction::Write);
        let read = self.best(Direction::Read);
        SweepSummary {
            fio_sweep_ran: true,
            fio_sweep: self.entries.clone(),
            fio_best_write_mb_per_s: write.map(|b| b.mb_per_s),
            fio_best_write_setting: write.map(|b| b.setting),
            fio_best_read_mb_per_s: read.map(|b| b.mb_per_s),
            fio_best_read_setting: read.map(|b| b.setting),
        }
    }

    /// The highest MB/s of `direction` over the entries that measured it
    /// (the first of equal ones); `None` when none did.
    pub fn best(&self, direction: Direction) -> Option<Best> {
        self.entries
            .iter()
            .filter_map(|e| {
                let mb = match direction {
                    Direction::Write => e.write_mb_per_s,
                    Direction::Read => e.read_mb_per_s,
                }?;
                (mb.is_finite() && mb > 0.0).then_some(Best {
                    setting: e.setting,
                    mb_per_s: mb,
                })
            })
            .fold(None, |best: Option<Best>, e| match best {
                Some(b) if b.mb_per_s >= e.mb_per_s => Some(b),
                _ => Some(e),
            })
    }
}

/// Runs every setting in [`SETTINGS`] on `dir`: drop the cache, write
/// `size_bytes`, drop the cache, read them back, remove fio's file. A
/// failed write skips that setting's read; a failure never stops the sweep.
pub fn run(dir: &Path, size_bytes: u64, cache: &CacheDropper) -> Sweep {
    let mut sweep = Sweep::default();
    for setting in SETTINGS {
        let mut entry = SweepEntry {
            setting,
            write_mb_per_s: None,
            read_mb_per_s: None,
        };
        for direction in [Direction::Write, Direction::Read] {
            cache.drop_cache();
            match fio::run(dir, direction, size_bytes, setting) {
                Ok(r) => {
                    eprintln!(
                        "fio sweep {}: {} {:.1} MB/s",
                        setting.label(),
                        direction.name(),
                        r.mb_per_s()
                    );
                    match direction {
                        Direction::Write => entry.write_mb_per_s = Some(r.mb_per_s()),
                        Direction::Read => entry.read_mb_per_s = Some(r.mb_per_s()),
                    }
                }
                Err(e) => {
                    sweep.errors.push(format!("fio sweep: {e}"));
                    break;
                }
            }
        }
        if let Err(e) = fio::remove_file(dir) {
            sweep
                .errors
                .push(format!("fio sweep: removing fio's file: {e}"));
        }
        sweep.entries.push(entry);
    }
    sweep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(iodepth: usize, block: u64, w: Option<f64>, r: Option<f64>) -> SweepEntry {
        SweepEntry {
            setting: Setting { iodepth, block },
            write_mb_per_s: w,
            read_mb_per_s: r,
        }
    }

    #[test]
    fn the_best_is_picked_per_direction() {
        let sweep = Sweep {
            entries: vec![
                entry(16, 1 << 20, Some(900.0), Some(1500.0)),
                entry(64, 1 << 20, Some(1400.0), None),
                entry(32, 4 << 20, None, Some(2100.0)),
                entry(64, 4 << 20, Some(1400.0), Some(f64::NAN)),
            ],
            errors: Vec::new(),
        };
        assert_eq!(
            sweep.best(Direction::Write),
            Some(Best {
                setting: Setting {
                    iodepth: 64,
                    block: 1 << 20
                },
                mb_per_s: 1400.0
            }),
            "the first of two equal figures"
        );
        assert_eq!(
            sweep.best(Direction::Read),
            Some(Best {
                setting: Setting {
                    iodepth: 32,
                    block: 4 << 20
                },
                mb_per_s: 2100.0
            }),
            "missing and NaN figures are passed over"
        );
    }

    #[test]
    fn the_summary_names_the_best_setting() {
        let sweep = Sweep {
            entries: vec![
                entry(16, 1 << 20, Some(900.0), Some(2000.0)),
                entry(32, 4 << 20, Some(1200.0), Some(1000.0)),
            ],
            errors: Vec::new(),
        };
        let s = sweep.summary();
        assert!(s.fio_sweep_ran);
        assert_eq!(s.fio_best_write_mb_per_s, Some(1200.0));
        assert_eq!(s.fio_best_write_setting.map(|s| s.iodepth), Some(32));
        assert_eq!(s.fio_best_read_mb_per_s, Some(2000.0));
        assert_eq!(s.fio_best_read_setting.map(|s| s.block), Some(1 << 20));
        assert_eq!(
            s.best_line(),
            "fio best (sweep of 2 settings and the single-setting run): \
             write 1200.0 MB/s (qd 32, bs 4M), read 2000.0 MB/s (qd 16, bs 1M)"
        );
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(json["fio_best_write_setting"]["block_bytes"], 4 << 20);
        assert_eq!(json["fio_sweep"][1]["write_MBps"], 1200.0);
    }

    #[test]
    fn a_faster_single_setting_run_raises_the_best() {
        let sweep = Sweep {
            entries: vec![entry(64, 4 << 20, Some(1000.0), Some(900.0))],
            errors: Vec::new(),
        };
        let mut s = sweep.summary();
        let single = Setting::mib_blocks(16);
        s.consider(Direction::Write, single, Some(800.0));
        s.consider(Direction::Read, single, Some(950.0));
        assert_eq!(s.fio_best_write_mb_per_s, Some(1000.0), "slower: no change");
        assert_eq!(s.fio_best_write_setting.map(|s| s.iodepth), Some(64));
        assert_eq!(s.fio_best_read_mb_per_s, Some(950.0));
        assert_eq!(s.fio_best_read_setting, Some(single));
        let mut not_run = SweepSummary::default();
        not_run.consider(Direction::Write, single, Some(800.0));
        assert_eq!(not_run.fio_best_write_mb_per_s, None, "no sweep, no best");
    }

    #[test]
    fn no_measured_figure_is_no_best() {
        let sweep = Sweep {
            entries: vec![entry(16, 1 << 20, None, Some(0.0))],
            errors: vec!["fio failed".into()],
        };
        assert_eq!(sweep.best(Direction::Write), None);
        assert_eq!(sweep.best(Direction::Read), None);
        assert_eq!(Sweep::default().best(Direction::Write), None);
    }

    #[test]
    fn the_sweep_is_three_depths_by_two_blocks() {
        for iodepth in [16, 32, 64] {
            for block in [1 << 20, 4 << 20] {
                assert!(
                    SETTINGS.contains(&Setting { iodepth, block }),
                    "qd {iodepth} bs {block} is swept"
                );
            }
        }
        assert_eq!(SETTINGS.len(), 6);
    }
}
