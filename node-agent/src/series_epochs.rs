//! Keeps exported counters honest when a device's labels change.
//!
//! The kernel counts per device since the agent loaded. When the PersistentVolume a device backs
//! changes (a claim is deleted and the disk reused), the series under the old labels must end and
//! the series under the new labels must start from zero: not inherit the old volume's IO, and
//! never go down. So each device remembers the kernel totals when its current labels began (the
//! epoch's baseline) and, for every label set it carried before, what that set had counted. A set
//! that comes back (a volume detached and attached again) resumes from its own total instead of
//! restarting, because a lower value under the same labels would read as a counter reset.
use std::collections::HashMap;

use crate::snapshot::DeviceOpHist;

/// Label sets remembered per device besides the current one. Each costs one histogram per
/// operation; a device relabelled more often than this (pathological churn) restarts the oldest
/// set from zero when it returns, which Prometheus reads as a counter reset.
const REMEMBERED_LABEL_SETS: usize = 16;

/// Per operation histograms.
type PerOp = HashMap<u32, DeviceOpHist>;

#[derive(Debug)]
struct Device<L> {
    labels: L,
    /// Kernel totals per operation when `labels` began.
    baseline: PerOp,
    /// What each label set had counted when it last ended, the current one included if it
    /// carried these labels before; most recently ended last.
    earlier: Vec<(L, PerOp)>,
}

#[derive(Debug)]
pub struct SeriesEpochs<L> {
    by_dev: HashMap<u32, Device<L>>,
}

impl<L> Default for SeriesEpochs<L> {
    fn default() -> Self {
        Self {
            by_dev: HashMap::new(),
        }
    }
}

impl<L: Clone + PartialEq> SeriesEpochs<L> {
    /// Returns each kernel histogram as counted under its device's current labels, with those
    /// labels. `hists` are the kernel's totals; `labels_of` gives a device's labels now.
    pub fn apply(
        &mut self,
        hists: &[DeviceOpHist],
        labels_of: impl Fn(u32) -> L,
    ) -> Vec<(DeviceOpHist, L)> {
        let mut seen: HashMap<u32, L> = HashMap::new();
        for h in hists {
            seen.entry(h.dev).or_insert_with(|| labels_of(h.dev));
        }
        for (dev, labels) in seen {
            match self.by_dev.get_mut(&dev) {
                // First sight of the device: its series count from the agent's load, like the
                // seed's, whatever labels it has.
                None => {
                    self.by_dev.insert(
                        dev,
                        Device {
                            labels,
                            baseline: PerOp::new(),
                            earlier: Vec::new(),
                        },
                    );
                }
                Some(device) if device.labels != labels => device.relabel(dev, labels, hists),
                Some(_) => {}
            }
        }
        hists
            .iter()
            .map(|h| {
                let device = &self.by_dev[&h.dev];
                (device.current(h), device.labels.clone())
            })
            .collect()
    }
}

impl<L: Clone + PartialEq> Device<L> {
    fn relabel(&mut self, dev: u32, labels: L, hists: &[DeviceOpHist]) {
        let now: PerOp = hists
            .iter()
            .filter(|h| h.dev == dev)
            .map(|h| (h.op, h.clone()))
            .collect();
        // Close the current epoch: its label set's total is what it shows now.
        let closing: PerOp = now.values().map(|h| (h.op, self.current(h))).collect();
        let old = std::mem::replace(&mut self.labels, labels);
        self.earlier.retain(|(l, _)| *l != old);
        self.earlier.push((old, closing));
        if self.earlier.len() > REMEMBERED_LABEL_SETS {
            self.earlier.remove(0);
        }
        // Open the new one, resuming what these labels counted before, if anything.
        let resumed = match self.earlier.iter().position(|(l, _)| *l == self.labels) {
            Some(i) => self.earlier.remove(i).1,
            None => PerOp::new(),
        };
        // baseline = now - resumed, so that current = now - baseline = resumed at this instant.
        self.baseline = now
            .into_iter()
            .map(|(op, h)| {
                let base = match resumed.get(&op) {
                    Some(r) => h.minus(r),
                    None => h,
                };
                (op, base)
            })
            .collect();
    }

