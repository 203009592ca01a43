//! [`StreamOrder`]: which of the trainer's CUDA streams a capture or a
//! restore is ordered with.

/// The trainer's CUDA stream for each device ordinal a capture or restore
/// is ordered after (a capture copies the state the work queued there so
/// far produced; a restore's copies run after that work, and the work
/// queued after them waits for them). A device it does not name uses its
/// legacy default stream (handle 0), which is PyTorch's default stream.
/// Host buffers ignore it: their order is the buffers' leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamOrder {
    streams: Vec<(u32, u64)>,
}

impl StreamOrder {
    /// Every device's legacy default stream.
    pub fn legacy() -> StreamOrder {
        StreamOrder::default()
    }

    /// The same order with device `ordinal`'s stream set to `stream` (a
    /// `CUstream` handle, as PyTorch's `Stream.cuda_stream` gives it;
    /// 0 is the legacy default stream). A later setting for the same
    /// device replaces the earlier one.
    pub fn with(mut self, ordinal: u32, stream: u64) -> StreamOrder {
        self.streams.retain(|(d, _)| *d != ordinal);
        self.streams.push((ordinal, stream));
        self
    }

    /// Device `ordinal`'s stream.
    pub fn stream_for(&self, ordinal: u32) -> u64 {
        self.streams
            .iter()
            .find(|(d, _)| *d == ordinal)
            .map_or(0, |(_, s)| *s)
    }

    /// The devices it names, with their streams.
    pub fn streams(&self) -> &[(u32, u64)] {
        &self.streams
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_not_named_uses_its_legacy_stream_and_a_later_setting_wins() {
        let order = StreamOrder::legacy()
            .with(1, 0x55)
            .with(0, 0x10)
            .with(1, 0x66);
        assert_eq!(order.stream_for(0), 0x10);
        assert_eq!(order.stream_for(1), 0x66);
        assert_eq!(order.stream_for(2), 0);
        assert_eq!(order.streams().len(), 2);
    }
}
