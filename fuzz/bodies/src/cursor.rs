//! A reader over a fuzz input: the structured bodies draw their choices
//! from it, and an exhausted input reads as zeros, so every input decodes.

/// The unread rest of one input.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { rest: data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((&b, rest)) => {
                self.rest = rest;
                b
            }
            None => 0,
        }
    }

    /// The next `N` bytes, zero-padded past the end.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.rest.len().min(N);
        let (head, rest) = self.rest.split_at(n);
        out.iter_mut().zip(head).for_each(|(o, &b)| *o = b);
        self.rest = rest;
        out
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A number that is usually small: one selector byte picks a byte, a
    /// multiple of 4096, a `u32` or a whole `u64` (where the overflow
    /// checks live).
    pub fn num(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => u64::from(self.u8()),
            1 => u64::from(self.u16()) * 4096,
            2 => u64::from(self.u32()),
            _ => self.u64(),
        }
    }

    /// At most `max` bytes (fewer when the input ends first).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.rest.len().min(max);
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// A short string (at most `max` bytes of the input, lossily UTF-8).
    pub fn string(&mut self, max: usize) -> String {
        let len = usize::from(self.u8()) % (max + 1);
        String::from_utf8_lossy(self.bytes(len)).into_owned()
    }
}
