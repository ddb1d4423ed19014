//! The exposition: the seed's ebpf_exporter metrics, exactly, plus labels and metrics beside them.
//!
//! Everything is derived from one [`Snapshot`] at scrape time; nothing here keeps state.
use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, NativeHistogram, NativeHistogramBuckets, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::devices::{DeviceFilter, DeviceNamer};
use crate::ops::OpNames;
use crate::snapshot::{DeviceOpHist, Snapshot, INFLIGHT_TABLES, LOG2_SLOTS, LOST_REASONS};
use crate::volumes::{PvInfo, LABEL_NAMESPACE, LABEL_PV, LABEL_PVC};

pub const LATENCY_NAME: &str = "ebpf_bio_req_latency";
pub const LATENCY_HELP: &str = "A histogram of bio request latencies in microseconds.";
pub const SIZE_NAME: &str = "ebpf_bio_req_size";
pub const SIZE_HELP: &str = "A histogram of bio request sizes in KiB.";
const ERRORS_NAME: &str = "ebpf_bio_req_errors";
const ERRORS_HELP: &str = "Block IO requests that completed with an error, also counted in ebpf_bio_req_latency and ebpf_bio_req_size.";

/// The seed's `le` strings (Go's %g of 2^k, as client_golang and prometheus-client write them),
/// slot k's bound; +Inf follows. Written as constants so the text path formats no float per line.
const LE: [&str; LATENCY_MAX_LOG2 + 1] = [
    "1",
    "2",
    "4",
    "8",
    "16",
    "32",
    "64",
    "128",
    "256",
    "512",
    "1024",
    "2048",
    "4096",
    "8192",
    "16384",
    "32768",
    "65536",
    "131072",
    "262144",
    "524288",
    "1.048576e+06",
    "2.097152e+06",
    "4.194304e+06",
    "8.388608e+06",
    "1.6777216e+07",
    "3.3554432e+07",
    "6.7108864e+07",
    "1.34217728e+08",
    "2.68435456e+08",
    "5.36870912e+08",
    "1.073741824e+09",
    "2.147483648e+09",
];
/// Beside the seed's families, in the seed's unit and buckets, so dashboards treat it alike.
pub const QUEUE_NAME: &str = "ebpf_bio_req_queue_latency";
pub const QUEUE_HELP: &str = "A histogram of the time block requests waited between becoming a request and issue to the driver (IO scheduler, plug, dispatch), in microseconds.";

/// The seed's largest finite `le`: 2^31 µs for latency, 2^15 KiB for size. Slots above fold
/// into +Inf in the classic buckets (never into the last finite bucket).
pub const LATENCY_MAX_LOG2: usize = 31;
pub const SIZE_MAX_LOG2: usize = 15;

const NSEC_PER_USEC: f64 = 1000.0;
const BYTES_PER_KIB: f64 = 1024.0;

/// Who is exporting, for the labels every series carries.
#[derive(Debug, Clone)]
pub struct Labels {
    pub node: String,
    pub attach_mode: String,
}

/// One device/operation histogram with its names resolved.
#[derive(Debug, Clone)]
pub struct NamedHist {
    pub device: String,
    pub operation: String,
    /// The PersistentVolume all of the device's IO belongs to, if any.
    pub volume: Option<PvInfo>,
    pub hist: DeviceOpHist,
}

/// A device that backs PersistentVolumes, for `ebpf_bio_device_info`.
#[derive(Debug, Clone)]
pub struct DeviceVolumes {
    pub device: String,
    pub volumes: Vec<PvInfo>,
    /// The device's IO is not one PV's alone, so its series carry no PV labels.
    pub shared: bool,
}

/// Whether the kernel counted anything for a pair. Entries made ahead of a pair's first IO
/// (see precreate_entries in bpf/attach.rs) stay hidden until it has.
pub fn did_io(h: &DeviceOpHist) -> bool {
    h.count() > 0 || h.errors > 0
}

/// Names devices and operations, drops filtered devices, and merges pairs that resolve to the
/// same names and labels (a device number reused by another disk) so no series is emitted twice.
pub fn name_hists(
    hists: impl IntoIterator<Item = (DeviceOpHist, Option<PvInfo>)>,
    namer: &DeviceNamer,
    filter: &DeviceFilter,
    ops: &OpNames,
) -> Vec<NamedHist> {
    type Key = (String, String, Option<PvInfo>);
    let mut merged: BTreeMap<Key, DeviceOpHist> = BTreeMap::new();
    for (h, volume) in hists {
        let device = namer.name(h.dev);
        if !filter.allows(&device) {
            continue;
        }
        let operation = ops.name(h.op);
        let entry = merged
            .entry((device, operation, volume))
            .or_insert_with(|| DeviceOpHist::empty(h.dev, h.op));
        entry.add(&h);
    }
    merged
        .into_iter()
        .map(|((device, operation, volume), hist)| NamedHist {
            device,
            operation,
            volume,
            hist,
        })
        .collect()
}

