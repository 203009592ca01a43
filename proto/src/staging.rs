//! The staging description: what memory a registration captures into, and
//! where each tensor sits in it; the policy when every slot is busy.

use serde::{Deserialize, Serialize};

/// Where a registration's tensors sit in its staging memory, and what kind
/// of memory that is.
///
/// The memory (a memfd today: [`StagingMemory::HostMemfd`]) holds `slots` slots of `slot_bytes` each (slot `i` at
/// `i * slot_bytes`), then the stream ring at `ring_offset`: `ring_chunks`
/// chunks of `chunk_bytes`. A slot holds the data section (`data_bytes`
/// bytes) exactly as it is written to disk; tensor `i` (registration order)
/// is at `offsets[i]` within a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagingInfo {
    /// What the staging memory is and how the client maps it. Since
    /// version 2 (version 1 knows only a host memfd, and says nothing).
    pub memory: StagingMemory,
    pub memfd_bytes: u64,
    pub slots: u32,
    pub slot_bytes: u64,
    pub data_bytes: u64,
    pub offsets: Vec<u64>,
    pub ring_offset: u64,
    pub ring_chunks: u32,
    pub chunk_bytes: u64,
    pub policy: BusyPolicy,
}

/// What kind of memory a registration's staging is, which decides how the
/// client maps it and which copies can reach it.
///
/// New kinds come with a protocol version: a GPU staging area allocated
/// with CUDA's virtual-memory API and exported as a file descriptor
/// (`CudaVmm { device_uuid, granularity_bytes }`) is the next one planned.
/// A daemon never offers a kind to a client whose version predates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum StagingMemory {
    /// A sealed `memfd` in host memory, passed with `SCM_RIGHTS` on the
    /// `Registered` frame; the client maps it shared and read-write.
    HostMemfd,
}

impl StagingMemory {
    pub const fn name(&self) -> &'static str {
        match self {
            StagingMemory::HostMemfd => "host_memfd",
        }
    }
}

impl StagingInfo {
    /// Checks the description against itself and the registered tensors'
    /// lengths, so a client never copies outside the memfd.
    pub fn check(&self, tensor_bytes: &[u64]) -> Result<(), String> {
        if self.offsets.len() != tensor_bytes.len() {
            return Err(format!(
                "{} offsets for {} tensors",
                self.offsets.len(),
                tensor_bytes.len()
            ));
        }
        for (i, (&off, &len)) in self.offsets.iter().zip(tensor_bytes).enumerate() {
            let end = off.checked_add(len).ok_or("offset overflow")?;
            if end > self.data_bytes {
                return Err(format!(
                    "tensor {i} ends at {end}, past the {}-byte data section",
                    self.data_bytes
                ));
            }
        }
        if self.slots == 0 || self.slot_bytes < self.data_bytes {
            return Err(format!(
                "{} slots of {} bytes cannot hold {} bytes",
                self.slots, self.slot_bytes, self.data_bytes
            ));
        }
        let slots_end = u64::from(self.slots)
            .checked_mul(self.slot_bytes)
            .ok_or("slot overflow")?;
        let ring_end = u64::from(self.ring_chunks)
            .checked_mul(self.chunk_bytes)
            .and_then(|r| r.checked_add(self.ring_offset))
            .ok_or("ring overflow")?;
        if self.ring_offset < slots_end || ring_end > self.memfd_bytes {
            return Err(format!(
                "slots end at {slots_end}, ring spans {}..{ring_end}, memfd is {} bytes",
                self.ring_offset, self.memfd_bytes
            ));
        }
        if self.chunk_bytes == 0 {
            return Err("chunk_bytes is 0".into());
        }
        // No two tensors share a byte: parallel copies must never race.
        let mut spans: Vec<(u64, u64)> = self
            .offsets
            .iter()
            .zip(tensor_bytes)
            .filter(|(_, len)| **len > 0)
            .map(|(&off, &len)| (off, off + len))
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            if let [(a_start, a_end), (b_start, b_end)] = *pair
                && b_start < a_end
            {
                return Err(format!(
                    "tensors at {a_start}..{a_end} and {b_start}..{b_end} overlap"
                ));
            }
        }
        Ok(())
    }

    /// Data bytes `(start, end)` of stream chunk `seq`.
    pub fn chunk_range(&self, seq: u64) -> (u64, u64) {
        let start = seq.saturating_mul(self.chunk_bytes);
        (
            start.min(self.data_bytes),
            start.saturating_add(self.chunk_bytes).min(self.data_bytes),
        )
    }

    /// Number of stream chunks of the data section.
    pub fn chunk_count(&self) -> u64 {
        self.data_bytes.div_ceil(self.chunk_bytes.max(1))
    }

    /// Offset in the memfd of ring position for chunk `seq`.
    pub fn ring_position(&self, seq: u64) -> u64 {
        self.ring_offset + (seq % u64::from(self.ring_chunks.max(1))) * self.chunk_bytes
    }
}

/// What the daemon does with a `Begin` while every slot is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusyPolicy {
    /// Wait for a slot.
    Block,
    /// Refuse this snapshot (the client is told; a metric counts it).
    Skip,
    /// Capture through the bounded ring while the disk drains it.
    Stream,
}

impl BusyPolicy {
    pub const fn name(self) -> &'static str {
        match self {
            BusyPolicy::Block => "block",
            BusyPolicy::Skip => "skip",
            BusyPolicy::Stream => "stream",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn staging_info_check_refuses_descriptions_outside_the_memfd() {
        let good = StagingInfo {
            memory: StagingMemory::HostMemfd,
            memfd_bytes: 3 * 8192,
            slots: 2,
            slot_bytes: 8192,
            data_bytes: 100,
            offsets: vec![0, 64],
            ring_offset: 16384,
            ring_chunks: 2,
            chunk_bytes: 4096,
            policy: BusyPolicy::Stream,
        };
        good.check(&[64, 36]).expect("consistent");
        assert!(good.check(&[64, 37]).is_err(), "tensor past data section");
        assert!(good.check(&[64]).is_err(), "offset count");
        let mut overlapping = good.clone();
        overlapping.offsets = vec![0, 60];
        assert!(
            overlapping
                .check(&[64, 36])
                .unwrap_err()
                .contains("overlap")
        );
        let mut ring_past_end = good.clone();
        ring_past_end.ring_chunks = 3;
        assert!(ring_past_end.check(&[64, 36]).is_err());
        assert_eq!(good.chunk_count(), 1);
        assert_eq!(good.chunk_range(0), (0, 100));
        assert_eq!(good.ring_position(3), 16384 + 4096);
    }
}
