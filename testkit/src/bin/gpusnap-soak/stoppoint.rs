//! Kills that land exactly at a step of the store's commit protocol
//! (`gpusnapd::store::CommitStep`) in the real daemon binary.
//!
//! The daemon binary has no kill switch; what its `[testing]` table offers
//! is `delays` (`gpusnapd::storage::delay`): the calling thread sleeps
//! before a named storage operation. Each commit step is followed by one
//! such operation, so a daemon started with that operation delayed parks
//! its persist thread at the step, asleep, for the delay; the soak sees the
//! thread asleep in `/proc/<pid>/task/*/syscall` ([`crate::procfs`]),
//! checks that the store on disk is in the state the step leaves
//! ([`crate::disk::in_progress`]), and SIGKILLs the daemon there.
//!
//! | step reached | operation delayed next | on disk while parked |
//! | --- | --- | --- |
//! | `PartialCreated` | `create_data_file` | an empty `.partial` |
//! | `DataWritten` | the data file's `fdatasync` | a `.partial` with data, no manifest |
//! | `DataSynced` | the manifest's `write_file_synced` | a `.partial` with data, no manifest |
//! | `ManifestSynced` | `sync_dir` of the `.partial` | a `.partial` with its manifest |
//! | `PartialDirSynced` | the `rename` into place | a `.partial` with its manifest |
//! | `Renamed` | `sync_dir` of the rank directory | no `.partial` with a manifest, no `.trash` |
//! | `Committed` | retention's `sync_dir` after its rename | a `.trash` |
//!
//! `Committed` is the one step a delay cannot park exactly: nothing the
//! storage does lies between the rank directory's fsync and the report to
//! the client. Its kill lands at the first delayable operation after it,
//! retention's fsync of the rank directory once the oldest snapshot is
//! renamed to `.trash` (the commit is reported by then), which is the same
//! committed state on disk plus a retention in progress.
//!
//! The daemon runs these rounds with `persist.concurrent_writes = 1`, so one
//! persist at a time is inside the protocol and the disk state names the
//! step of the thread that is parked.

use crate::disk::InProgress;

/// How long each delayed operation sleeps: ample time to see the park and
/// kill inside it.
pub const PARK_MS: u64 = 400;

/// A step of the commit protocol a kill aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    PartialCreated,
    DataWritten,
    DataSynced,
    ManifestSynced,
    PartialDirSynced,
    Renamed,
    Committed,
}

impl Target {
    /// Every target, in protocol order.
    pub const ALL: [Target; 7] = [
        Target::PartialCreated,
        Target::DataWritten,
        Target::DataSynced,
        Target::ManifestSynced,
        Target::PartialDirSynced,
        Target::Renamed,
        Target::Committed,
    ];

    /// The `CommitStep` name.
    pub fn name(self) -> &'static str {
        match self {
            Target::PartialCreated => "PartialCreated",
            Target::DataWritten => "DataWritten",
            Target::DataSynced => "DataSynced",
            Target::ManifestSynced => "ManifestSynced",
            Target::PartialDirSynced => "PartialDirSynced",
            Target::Renamed => "Renamed",
            Target::Committed => "Committed",
        }
    }

    /// The `testing.delays` operation that parks a persist at this step.
    pub fn delayed_op(self) -> &'static str {
        match self {
            Target::PartialCreated => "create_data_file",
            Target::DataWritten => "sync_data",
            Target::DataSynced => "write_file_synced",
            Target::ManifestSynced | Target::Renamed | Target::Committed => "sync_dir",
            Target::PartialDirSynced => "rename",
        }
    }

    /// The `testing.delays` value (a TOML array) for this target.
    pub fn delays_toml(self) -> String {
        format!(
            "[{{ op = \"{}\", delay_ms = {PARK_MS} }}]",
            self.delayed_op()
        )
    }

    /// Whether the store, seen while a persist thread is parked in this
    /// target's delayed operation, is in the state the step leaves.
    pub fn matches(self, disk: &InProgress) -> bool {
        match self {
            Target::PartialCreated => disk.partial_empty > 0,
            Target::DataWritten | Target::DataSynced => disk.partial_data > 0,
            Target::ManifestSynced | Target::PartialDirSynced => disk.partial_manifest > 0,
            Target::Renamed => disk.partial_manifest == 0 && disk.trash == 0,
            Target::Committed => disk.trash > 0 && disk.partial_manifest == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_delays_an_operation_the_daemon_accepts_and_reads_its_own_disk_state() {
        for t in Target::ALL {
            let text = format!("[testing]\ndelays = {}\n", t.delays_toml());
            let table: toml::Table = toml::from_str(&text).expect("toml");
            let op = table["testing"]["delays"][0]["op"].as_str().expect("op");
            assert_eq!(op, t.delayed_op());
        }
        let manifest = InProgress {
            partial_manifest: 1,
            ..InProgress::default()
        };
        assert!(Target::ManifestSynced.matches(&manifest));
        assert!(Target::PartialDirSynced.matches(&manifest));
        assert!(!Target::Renamed.matches(&manifest));
        assert!(Target::Renamed.matches(&InProgress::default()));
        let trash = InProgress {
            trash: 1,
            ..InProgress::default()
        };
        assert!(Target::Committed.matches(&trash));
        assert!(!Target::Renamed.matches(&trash));
        let data = InProgress {
            partial_data: 1,
            ..InProgress::default()
        };
        assert!(Target::DataWritten.matches(&data) && Target::DataSynced.matches(&data));
        assert!(!Target::PartialCreated.matches(&data));
    }
}