/// Classic buckets: slot k is the bucket `le = 2^k`, for k up to `max_log2`; the encoder adds
/// +Inf = count, which is where every larger slot belongs.
fn classic_buckets(slots: &[u64; LOG2_SLOTS], max_log2: usize) -> Vec<(f64, u64)> {
    (0..=max_log2)
        .map(|k| ((1u64 << k) as f64, slots[k]))
        .collect()
}

/// The same slots as a native histogram, schema 0: bucket index k is (2^(k-1), 2^k], exactly
/// our slot k for k >= 1, and slot 0 ([0, 1]) is the zero bucket with threshold 1. Unlike the
/// classic side it keeps every slot above the largest classic bound (there is no +Inf bucket).
/// Quantiles agree with the classic buckets below 2^31 µs / 2^15 KiB.
struct NativeBuckets {
    zero_count: u64,
    spans: Vec<(i32, u32)>,
    deltas: Vec<i64>,
}

const NATIVE_SCHEMA: i32 = 0;
const NATIVE_ZERO_THRESHOLD: f64 = 1.0;

impl NativeBuckets {
    fn of(slots: &[u64; LOG2_SLOTS]) -> Self {
        let used = slots
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, &c)| c > 0)
            .map(|(k, _)| k);
        let (first, last) = match (used.clone().min(), used.max()) {
            (Some(f), Some(l)) => (f, l),
            _ => {
                return Self {
                    zero_count: slots[0],
                    spans: vec![],
                    deltas: vec![],
                }
            }
        };
        // One span from the first to the last used index; empty buckets inside it cost a zero
        // delta, fewer bytes than extra spans for these short histograms.
        let mut prev = 0i64;
        let deltas = slots[first..=last]
            .iter()
            .map(|&c| {
                let d = c as i64 - prev;
                prev = c as i64;
                d
            })
            .collect();
        Self {
            zero_count: slots[0],
            spans: vec![(first as i32, (last - first + 1) as u32)],
            deltas,
        }
    }

    fn view(&self) -> NativeHistogram<'_> {
        NativeHistogram {
            schema: NATIVE_SCHEMA,
            zero_threshold: NATIVE_ZERO_THRESHOLD,
            zero_count: self.zero_count,
            negative: NativeHistogramBuckets {
                spans: &[],
                deltas: &[],
            },
            positive: NativeHistogramBuckets {
                spans: &self.spans,
                deltas: &self.deltas,
            },
            created: None,
        }
    }
}

/// The seed's two histograms and the queue time: same slots layout, different unit.
#[derive(Clone, Copy)]
enum HistKind {
    Latency,
    Size,
    Queue,
}

impl HistKind {
    /// Name, help, largest classic bound (log2) and the divisor from the kernel's unit.
    fn describe(self) -> (&'static str, &'static str, usize, f64) {
        match self {
            HistKind::Latency => (LATENCY_NAME, LATENCY_HELP, LATENCY_MAX_LOG2, NSEC_PER_USEC),
            HistKind::Size => (SIZE_NAME, SIZE_HELP, SIZE_MAX_LOG2, BYTES_PER_KIB),
            HistKind::Queue => (QUEUE_NAME, QUEUE_HELP, LATENCY_MAX_LOG2, NSEC_PER_USEC),
        }
    }

    /// Slots, sum and count.
    fn of(self, h: &DeviceOpHist) -> (&[u64; LOG2_SLOTS], u64, u64) {
        match self {
            HistKind::Latency => (&h.latency_slots, h.latency_sum_ns, h.count()),
            HistKind::Size => (&h.size_slots, h.size_sum_bytes, h.count()),
            HistKind::Queue => (&h.queue.slots, h.queue.sum_ns, h.queue.count()),
        }
    }

    /// Queue series exist only where a queue time was counted: bio-based devices and the
    /// classic-tracepoint mode have none, and would otherwise export 35 zero samples per pair.
    fn exported_for(self, h: &DeviceOpHist) -> bool {
        match self {
            HistKind::Latency | HistKind::Size => true,
            HistKind::Queue => h.queue.count() > 0,
        }
    }
}