    /// The kernel's totals `h` as counted under the current labels.
    fn current(&self, h: &DeviceOpHist) -> DeviceOpHist {
        match self.baseline.get(&h.op) {
            Some(base) => h.minus(base),
            None => h.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(dev: u32, op: u32, ios: u64) -> DeviceOpHist {
        let mut h = DeviceOpHist::empty(dev, op);
        h.latency_slots[3] = ios;
        h.size_slots[2] = ios;
        h.size_sum_bytes = ios * 4096;
        h
    }

    #[test]
    fn new_labels_start_from_zero() {
        let mut e: SeriesEpochs<Option<&str>> = SeriesEpochs::default();
        let out = e.apply(&[h(1, 0, 10)], |_| Some("pv-a"));
        assert_eq!((out[0].0.count(), out[0].1), (10, Some("pv-a")));
        let out = e.apply(&[h(1, 0, 15)], |_| Some("pv-a"));
        assert_eq!(out[0].0.count(), 15);
        // The disk now backs another volume: its series restart.
        let out = e.apply(&[h(1, 0, 15)], |_| Some("pv-b"));
        assert_eq!(
            (out[0].0.count(), out[0].0.size_sum_bytes, out[0].1),
            (0, 0, Some("pv-b"))
        );
        let out = e.apply(&[h(1, 0, 18), h(1, 1, 2)], |_| Some("pv-b"));
        assert_eq!(out[0].0.count(), 3);
        assert_eq!(
            out[1].0.count(),
            2,
            "an op first seen after the change counts from zero"
        );
    }

    #[test]
    fn a_label_set_that_returns_resumes_its_total() {
        let mut e: SeriesEpochs<Option<&str>> = SeriesEpochs::default();
        e.apply(&[h(1, 0, 10)], |_| None);
        let out = e.apply(&[h(1, 0, 12)], |_| Some("pv-a"));
        assert_eq!(out[0].0.count(), 0);
        let out = e.apply(&[h(1, 0, 20)], |_| Some("pv-a"));
        assert_eq!(out[0].0.count(), 8);
        // Detached: the unlabelled series continues from its 12, plus nothing yet.
        let out = e.apply(&[h(1, 0, 20)], |_| None);
        assert_eq!((out[0].0.count(), out[0].1), (12, None));
        let out = e.apply(&[h(1, 0, 21)], |_| None);
        assert_eq!(out[0].0.count(), 13);
        // And pv-a again: from its 8.
        let out = e.apply(&[h(1, 0, 25)], |_| Some("pv-a"));
        assert_eq!(out[0].0.count(), 8);
        let out = e.apply(&[h(1, 0, 26)], |_| Some("pv-a"));
        assert_eq!(out[0].0.count(), 9);
    }

    #[test]
    fn devices_are_independent() {
        let mut e: SeriesEpochs<u8> = SeriesEpochs::default();
        e.apply(&[h(1, 0, 5), h(2, 0, 7)], |_| 0);
        let out = e.apply(&[h(1, 0, 6), h(2, 0, 9)], |d| if d == 1 { 1 } else { 0 });
        assert_eq!(out[0].0.count(), 0);
        assert_eq!(out[1].0.count(), 9);
    }

    proptest! {
        /// Whatever the relabelling, a series (device, op, labels) seen in two scrapes never
        /// shows a lower count, and all series together never show more IO than the kernel.
        #[test]
        fn no_series_ever_decreases(steps in prop::collection::vec((0u64..5, 0u8..4), 1..60)) {
            let mut e: SeriesEpochs<u8> = SeriesEpochs::default();
            let mut kernel = 0u64;
            let mut last: HashMap<u8, u64> = HashMap::new();
            for (io, labels) in steps {
                kernel += io;
                let out = e.apply(&[h(1, 0, kernel)], |_| labels);
                let (hist, l) = &out[0];
                prop_assert_eq!(*l, labels);
                if let Some(&before) = last.get(l) {
                    prop_assert!(hist.count() >= before, "{} < {} for labels {}", hist.count(), before, l);
                }
                last.insert(*l, hist.count());
                prop_assert!(last.values().sum::<u64>() <= kernel);
            }
        }
    }
}
