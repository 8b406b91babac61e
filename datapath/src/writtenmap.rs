//! The written map (metadata format 2): which extents were ever written
//! since `hastctl create` (pure: no I/O).
//!
//! One bit per extent, LSB first, stored like the activemap (see
//! docs/format.md). A bit is set — durably, before the first data write
//! to its extent is issued — and never cleared (only `hastctl create`
//! starts a new map). An extent whose bit is clear holds nothing anyone
//! wrote through hastd: a full synchronisation skips it without reading
//! it, and `hastctl verify` does not compare it.
//!
//! Setting more bits than needed is always safe (the extent is then
//! copied like any other); missing one is not, hence the order: the
//! bit's sector is written (and flushed) first.

use bitvec::prelude::*;

/// Sectors of the map to write: `(sector index, image)`, ascending.
pub type Sectors = Vec<(usize, Vec<u8>)>;

/// The in-memory written map of one provider.
#[derive(Debug, Clone)]
pub struct WrittenMap {
    datasize: u64,
    extentsize: u64,
    sectorsize: usize,
    /// Bits wanted (set in memory).
    bits: BitVec<u8, Lsb0>,
    /// Bits known to be on disk.
    durable: BitVec<u8, Lsb0>,
    /// Sectors whose image differs from the disk.
    changed: BitVec<u8, Lsb0>,
    count: u64,
}

impl WrittenMap {
    /// An empty map (nothing written) for `datasize` bytes in extents of
    /// `extentsize`, stored in sectors of `sectorsize` bytes.
    pub fn new(datasize: u64, extentsize: u32, sectorsize: u32) -> WrittenMap {
        let n = datasize.div_ceil(u64::from(extentsize.max(1))) as usize;
        let sectors = n.div_ceil(8).div_ceil(sectorsize.max(1) as usize).max(1);
        WrittenMap {
            datasize,
            extentsize: u64::from(extentsize.max(1)),
            sectorsize: sectorsize.max(1) as usize,
            bits: bitvec![u8, Lsb0; 0; n],
            durable: bitvec![u8, Lsb0; 0; n],
            changed: bitvec![u8, Lsb0; 0; sectors],
            count: 0,
        }
    }

    /// Loads the image read from disk; bits past the last extent are
    /// ignored.
    pub fn load(&mut self, image: &[u8]) {
        let src = image.view_bits::<Lsb0>();
        let n = self.bits.len().min(src.len());
        self.bits[..n].copy_from_bitslice(&src[..n]);
        self.durable = self.bits.clone();
        self.count = self.bits.count_ones() as u64;
    }

    /// Number of extents.
    pub fn extents(&self) -> u32 {
        self.bits.len() as u32
    }

    /// Extents written since create.
    pub fn written(&self) -> u64 {
        self.count
    }

    /// Was extent `e` written since create (or is it about to be)?
    pub fn is_written(&self, e: u32) -> bool {
        self.bits.get(e as usize).is_some_and(|b| *b)
    }

    /// The first extent at or after `from` that was written, if any.
    pub fn next_written(&self, from: u32) -> Option<u32> {
        let from = from as usize;
        if from >= self.bits.len() {
            return None;
        }
        self.bits[from..].first_one().map(|i| (from + i) as u32)
    }

    fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset >= self.datasize {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.datasize);
        (offset / self.extentsize) as usize..((end - 1) / self.extentsize) as usize + 1
    }

    /// Are the bits of every extent of the range on disk?
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        let r = self.extents_of(offset, len);
        self.durable[r].all()
    }

    /// Sets the bits of the range; true when some are not on disk yet (the
    /// caller must write [`WrittenMap::take`]'s sectors before the data).
    pub fn want(&mut self, offset: u64, len: u64) -> bool {
        let r = self.extents_of(offset, len);
        let mut pending = false;
        for e in r {
            if !self.bits[e] {
                self.bits.set(e, true);
                self.count += 1;
                self.changed.set(e / 8 / self.sectorsize, true);
            }
            pending |= !self.durable[e];
        }
        pending
    }

    /// Marks every extent written (a provider whose contents are unknown).
    pub fn want_all(&mut self) {
        let n = self.bits.len() as u64;
        self.extents_of(0, self.datasize).for_each(|e| {
            if !self.bits[e] {
                self.bits.set(e, true);
                self.changed.set(e / 8 / self.sectorsize, true);
            }
        });
        self.count = n;
    }

    /// The bits as a bitmap of exactly `ceil(extents / 8)` bytes, LSB
    /// first, bits past the last extent zero.
    pub fn bitmap(&self) -> Vec<u8> {
        let n = self.bits.len();
        let mut out = self.bits.as_raw_slice()[..n.div_ceil(8)].to_vec();
        if !n.is_multiple_of(8) {
            if let Some(last) = out.last_mut() {
                *last &= (1u8 << (n % 8)) - 1;
            }
        }
        out
    }

    /// Is anything waiting to be written?
    pub fn has_changes(&self) -> bool {
        self.changed.any()
    }

    /// Takes the changed sectors, to write them (one batch at a time).
    pub fn take(&mut self) -> Sectors {
        let sectors: Vec<usize> = self.changed.iter_ones().collect();
        self.changed.fill(false);
        sectors
            .into_iter()
            .map(|s| (s, self.sector_image(s)))
            .collect()
    }

    /// The image of sector `s` as wanted now.
    pub fn sector_image(&self, s: usize) -> Vec<u8> {
        let mut img = vec![0u8; self.sectorsize];
        let first = s * self.sectorsize * 8;
        let last = ((s + 1) * self.sectorsize * 8).min(self.bits.len());
        if first < last {
            img.view_bits_mut::<Lsb0>()[..last - first].copy_from_bitslice(&self.bits[first..last]);
        }
        img
    }

    /// The sectors are on disk (written, and flushed when metaflush is on).
    pub fn persisted(&mut self, sectors: &Sectors) {
        for (s, img) in sectors {
            let first = s * self.sectorsize * 8;
            let bits = img.view_bits::<Lsb0>();
            let last = ((s + 1) * self.sectorsize * 8).min(self.bits.len());
            for e in first..last {
                if bits[e - first] {
                    self.durable.set(e, true);
                }
            }
        }
    }

    /// Writing the sectors failed: they go with the next batch.
    pub fn failed(&mut self, sectors: &Sectors) {
        for (s, _) in sectors {
            self.changed.set(*s, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bits_become_durable_through_their_sectors() {
        // 4 KiB extents, 512-byte sectors: 4096 extents per sector.
        let mut w = WrittenMap::new(10_000 * 4096, 4096, 512);
        assert_eq!(w.extents(), 10_000);
        assert!(w.covers(0, 0));
        assert!(!w.is_written(5));
        assert!(w.want(5 * 4096, 2 * 4096));
        assert!(w.is_written(5) && w.is_written(6) && !w.is_written(7));
        assert!(!w.covers(5 * 4096, 1));
        let s = w.take();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, 0);
        assert_eq!(s[0].1[0], 0b0110_0000);
        // Wanting again before the write: still pending, nothing new to take.
        assert!(w.want(5 * 4096, 1));
        assert!(w.take().is_empty());
        w.persisted(&s);
        assert!(w.covers(5 * 4096, 2 * 4096));
        assert!(!w.want(5 * 4096, 2 * 4096));
        // Past the first sector.
        assert!(w.want(5000 * 4096, 1));
        let s = w.take();
        assert_eq!(s[0].0, 1);
        w.failed(&s);
        assert_eq!(w.take(), s, "retried");
        assert_eq!(w.written(), 3);
        assert_eq!(w.bitmap().len(), 1250);
        assert_eq!(w.bitmap()[0], 0b0110_0000);
        assert_eq!(w.next_written(0), Some(5));
        assert_eq!(w.next_written(7), Some(5000));
        assert_eq!(w.next_written(5001), None);
        // Load: what is on disk is durable.
        let mut img = vec![0u8; 3 * 512];
        img[0] = 0b10;
        img[1500] = 0xff;
        let mut l = WrittenMap::new(10_000 * 4096, 4096, 512);
        l.load(&img);
        assert!(l.is_written(1) && l.covers(4096, 1));
        assert_eq!(l.written(), 1, "bits past the last extent ignored");
        l.want_all();
        assert_eq!(l.written(), 10_000);
        assert_eq!(l.take().len(), 3);
    }

    proptest! {
        /// Whatever is wanted and persisted, the images hold exactly the
        /// wanted bits, and covers() is true only after persistence.
        #[test]
        fn images_hold_the_wanted_bits(writes in proptest::collection::vec((0u64..3000, 1u64..20_000), 1..40)) {
            let mut w = WrittenMap::new(3000 * 4096, 4096, 512);
            let mut want = vec![false; 3000];
            for (e, len) in writes {
                let off = e * 4096;
                w.want(off, len);
                for x in w.extents_of(off, len) { want[x] = true; }
                let s = w.take();
                w.persisted(&s);
                prop_assert!(w.covers(off, len));
            }
            let img = w.sector_image(0);
            for (e, &b) in want.iter().enumerate() {
                prop_assert_eq!(w.is_written(e as u32), b);
                prop_assert_eq!(img[e / 8] & (1 << (e % 8)) != 0, b);
            }
        }
    }
}
