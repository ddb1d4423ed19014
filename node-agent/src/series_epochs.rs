//! Keeps exported counters honest when a device's labels change.
//!
//! The kernel counts per device since the agent loaded. When the PersistentVolume a device backs
//! changes (a claim is deleted and the disk reused), the series under the old labels must end and
//! the series under the new labels must start from zero — not inherit the old volume's IO, and
//! never go down. So each device remembers the labels its series carry and the kernel totals at
//! the moment those labels began (its epoch); it exports totals minus that baseline.
use std::collections::HashMap;

use crate::snapshot::{DeviceOpHist, LOG2_SLOTS};

#[derive(Debug)]
struct Epoch<L> {
    labels: L,
    /// Kernel totals per operation when `labels` began.
    baseline: HashMap<u32, DeviceOpHist>,
}

#[derive(Debug)]
pub struct SeriesEpochs<L> {
    by_dev: HashMap<u32, Epoch<L>>,
}

impl<L> Default for SeriesEpochs<L> {
    fn default() -> Self {
        Self { by_dev: HashMap::new() }
    }
}

impl<L: Clone + PartialEq> SeriesEpochs<L> {
    /// Returns each histogram counted since its device's current labels began, with those labels.
    pub fn apply(&mut self, hists: &[DeviceOpHist], labels_of: impl Fn(u32) -> L) -> Vec<(DeviceOpHist, L)> {
        let mut current: HashMap<u32, L> = HashMap::new();
        for h in hists {
            current.entry(h.dev).or_insert_with(|| labels_of(h.dev));
        }
        for (&dev, labels) in &current {
            match self.by_dev.get_mut(&dev) {
                // First sight of the device: its series start at the agent's load, like the seed's.
                None => {
                    self.by_dev.insert(dev, Epoch { labels: labels.clone(), baseline: HashMap::new() });
                }
                Some(epoch) if epoch.labels != *labels => {
                    epoch.labels = labels.clone();
                    epoch.baseline = hists.iter().filter(|h| h.dev == dev).map(|h| (h.op, h.clone())).collect();
                }
                Some(_) => {}
            }
        }
        hists
            .iter()
            .map(|h| {
                let epoch = &self.by_dev[&h.dev];
                let since = match epoch.baseline.get(&h.op) {
                    Some(base) => minus(h, base),
                    None => h.clone(),
                };
                (since, epoch.labels.clone())
            })
            .collect()
    }
}

fn minus(now: &DeviceOpHist, base: &DeviceOpHist) -> DeviceOpHist {
    let mut d = DeviceOpHist::empty(now.dev, now.op);
    for k in 0..LOG2_SLOTS {
        d.latency_slots[k] = now.latency_slots[k].saturating_sub(base.latency_slots[k]);
        d.size_slots[k] = now.size_slots[k].saturating_sub(base.size_slots[k]);
    }
    d.latency_sum_ns = now.latency_sum_ns.saturating_sub(base.latency_sum_ns);
    d.size_sum_bytes = now.size_sum_bytes.saturating_sub(base.size_sum_bytes);
    d.errors = now.errors.saturating_sub(base.errors);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(dev: u32, op: u32, ios: u64) -> DeviceOpHist {
        let mut h = DeviceOpHist::empty(dev, op);
        h.latency_slots[3] = ios;
        h.size_slots[2] = ios;
        h.size_sum_bytes = ios * 4096;
        h
    }

    #[test]
    fn new_labels_start_from_zero_and_never_go_down() {
        let mut e: SeriesEpochs<Option<&str>> = SeriesEpochs::default();
        let out = e.apply(&[h(1, 0, 10)], |_| Some("pv-a"));
        assert_eq!((out[0].0.count(), out[0].1), (10, Some("pv-a")));
        let out = e.apply(&[h(1, 0, 15)], |_| Some("pv-a"));
        assert_eq!(out[0].0.count(), 15);
        // The disk now backs another volume: its series restart.
        let out = e.apply(&[h(1, 0, 15)], |_| Some("pv-b"));
        assert_eq!((out[0].0.count(), out[0].0.size_sum_bytes, out[0].1), (0, 0, Some("pv-b")));
        let out = e.apply(&[h(1, 0, 18), h(1, 1, 2)], |_| Some("pv-b"));
        assert_eq!(out[0].0.count(), 3);
        assert_eq!(out[1].0.count(), 2, "an op first seen after the change counts from zero");
        // Unlabelled again (volume detached): a fresh unlabelled series.
        let out = e.apply(&[h(1, 0, 20)], |_| None);
        assert_eq!((out[0].0.count(), out[0].1), (0, None));
    }

    #[test]
    fn devices_are_independent() {
        let mut e: SeriesEpochs<u8> = SeriesEpochs::default();
        e.apply(&[h(1, 0, 5), h(2, 0, 7)], |_| 0);
        let out = e.apply(&[h(1, 0, 6), h(2, 0, 9)], |d| if d == 1 { 1 } else { 0 });
        assert_eq!(out[0].0.count(), 0);
        assert_eq!(out[1].0.count(), 9);
    }
}
