//! `node-agent histogram`: bcc-style ASCII log2 histograms for a human on a node.
use std::collections::BTreeMap;
use std::fmt::Write;

use crate::bpf::{self, MapReader};
use crate::cli::HistogramArgs;
use crate::devices::{DeviceFilter, DeviceNamer};
use crate::metrics::{did_io, name_hists, NamedHist, LATENCY_NAME, QUEUE_NAME, SIZE_NAME};
use crate::ops::OpNames;
use crate::snapshot::{DeviceOpHist, LOG2_SLOTS};
use crate::AgentError;

const BAR_WIDTH: u64 = 40;

/// Where the numbers come from.
enum Source {
    Kernel {
        reader: MapReader,
        ops: OpNames,
        attached: Box<bpf::Attached>,
    },
    Agent {
        url: String,
    },
}

pub async fn run(args: HistogramArgs) -> Result<(), AgentError> {
    let source = match &args.from {
        Some(url) => Source::Agent { url: url.clone() },
        None => {
            let attached = bpf::attach(args.bpf.attach)?;
            Source::Kernel {
                reader: attached.reader(),
                ops: attached.facts.ops.clone(),
                attached: Box::new(attached),
            }
        }
    };
    let filter = match &args.device {
        Some(d) => DeviceFilter::only(d),
        None => DeviceFilter::default(),
    };
    let namer = DeviceNamer::default();
    let mut printed = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let hists = match &source {
            Source::Kernel {
                reader,
                ops,
                attached,
            } => {
                let snap = reader.snapshot()?;
                attached.refresh(Some(&snap));
                let active = snap.hists.iter().filter(|h| did_io(h));
                name_hists(active.map(|h| (h.clone(), None)), &namer, &filter, ops)
            }
            Source::Agent { url } => {
                let url = url.clone();
                let body = tokio::task::spawn_blocking(move || fetch(&url))
                    .await
                    .map_err(|e| AgentError::Other(e.to_string()))??;
                parse_exposition(&body)
                    .into_iter()
                    .filter(|h| filter.allows(&h.device))
                    .collect()
            }
        };
        print!("{}", render(&hists));
        printed += 1;
        if args.count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
    }
}

fn fetch(url: &str) -> Result<String, AgentError> {
    let mut resp = ureq::get(url)
        .call()
        .map_err(|e| AgentError::Other(format!("fetching {url}: {e}")))?;
    resp.body_mut()
        .read_to_string()
        .map_err(|e| AgentError::Other(format!("reading {url}: {e}")))
}

/// Prints each device/operation with its latency and size distributions.
pub fn render(hists: &[NamedHist]) -> String {
    let mut out = String::new();
    if hists.is_empty() {
        out.push_str("no IO seen yet\n");
    }
    for h in hists {
        let _ = writeln!(
            out,
            "\ndevice = {}, operation = {}, ios = {}",
            h.device,
            h.operation,
            h.hist.count()
        );
        render_one(&mut out, "usecs", &h.hist.latency_slots);
        render_one(&mut out, "KiB", &h.hist.size_slots);
        // Empty (and so not printed) for bio-based disks and the tracepoint mode.
        render_one(&mut out, "usecs queued", &h.hist.queue.slots);
    }
    out
}

fn render_one(out: &mut String, unit: &str, slots: &[u64; LOG2_SLOTS]) {
    let Some(last) = slots.iter().rposition(|&c| c > 0) else {
        return;
    };
    let max = slots.iter().copied().max().unwrap_or(0).max(1);
    let _ = writeln!(out, "{unit:>24} : count    distribution");
    for (k, &count) in slots.iter().enumerate().take(last + 1) {
        let (lo, hi) = if k == 0 {
            (0, 1)
        } else {
            (1u64 << (k - 1), 1u64 << k)
        };
        let bar = "*".repeat((count * BAR_WIDTH / max) as usize);
        let range = if k == 0 {
            format!("[{lo}, {hi}]")
        } else {
            format!("({lo}, {hi}]")
        };
        let _ = writeln!(out, "{range:>24} : {count:<8} |{bar:<40}|");
    }
}

enum Family {
    Latency,
    Size,
    Queue,
}