#[derive(Debug)]
struct BioCollector {
    hists: Vec<NamedHist>,
    devices: Vec<DeviceVolumes>,
    lost: [u64; LOST_REASONS.len()],
    inflight: [u64; INFLIGHT_TABLES.len()],
    labels: Labels,
    /// The text path wrote the per-pair families already (see write_pair_families).
    pairs_written: bool,
}

impl BioCollector {
    /// The seed's labels, then node, then the PV's (kube-state-metrics names) when the
    /// device's IO is one PV's; unknown ones are left out, never empty.
    fn series_labels(&self, h: &NamedHist) -> Vec<(&'static str, String)> {
        let mut labels = vec![
            ("device", h.device.clone()),
            ("operation", h.operation.clone()),
            ("node", self.labels.node.clone()),
        ];
        if let Some(pv) = &h.volume {
            labels.extend(
                pv.labels()
                    .filter(|(k, _)| [LABEL_PV, LABEL_PVC, LABEL_NAMESPACE].contains(k))
                    .map(|(k, v)| (k, v.to_string())),
            );
        }
        labels
    }
}

impl Collector for BioCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The seed's families print even before any IO, like ebpf_exporter's, but series appear
        // only for pairs that did IO since load.
        let pair_kinds: &[HistKind] = if self.pairs_written {
            &[]
        } else {
            &[HistKind::Latency, HistKind::Size, HistKind::Queue]
        };
        for &kind in pair_kinds {
            let (name, help, max_log2, unit) = kind.describe();
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for h in self.hists.iter().filter(|h| kind.exported_for(&h.hist)) {
                let (slots, sum, count) = kind.of(&h.hist);
                family
                    .encode_family(&self.series_labels(h))?
                    .encode_histogram_with_native::<NoLabelSet>(
                        sum as f64 / unit,
                        count,
                        &classic_buckets(slots, max_log2),
                        None,
                        NativeBuckets::of(slots).view(),
                    )?;
            }
        }
        if !self.pairs_written {
            let mut family =
                encoder.encode_descriptor(ERRORS_NAME, ERRORS_HELP, None, MetricType::Counter)?;
            for h in &self.hists {
                let labels = self.series_labels(h);
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&h.hist.errors, None)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "ebpf_bio_lost_events",
                "IO measurements the kernel side could not record, by reason (a full table, a completion without a known issue time, or a program run the kernel skipped because the program was already running on that CPU).",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in LOST_REASONS.iter().zip(self.lost) {
                let labels = [
                    ("reason", reason.to_string()),
                    ("node", self.labels.node.clone()),
                ];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&n, None)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "ebpf_bio_inflight_entries",
                "Entries in the kernel's in-flight tables: IOs whose issue time or partial bytes are held until completion.",
                None,
                MetricType::Gauge,
            )?;
            for (table, n) in INFLIGHT_TABLES.iter().zip(self.inflight) {
                let labels = [
                    ("table", table.to_string()),
                    ("node", self.labels.node.clone()),
                ];
                family.encode_family(&labels)?.encode_gauge(&(n as i64))?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "ebpf_bio_attach",
                "How the agent attached to the block layer (value 1).",
                None,
                MetricType::Info,
            )?;
            let labels = [
                ("mode", self.labels.attach_mode.clone()),
                ("node", self.labels.node.clone()),
            ];
            family.encode_info(&labels)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "ebpf_bio_device",
                "Block devices backing PersistentVolumes (value 1), one series per device and PV, for joins with kube-state-metrics. shared=\"true\": the device's IO is not one PV's alone, so its latency and size series carry no PV labels.",
                None,
                MetricType::Info,
            )?;
            for d in &self.devices {
                for pv in &d.volumes {
                    let mut labels = vec![
                        ("node", self.labels.node.clone()),
                        ("device", d.device.clone()),
                    ];
                    labels.extend(pv.labels().map(|(k, v)| (k, v.to_string())));
                    labels.push(("shared", d.shared.to_string()));
                    family.encode_info(&labels)?;
                }
            }
        }
        Ok(())
    }
}

/// What one scrape exports beside the kernel's global counters.
#[derive(Debug, Default)]
pub struct Scrape {
    pub hists: Vec<NamedHist>,
    pub devices: Vec<DeviceVolumes>,
}

/// One scrape's families, for either encoder; without the per-pair families when the text path
/// wrote them.
fn registry(scrape: Scrape, snapshot: &Snapshot, labels: &Labels, pairs_written: bool) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BioCollector {
        hists: scrape.hists,
        devices: scrape.devices,
        lost: snapshot.lost,
        inflight: snapshot.inflight,
        labels: labels.clone(),
        pairs_written,
    }));
    registry
}

