//! One scrape: the kernel's totals, named and labelled with the volumes they belong to, encoded
//! for the scraper.
use std::sync::{Arc, Mutex, PoisonError};

use crate::bpf::{Attached, BpfError, MapReader};
use crate::devices::{DeviceFilter, DeviceNamer};
use crate::metrics::{
    did_io, name_hists, render_protobuf, render_text, DeviceVolumes, Labels, Scrape,
    PROTOBUF_CONTENT_TYPE, TEXT_CONTENT_TYPE,
};
use crate::ops::OpNames;
use crate::series_epochs::SeriesEpochs;
use crate::snapshot::{Snapshot, LOST_UNOBSERVED};
use crate::volumes::{PvInfo, VolumeIndex, VolumeLabeler};

/// Everything a scrape needs, set once the programs are attached.
pub struct Source {
    attached: Arc<Attached>,
    reader: MapReader,
    namer: DeviceNamer,
    filter: DeviceFilter,
    ops: OpNames,
    labels: Labels,
    /// Present with --pv-labels.
    volumes: Option<VolumeLabeler>,
    /// The PV each device's series carry decides where they start (see series_epochs).
    epochs: Mutex<SeriesEpochs<Option<PvInfo>>>,
}

/// A rendered exposition and its content type.
pub type Rendered = (&'static str, Vec<u8>);

impl Source {
    pub fn new(
        attached: Arc<Attached>,
        filter: DeviceFilter,
        labels: Labels,
        volumes: Option<VolumeLabeler>,
    ) -> Self {
        keep_large_buffers_mmapped();
        Self {
            reader: attached.reader(),
            ops: attached.facts.ops.clone(),
            attached,
            namer: DeviceNamer::default(),
            filter,
            labels,
            volumes,
            epochs: Mutex::new(SeriesEpochs::default()),
        }
    }

    /// Reads the maps and renders them; blocking (map reads, sysfs and kubelet-directory scans).
    pub fn render(&self, protobuf: bool) -> Result<Rendered, BpfError> {
        let mut snap = self.reader.snapshot()?;
        // Unlike the other reasons, these are known per disk: a disk the filter leaves out is
        // not this agent's to report.
        snap.lost[LOST_UNOBSERVED] = snap
            .unobserved
            .iter()
            .filter(|(dev, _)| self.filter.allows(&self.namer.name(*dev)))
            .map(|(_, n)| n)
            .sum();
        // The host may have changed since the last scrape (a disk appeared): attach what it
        // needs now, then report what was counted.
        self.attached.refresh(Some(&snap));
        let scrape = self.collect(&snap);
        Ok(if protobuf {
            (
                PROTOBUF_CONTENT_TYPE,
                render_protobuf(scrape, &snap, &self.labels),
            )
        } else {
            (
                TEXT_CONTENT_TYPE,
                render_text(scrape, &snap, &self.labels).into_bytes(),
            )
        })
    }

    fn collect(&self, snap: &Snapshot) -> Scrape {
        let active = snap.hists.iter().filter(|h| did_io(h)).cloned();
        let Some(volumes) = &self.volumes else {
            return Scrape {
                hists: name_hists(
                    active.map(|h| (h, None)),
                    &self.namer,
                    &self.filter,
                    &self.ops,
                ),
                devices: Vec::new(),
            };
        };
        let index = volumes.index();
        let active: Vec<_> = active.collect();
        let labelled = self
            .epochs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(&active, |dev| {
                index.get(dev).and_then(|v| v.attributed()).cloned()
            });
        Scrape {
            hists: name_hists(labelled, &self.namer, &self.filter, &self.ops),
            devices: self.device_volumes(&index),
        }
    }

    /// The info metric's rows: every reported device that backs a PV, even before its first IO.
    fn device_volumes(&self, index: &VolumeIndex) -> Vec<DeviceVolumes> {
        index
            .iter()
            .filter_map(|(dev, on_device)| {
                let device = self.namer.name(dev);
                self.filter.allows(&device).then(|| DeviceVolumes {
                    device,
                    volumes: on_device.volumes().to_vec(),
                    shared: on_device.attributed().is_none(),
                })
            })
            .collect()
    }
}

/// A scrape's buffers are ~5 KiB per device/operation pair (10 MiB of text at 1024 disks), freed
/// after each response. glibc raises its mmap threshold to the size of the first such buffer
/// freed and from then on keeps them in the heap arena of whichever thread rendered them, so
/// RSS grew by a buffer per blocking thread. A fixed threshold keeps them mmapped: returned to
/// the kernel after each scrape. (musl always maps large allocations.)
fn keep_large_buffers_mmapped() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called before scrapes allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}
