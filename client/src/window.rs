//! [`Window`]: values by step, kept until collected, at most a fixed
//! number of them.
//!
//! The client keeps what became of each step (a commit, a failure, a skip,
//! a capture finished in the background) until the trainer asks for it.
//! Memory stays bounded because each window drops its lowest step when it
//! is full; each kind of outcome that could crowd out another has a window
//! of its own, so skips, which a trainer under policy `skip` may get at
//! every step and seldom collects, never push out a commit or a failure
//! nobody has collected yet. A window remembers the highest step it
//! dropped, so a caller asking for a step it no longer has can say why.

use std::collections::BTreeMap;

/// Values by step, at most `max` of them: inserting into a full window
/// drops the lowest step.
#[derive(Debug)]
pub(crate) struct Window<V> {
    by_step: BTreeMap<u64, V>,
    max: usize,
    /// The highest step dropped to keep the bound; `None` until one is.
    dropped_through: Option<u64>,
}

impl<V> Window<V> {
    /// An empty window of at most `max` values (at least one).
    pub(crate) fn new(max: usize) -> Window<V> {
        Window {
            by_step: BTreeMap::new(),
            max: max.max(1),
            dropped_through: None,
        }
    }

    /// Keeps `value` for `step` (replacing what was kept for it), then
    /// drops the lowest steps past the bound.
    pub(crate) fn insert(&mut self, step: u64, value: V) {
        self.by_step.insert(step, value);
        while self.by_step.len() > self.max {
            let dropped = self.by_step.pop_first().map(|(step, _)| step);
            self.note_dropped(dropped);
        }
    }

    /// Takes the value kept for `step`.
    pub(crate) fn remove(&mut self, step: u64) -> Option<V> {
        self.by_step.remove(&step)
    }

    /// Whether a value is kept for `step`.
    pub(crate) fn contains(&self, step: u64) -> bool {
        self.by_step.contains_key(&step)
    }

    /// The highest step dropped to keep the bound, if any: a value for a
    /// step at or below it may have been dropped (or collected before; the
    /// window cannot tell which).
    pub(crate) fn dropped_through(&self) -> Option<u64> {
        self.dropped_through
    }

    /// Takes every value, lowest step first; the window is empty afterwards
    /// (it still remembers what it dropped).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u64, V)> + use<V> {
        std::mem::take(&mut self.by_step).into_iter()
    }

    /// Remembers that steps up to `step` were dropped: by this window's
    /// bound, or by a window whose values were moved into this one.
    /// Nothing for `None`.
    pub(crate) fn note_dropped(&mut self, step: Option<u64>) {
        if let Some(s) = step {
            self.dropped_through = Some(self.dropped_through.map_or(s, |d| d.max(s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_drops_its_lowest_step_and_remembers_it() {
        let mut w = Window::new(3);
        for step in [5, 1, 9, 7] {
            w.insert(step, step * 10);
        }
        assert!(!w.contains(1), "the lowest step went");
        assert!([5, 7, 9].iter().all(|&s| w.contains(s)));
        assert_eq!(w.dropped_through(), Some(1));
        // A step below everything kept goes at once.
        w.insert(0, 0);
        assert!(!w.contains(0));
        assert_eq!(w.dropped_through(), Some(1), "the highest dropped stays");
        w.insert(11, 110);
        assert_eq!(w.dropped_through(), Some(5));
        assert_eq!(w.remove(7), Some(70));
        assert_eq!(w.remove(7), None, "taken once");
    }

    #[test]
    fn replacing_a_step_drops_nothing_and_drain_empties() {
        let mut w = Window::new(2);
        w.insert(1, "a");
        w.insert(2, "b");
        w.insert(2, "c");
        assert_eq!(w.dropped_through(), None);
        assert_eq!(w.drain().collect::<Vec<_>>(), vec![(1, "a"), (2, "c")]);
        assert!(!w.contains(1) && !w.contains(2));
        w.note_dropped(Some(4));
        w.note_dropped(None);
        w.note_dropped(Some(3));
        assert_eq!(w.dropped_through(), Some(4));
    }

    #[test]
    fn a_window_keeps_at_least_one_value() {
        let mut w = Window::new(0);
        w.insert(3, ());
        assert!(w.contains(3));
    }
}