/// Renders the Prometheus text format 0.0.4.
///
/// The per-pair families (latency, size, errors: ~50 lines per pair, nearly all of the bytes)
/// are written here directly, each pair's label set rendered once and reused on its ~100 lines;
/// prometheus-client re-encodes the labels on every line and formats every `le` as a float,
/// which at 1024 devices was most of a scrape. The rest goes through prometheus-client. The
/// bytes are the same as prometheus-client's for the whole exposition (tested against it).
pub fn render_text(scrape: Scrape, snapshot: &Snapshot, labels: &Labels) -> String {
    // ~4.7 KiB of text per pair without PV labels: one allocation instead of ~20 doublings.
    let mut out = String::with_capacity(4096 + scrape.hists.len() * 4864);
    write_pair_families(&mut out, &scrape.hists, labels);
    prometheus_client::encoding::prometheus_text::encode(
        &mut out,
        &registry(scrape, snapshot, labels, true),
    )
    .expect("writing to a String cannot fail");
    out
}

/// A label value as prometheus-client escapes it.
fn push_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `{device="…",operation="…",node="…"[,PV labels]`, without the closing brace (a bucket line
/// appends `,le="…"`): the same labels, in the same order, as BioCollector::series_labels.
fn pair_label_text(h: &NamedHist, labels: &Labels) -> String {
    let mut out = String::with_capacity(64);
    let pv_labels = h.volume.iter().flat_map(|pv| {
        pv.labels()
            .filter(|(k, _)| [LABEL_PV, LABEL_PVC, LABEL_NAMESPACE].contains(k))
    });
    let fixed = [
        ("device", h.device.as_str()),
        ("operation", h.operation.as_str()),
        ("node", labels.node.as_str()),
    ];
    for (i, (k, v)) in fixed.into_iter().chain(pv_labels).enumerate() {
        out.push_str(if i == 0 { "{" } else { "," });
        out.push_str(k);
        out.push_str("=\"");
        push_label_value(&mut out, v);
        out.push('"');
    }
    out
}

fn push_u64(out: &mut String, v: u64) {
    use std::fmt::Write;
    write!(out, "{v}").expect("writing to a String cannot fail");
}

/// The latency, size, queue-latency and errors families in prometheus-client's text layout.
fn write_pair_families(out: &mut String, hists: &[NamedHist], labels: &Labels) {
    let label_texts: Vec<String> = hists.iter().map(|h| pair_label_text(h, labels)).collect();
    for kind in [HistKind::Latency, HistKind::Size, HistKind::Queue] {
        let (name, help, max_log2, unit) = kind.describe();
        for line in ["# HELP ", "# TYPE "] {
            out.push_str(line);
            out.push_str(name);
            out.push_str(if line == "# HELP " {
                " "
            } else {
                " histogram\n"
            });
            if line == "# HELP " {
                out.push_str(help);
                out.push('\n');
            }
        }
        for (h, label_text) in hists.iter().zip(&label_texts) {
            if !kind.exported_for(&h.hist) {
                continue;
            }
            let (slots, sum, count) = kind.of(&h.hist);
            let mut cumulative = 0u64;
            for (k, le) in LE.iter().enumerate().take(max_log2 + 1) {
                cumulative += slots[k];
                write_bucket(out, name, label_text, le, cumulative);
            }
            write_bucket(out, name, label_text, "+Inf", count);
            out.push_str(name);
            out.push_str("_sum");
            out.push_str(label_text);
            out.push_str("} ");
            // prometheus-client's float format (dtoa, shortest round-trip), for the same bytes.
            out.push_str(dtoa::Buffer::new().format_finite(sum as f64 / unit));
            out.push('\n');
            out.push_str(name);
            out.push_str("_count");
            out.push_str(label_text);
            out.push_str("} ");
            push_u64(out, count);
            out.push('\n');
        }
    }
    out.push_str("# HELP ");
    out.push_str(ERRORS_NAME);
    out.push_str("_total ");
    out.push_str(ERRORS_HELP);
    out.push_str("\n# TYPE ");
    out.push_str(ERRORS_NAME);
    out.push_str("_total counter\n");
    for (h, label_text) in hists.iter().zip(&label_texts) {
        out.push_str(ERRORS_NAME);
        out.push_str("_total");
        out.push_str(label_text);
        out.push_str("} ");
        push_u64(out, h.hist.errors);
        out.push('\n');
    }
}

fn write_bucket(out: &mut String, name: &str, label_text: &str, le: &str, cumulative: u64) {
    out.push_str(name);
    out.push_str("_bucket");
    out.push_str(label_text);
    out.push_str(",le=\"");
    out.push_str(le);
    out.push_str("\"} ");
    push_u64(out, cumulative);
    out.push('\n');
}

pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// Whether a scraper's Accept header asks for the protobuf exposition (Prometheus does when
/// native histograms are enabled); the text format stays the default.
pub fn wants_protobuf(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let part = part.trim();
        part.starts_with("application/vnd.google.protobuf")
            && part.contains("proto=io.prometheus.client.MetricFamily")
            && part.contains("encoding=delimited")
    })
}