/// Rebuilds per-slot histograms from an agent's text exposition (cumulative buckets).
pub fn parse_exposition(text: &str) -> Vec<NamedHist> {
    let mut map: BTreeMap<(String, String), DeviceOpHist> = BTreeMap::new();
    for line in text.lines() {
        let (family, rest) = if let Some(r) = line.strip_prefix(&format!("{LATENCY_NAME}_bucket{{"))
        {
            (Family::Latency, r)
        } else if let Some(r) = line.strip_prefix(&format!("{SIZE_NAME}_bucket{{")) {
            (Family::Size, r)
        } else if let Some(r) = line.strip_prefix(&format!("{QUEUE_NAME}_bucket{{")) {
            (Family::Queue, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
            let end = start + labels[start..].find('"')?;
            Some(labels[start..end].to_string())
        };
        let (Some(device), Some(operation), Some(le)) =
            (label("device"), label("operation"), label("le"))
        else {
            continue;
        };
        let Ok(bound) = le.parse::<f64>() else {
            continue;
        }; // "+Inf" parses as inf
        let h = map
            .entry((device, operation))
            .or_insert_with(|| DeviceOpHist::empty(0, 0));
        let slots = match family {
            Family::Latency => &mut h.latency_slots,
            Family::Size => &mut h.size_slots,
            Family::Queue => &mut h.queue.slots,
        };
        let k = if bound.is_infinite() {
            LOG2_SLOTS - 1
        } else {
            bound.log2().round().clamp(0.0, (LOG2_SLOTS - 2) as f64) as usize
        };
        // Store cumulative now; differenced below.
        slots[k] = value as u64;
    }
    map.into_iter()
        .map(|((device, operation), mut hist)| {
            decumulate(&mut hist.latency_slots);
            decumulate(&mut hist.size_slots);
            decumulate(&mut hist.queue.slots);
            NamedHist {
                device,
                operation,
                volume: None,
                hist,
            }
        })
        .collect()
}

fn decumulate(slots: &mut [u64; LOG2_SLOTS]) {
    // Rows the exposition has no bucket for (2^32..2^62) hold 0: carry the running total there.
    let last_finite = slots[..LOG2_SLOTS - 1]
        .iter()
        .rposition(|&c| c > 0)
        .unwrap_or(0);
    let mut prev = 0;
    for (k, slot) in slots.iter_mut().enumerate() {
        let cum = if k > last_finite && k < LOG2_SLOTS - 1 {
            prev
        } else {
            *slot
        };
        *slot = cum.saturating_sub(prev);
        prev = cum.max(prev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{render_text, Labels, Scrape};

    #[test]
    fn exposition_round_trips_through_the_text_format() {
        let mut hist = DeviceOpHist::empty(0, 0);
        hist.latency_slots[0] = 1;
        hist.latency_slots[5] = 3;
        hist.latency_slots[40] = 2; // beyond the last finite bound
        hist.size_slots[2] = 6;
        hist.queue.slots[3] = 4;
        let named = vec![NamedHist {
            device: "loop0".into(),
            operation: "read".into(),
            volume: None,
            hist,
        }];
        let text = render_text(
            Scrape {
                hists: named,
                devices: vec![],
            },
            &crate::snapshot::Snapshot::default(),
            &Labels {
                node: "n".into(),
                attach_mode: "tp_btf".into(),
            },
        );
        let parsed = parse_exposition(&text);
        assert_eq!(parsed.len(), 1);
        let h = &parsed[0].hist;
        assert_eq!(h.latency_slots[0], 1);
        assert_eq!(h.latency_slots[5], 3);
        assert_eq!(
            h.latency_slots[LOG2_SLOTS - 1],
            2,
            "above 2^31 µs shows as the overflow row"
        );
        assert_eq!(h.size_slots[2], 6);
        assert_eq!(h.queue.slots[3], 4);
        assert_eq!(h.count(), 6);
        let shown = render(&parsed);
        assert!(
            shown.contains("device = loop0, operation = read, ios = 6"),
            "{shown}"
        );
        assert!(shown.contains("(16, 32] : 3"), "{shown}");
        assert!(shown.contains("usecs queued : count"), "{shown}");
    }

    #[test]
    fn garbage_is_ignored() {
        assert!(parse_exposition("ebpf_bio_req_latency_bucket{le=\"x\"} y\n}{\n").is_empty());
    }
}