/// Renders length-delimited protobuf MetricFamily messages, with native histograms.
pub fn render_protobuf(scrape: Scrape, snapshot: &Snapshot, labels: &Labels) -> Vec<u8> {
    prometheus_client::encoding::prometheus_protobuf::encode_to_vec(&registry(
        scrape, snapshot, labels, false,
    ))
    .expect("encoding into memory cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels {
            node: "n1".into(),
            attach_mode: "tp_btf".into(),
        }
    }

    fn hist(device: &str, operation: &str, f: impl FnOnce(&mut DeviceOpHist)) -> NamedHist {
        let mut hist = DeviceOpHist::empty(0, 0);
        f(&mut hist);
        NamedHist {
            device: device.into(),
            operation: operation.into(),
            volume: None,
            hist,
        }
    }

    fn only(hists: Vec<NamedHist>) -> Scrape {
        Scrape {
            hists,
            devices: vec![],
        }
    }

    /// The seed's `le` strings, in order, as dashboards match them.
    const SEED_LATENCY_LE: [&str; 33] = [
        "1",
        "2",
        "4",
        "8",
        "16",
        "32",
        "64",
        "128",
        "256",
        "512",
        "1024",
        "2048",
        "4096",
        "8192",
        "16384",
        "32768",
        "65536",
        "131072",
        "262144",
        "524288",
        "1.048576e+06",
        "2.097152e+06",
        "4.194304e+06",
        "8.388608e+06",
        "1.6777216e+07",
        "3.3554432e+07",
        "6.7108864e+07",
        "1.34217728e+08",
        "2.68435456e+08",
        "5.36870912e+08",
        "1.073741824e+09",
        "2.147483648e+09",
        "+Inf",
    ];
    const SEED_SIZE_LE: [&str; 17] = [
        "1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024", "2048", "4096", "8192",
        "16384", "32768", "+Inf",
    ];

    fn le_values(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| {
                let start = l.find("le=\"").expect("le label") + 4;
                let end = start + l[start..].find('"').unwrap();
                l[start..end].to_string()
            })
            .collect()
    }

    /// The whole exposition as prometheus-client alone writes it: what render_text replaced.
    fn reference_text(scrape: Scrape, snapshot: &Snapshot, labels: &Labels) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(
            &mut out,
            &registry(scrape, snapshot, labels, false),
        )
        .unwrap();
        out
    }

    fn scrape_of(hists: &[NamedHist]) -> Scrape {
        Scrape {
            hists: hists.to_vec(),
            devices: vec![DeviceVolumes {
                device: "loop3".into(),
                volumes: vec![pv("pv-a", Some(("ns-a", "claim-a")))],
                shared: false,
            }],
        }
    }

    #[test]
    fn text_path_writes_prometheus_clients_bytes() {
        let mut claimed = hist("loop3", "write", |h| {
            h.latency_slots[0] = 3;
            h.latency_slots[31] = 1;
            h.latency_slots[63] = 2; // beyond every finite bound
            h.size_slots[15] = 4;
            h.size_slots[16] = 1;
            h.latency_sum_ns = 123_456_789_012_345;
            h.size_sum_bytes = 7;
            h.errors = 9;
            h.queue.slots[2] = 5;
            h.queue.slots[40] = 1;
            h.queue.sum_ns = 987_654_321;
        });
        // Every character prometheus-client escapes, in every label kind.
        claimed.volume = Some(pv("pv-\"a\\\n", Some(("ns\n", "c\"\\"))));
        let plain = hist("sd\"a\\", "read", |h| h.size_sum_bytes = 1);
        let hists = vec![claimed, plain];
        let snap = Snapshot {
            hists: vec![],
            lost: [1, 2, 3, 4, 5, 6],
            inflight: [6, 7],
            unobserved: vec![],
        };
        let node = Labels {
            node: "n\"1\\".into(),
            attach_mode: "tp_btf".into(),
        };
        for (hists, labels) in [(vec![], labels()), (hists.clone(), labels()), (hists, node)] {
            assert_eq!(
                render_text(scrape_of(&hists), &snap, &labels),
                reference_text(scrape_of(&hists), &snap, &labels)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn text_path_matches_prometheus_client_for_any_counts(
            slots in proptest::collection::vec(0u64..1 << 40, LOG2_SLOTS),
            lat_sum in proptest::prelude::any::<u64>(),
            size_sum in proptest::prelude::any::<u64>(),
            errors in proptest::prelude::any::<u64>(),
            device in "[a-z0-9\"\\\\\n:-]{1,12}",
        ) {
            let h = hist(&device, "discard", |h| {
                h.latency_slots.copy_from_slice(&slots);
                h.size_slots.copy_from_slice(&slots);
                h.size_slots.reverse();
                h.latency_sum_ns = lat_sum;
                h.size_sum_bytes = size_sum;
                h.errors = errors;
                h.queue.slots.copy_from_slice(&slots);
                h.queue.sum_ns = lat_sum / 2;
            });
            let snap = Snapshot::default();
            proptest::prop_assert_eq!(
                render_text(only(vec![h.clone()]), &snap, &labels()),
                reference_text(only(vec![h]), &snap, &labels())
            );
        }
    }

    #[test]
    fn seed_names_help_type_and_le_strings() {
        let text = render_text(
            only(vec![hist("sda", "write", |h| h.latency_slots[6] = 1)]),
            &Snapshot::default(),
            &labels(),
        );
        assert!(text.contains(
            "# HELP ebpf_bio_req_latency A histogram of bio request latencies in microseconds.\n"
        ));
        assert!(text.contains("# TYPE ebpf_bio_req_latency histogram\n"));
        assert!(
            text.contains("# HELP ebpf_bio_req_size A histogram of bio request sizes in KiB.\n")
        );
        assert!(text.contains("# TYPE ebpf_bio_req_size histogram\n"));
        assert_eq!(
            le_values(&text, "ebpf_bio_req_latency_bucket"),
            SEED_LATENCY_LE
        );
        assert_eq!(le_values(&text, "ebpf_bio_req_size_bucket"), SEED_SIZE_LE);
        assert!(
            text.contains("ebpf_bio_req_latency_bucket{device=\"sda\",operation=\"write\",node=\"n1\",le=\"1.048576e+06\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn queue_time_has_the_latency_buckets_and_only_where_counted() {
        let text = render_text(
            only(vec![
                hist("sda", "write", |h| {
                    h.latency_slots[6] = 3;
                    h.queue.slots[0] = 1;
                    h.queue.slots[4] = 1; // (8, 16] µs
                    h.queue.sum_ns = 9_500;
                }),
                hist("zram0", "write", |h| h.latency_slots[2] = 1),
            ]),
            &Snapshot::default(),
            &labels(),
        );
        assert!(text.contains(&format!("# HELP {QUEUE_NAME} {QUEUE_HELP}\n")));
        assert!(text.contains(&format!("# TYPE {QUEUE_NAME} histogram\n")));
        assert_eq!(
            le_values(&text, &format!("{QUEUE_NAME}_bucket")),
            SEED_LATENCY_LE
        );
        let series = "{device=\"sda\",operation=\"write\",node=\"n1\"";
        for expected in [
            format!("{QUEUE_NAME}_bucket{series},le=\"8\"}} 1\n"),
            format!("{QUEUE_NAME}_bucket{series},le=\"16\"}} 2\n"),
            format!("{QUEUE_NAME}_sum{series}}} 9.5\n"),
            format!("{QUEUE_NAME}_count{series}}} 2\n"),
            // The service-time count is its own, not the queue's.
            format!("{LATENCY_NAME}_count{series}}} 3\n"),
        ] {
            assert!(text.contains(&expected), "{expected} in {text}");
        }
        assert!(
            !text.contains(&format!("{QUEUE_NAME}_count{{device=\"zram0\"")),
            "no queue series without a queue time: {text}"
        );
    }

    #[test]
    fn buckets_are_cumulative_and_inf_equals_count() {
        let text = render_text(
            only(vec![hist("loop0", "read", |h| {
                h.latency_slots[0] = 2; // <= 1 µs
                h.latency_slots[3] = 5; // (4, 8] µs
                h.latency_slots[40] = 1; // beyond 2^31 µs: only in +Inf
                h.size_slots[2] = 7; // 4 KiB
                h.size_slots[16] = 1; // a 64 MiB discard: beyond le=32768
                h.latency_sum_ns = 1_500;
                h.size_sum_bytes = 7 * 4096 + (64 << 20);
            })]),
            &Snapshot::default(),
            &labels(),
        );
        let line = |s: &str| {
            text.lines()
                .find(|l| l.starts_with(s))
                .unwrap_or_else(|| panic!("{s} in {text}"))
                .to_string()
        };
        let series = "{device=\"loop0\",operation=\"read\",node=\"n1\"";
        assert!(line(&format!("ebpf_bio_req_latency_bucket{series},le=\"1\"}}")).ends_with(" 2"));
        assert!(line(&format!("ebpf_bio_req_latency_bucket{series},le=\"4\"}}")).ends_with(" 2"));
        assert!(line(&format!("ebpf_bio_req_latency_bucket{series},le=\"8\"}}")).ends_with(" 7"));
        assert!(line(&format!(
            "ebpf_bio_req_latency_bucket{series},le=\"2.147483648e+09\"}}"
        ))
        .ends_with(" 7"));
        assert!(line(&format!(
            "ebpf_bio_req_latency_bucket{series},le=\"+Inf\"}}"
        ))
        .ends_with(" 8"));
        assert!(line(&format!("ebpf_bio_req_latency_count{series}}}")).ends_with(" 8"));
        let value = |s: &str| line(s).rsplit_once(' ').unwrap().1.parse::<f64>().unwrap();
        assert_eq!(value(&format!("ebpf_bio_req_latency_sum{series}}}")), 1.5);
        assert!(line(&format!("ebpf_bio_req_size_bucket{series},le=\"32768\"}}")).ends_with(" 7"));
        assert!(line(&format!("ebpf_bio_req_size_bucket{series},le=\"+Inf\"}}")).ends_with(" 8"));
        assert_eq!(value(&format!("ebpf_bio_req_size_sum{series}}}")), 65564.0);
    }

    #[test]
    fn errors_lost_and_attach_mode_are_exported() {
        let text = render_text(
            only(vec![hist("vda", "flush", |h| h.errors = 3)]),
            &Snapshot {
                hists: vec![],
                lost: [1, 2, 0, 0, 7, 4],
                inflight: [5, 0],
                unobserved: vec![],
            },
            &labels(),
        );
        assert!(
            text.contains(
                "ebpf_bio_req_errors_total{device=\"vda\",operation=\"flush\",node=\"n1\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("ebpf_bio_lost_events_total{reason=\"no_start_time\",node=\"n1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "ebpf_bio_lost_events_total{reason=\"program_recursion\",node=\"n1\"} 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ebpf_bio_lost_events_total{reason=\"unobserved_completion\",node=\"n1\"} 4\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("ebpf_bio_attach_info{mode=\"tp_btf\",node=\"n1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ebpf_bio_inflight_entries{table=\"starts\",node=\"n1\"} 5\n"),
            "{text}"
        );
    }

    #[test]
    fn native_buckets_mirror_the_slots() {
        let mut slots = [0u64; LOG2_SLOTS];
        slots[0] = 4;
        slots[2] = 3;
        slots[5] = 1;
        slots[40] = 2; // beyond the classic +Inf boundary: kept
        let n = NativeBuckets::of(&slots);
        assert_eq!(n.zero_count, 4);
        assert_eq!(n.spans, vec![(2, 39)]);
        // Delta-encoded counts of indexes 2..=40.
        let mut counts = vec![];
        let mut acc = 0i64;
        for d in &n.deltas {
            acc += d;
            counts.push(acc);
        }
        assert_eq!(counts.len(), 39);
        assert_eq!((counts[0], counts[3], counts[38]), (3, 1, 2));
        assert_eq!(counts.iter().sum::<i64>(), 6);
        let empty = NativeBuckets::of(&[0; LOG2_SLOTS]);
        assert!(empty.spans.is_empty() && empty.zero_count == 0);
    }

    #[test]
    fn protobuf_carries_native_and_classic_buckets() {
        use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::MetricFamily;
        use prost::Message;
        let body = render_protobuf(
            only(vec![hist("loop0", "read", |h| {
                h.latency_slots[0] = 1;
                h.latency_slots[3] = 2;
                h.size_slots[2] = 3;
            })]),
            &Snapshot::default(),
            &labels(),
        );
        let mut buf = body.as_slice();
        let mut families = vec![];
        while !buf.is_empty() {
            families.push(MetricFamily::decode_length_delimited(&mut buf).unwrap());
        }
        let lat = families.iter().find(|f| f.name == LATENCY_NAME).unwrap();
        let h = lat.metric[0].histogram.as_ref().unwrap();
        assert_eq!((h.schema, h.zero_threshold, h.zero_count), (0, 1.0, 1));
        assert_eq!(h.sample_count, 3);
        assert_eq!(
            h.bucket.len(),
            LATENCY_MAX_LOG2 + 1,
            "classic buckets stay beside the native ones"
        );
        assert_eq!(h.positive_span.len(), 1);
        assert_eq!(
            (h.positive_span[0].offset, h.positive_span[0].length),
            (3, 1)
        );
        assert_eq!(h.positive_delta, vec![2]);
    }

    #[test]
    fn accept_negotiation() {
        assert!(wants_protobuf("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3"));
        assert!(!wants_protobuf("text/plain;version=0.0.4;q=1,*/*;q=0.1"));
        assert!(!wants_protobuf(""));
    }

    #[test]
    fn naming_filters_and_merges() {
        use crate::devices::mkdev;
        let mut a = DeviceOpHist::empty(mkdev(7, 0), 0);
        a.latency_slots[1] = 1;
        let mut b = a.clone();
        b.dev = mkdev(7, 1);
        let hists = || [a.clone(), b.clone(), a.clone()].map(|h| (h, None));
        let namer = DeviceNamer::new("/nonexistent");
        let ops = OpNames::current_kernel();
        let all = name_hists(hists(), &namer, &DeviceFilter::default(), &ops);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].device, "7:0");
        assert_eq!(all[0].hist.count(), 2, "same names merge");
        let only = name_hists(
            hists(),
            &namer,
            &DeviceFilter::new(&[], &["7:1".into()]).unwrap(),
            &ops,
        );
        assert_eq!(only.len(), 1);
    }

    fn pv(name: &str, claim: Option<(&str, &str)>) -> PvInfo {
        PvInfo {
            pv: name.into(),
            pvc: claim.map(|c| c.1.into()),
            namespace: claim.map(|c| c.0.into()),
            storage_class: Some("fast".into()),
        }
    }

    #[test]
    fn pv_labels_follow_the_seed_labels_and_are_absent_when_unknown() {
        let one_io = |h: &mut DeviceOpHist| {
            h.latency_slots[4] = 1;
            h.size_slots[2] = 1;
        };
        let mut claimed = hist("loop3", "write", one_io);
        claimed.volume = Some(pv("pv-a", Some(("ns-a", "claim-a"))));
        let mut unclaimed = hist("loop4", "write", one_io);
        unclaimed.volume = Some(pv("pv-b", None));
        let plain = hist("loop5", "write", one_io);
        let text = render_text(
            only(vec![claimed, unclaimed, plain]),
            &Snapshot::default(),
            &labels(),
        );
        assert!(
            text.contains("ebpf_bio_req_size_count{device=\"loop3\",operation=\"write\",node=\"n1\",persistentvolume=\"pv-a\",persistentvolumeclaim=\"claim-a\",namespace=\"ns-a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ebpf_bio_req_latency_bucket{device=\"loop4\",operation=\"write\",node=\"n1\",persistentvolume=\"pv-b\",le=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "ebpf_bio_req_errors_total{device=\"loop5\",operation=\"write\",node=\"n1\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("storageclass=\"fast\",le"),
            "the class is for the info metric only"
        );
    }

    #[test]
    fn device_info_lists_every_pv_and_says_when_shared() {
        let scrape = Scrape {
            hists: vec![],
            devices: vec![
                DeviceVolumes {
                    device: "loop3".into(),
                    volumes: vec![pv("pv-a", Some(("ns-a", "claim-a")))],
                    shared: false,
                },
                DeviceVolumes {
                    device: "loop7".into(),
                    volumes: vec![pv("pv-p1", None), pv("pv-p2", Some(("ns-b", "c2")))],
                    shared: true,
                },
            ],
        };
        let text = render_text(scrape, &Snapshot::default(), &labels());
        let info: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ebpf_bio_device_info{"))
            .collect();
        assert_eq!(
            info,
            [
                "ebpf_bio_device_info{node=\"n1\",device=\"loop3\",persistentvolume=\"pv-a\",persistentvolumeclaim=\"claim-a\",namespace=\"ns-a\",storageclass=\"fast\",shared=\"false\"} 1",
                "ebpf_bio_device_info{node=\"n1\",device=\"loop7\",persistentvolume=\"pv-p1\",storageclass=\"fast\",shared=\"true\"} 1",
                "ebpf_bio_device_info{node=\"n1\",device=\"loop7\",persistentvolume=\"pv-p2\",persistentvolumeclaim=\"c2\",namespace=\"ns-b\",storageclass=\"fast\",shared=\"true\"} 1",
            ],
            "{text}"
        );
    }
}
