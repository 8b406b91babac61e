//! The activemap: which extents may differ between the two legs (pure: no
//! I/O).
//!
//! One bit per extent on disk. The on-disk image must always be a superset
//! of the extents that may be out of sync after a crash:
//!
//! * an extent with a write in flight (`pending > 0`),
//! * an extent that needs synchronisation (`syncmap`: a leg failed, the
//!   peer was absent, or the bit was found set at start-up),
//! * the `keepdirty` most recently written extents, which stay marked while
//!   idle so that rewriting a hot extent costs no metadata write.
//!
//! Protocol with the caller (the resource worker):
//!
//! 1. [`ActiveMap::write_start`] before issuing a data write. If it returns
//!    `Some(seq)`, the write must wait until [`ActiveMap::is_durable`]`(seq)`.
//! 2. To get there, one persister at a time calls
//!    [`ActiveMap::take_persist`], writes each returned sector image to the
//!    bitmap area (then flushes, when `metaflush` is on) and reports with
//!    [`ActiveMap::persisted`]. Batches carry every sector whose image
//!    changed, so concurrent writers share one metadata write (group commit).
//! 3. [`ActiveMap::need_sync`] when a leg failed (before step 4), then
//!    [`ActiveMap::write_complete`]. Bits that drop out of the image are
//!    cleared on disk lazily, with the next batch (or at a clean shutdown).
//!
//! Invariant kept at all times (checked by the crash property test): every
//! extent whose data write has been issued and not completed, and every
//! extent in `syncmap`, is set in every image the disk may hold after a
//! crash.

use bitvec::prelude::*;

const NIL: u32 = u32::MAX;

/// Most extents marked ahead of a sequential write stream. The actual
/// count is `keepdirty / 8` capped at this, so a small keepdirty set is
/// not flooded by guesses.
pub const MAX_LOOKAHEAD: u32 = 8;

/// A set of bitmap sectors to write, taken by [`ActiveMap::take_persist`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistBatch {
    /// Sequence number that becomes durable once this batch is on disk.
    pub upto: u64,
    /// `(sector index within the bitmap, image of that sector)`, ascending.
    pub sectors: Vec<(usize, Vec<u8>)>,
}

/// Counters exported for `hastctl list`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActiveMapStats {
    /// Batches persisted (metadata writes).
    pub updates: u64,
}

/// The in-memory activemap of one resource.
#[derive(Debug, Clone)]
pub struct ActiveMap {
    datasize: u64,
    extentsize: u64,
    nextents: u32,
    keepdirty: u32,
    sectorsize: usize,
    /// Writes in flight per extent.
    pending: Vec<u32>,
    /// Extents that must be synchronised to the peer.
    syncmap: BitVec<u8, Lsb0>,
    /// Bytes of the extents in `syncmap`.
    dirty_bytes: u64,
    /// Extents a synchronisation pass is copying.
    syncing: BitVec<u8, Lsb0>,
    /// Extents marked again while being synchronised.
    redirtied: BitVec<u8, Lsb0>,
    /// Bits guaranteed set on disk whatever order outstanding writes land in.
    durable: BitVec<u8, Lsb0>,
    /// Sectors whose wanted image may differ from the disk.
    changed: BitVec<u8, Lsb0>,
    /// Keepdirty list: intrusive doubly linked MRU list over extents.
    lru_prev: Vec<u32>,
    lru_next: Vec<u32>,
    lru_head: u32,
    lru_tail: u32,
    lru_len: u32,
    in_lru: BitVec<u8, Lsb0>,
    /// Sequence of required (set) changes, and how far is durable.
    seq: u64,
    last_taken: u64,
    durable_seq: u64,
    outstanding: Option<u64>,
    /// End of the last write started (sequential-stream detection).
    last_end: u64,
    /// Where the current sequential run started.
    run_start: u64,
    /// Extents marked ahead of a sequential stream (0: off).
    lookahead: u32,
    /// Sequence carrying marks laid ahead that no writer waits for.
    ahead_seq: Option<u64>,
    /// Extents whose copy on the peer completed but may still be in the
    /// peer's disk cache: held marked until a peer flush begun after that
    /// completion has finished.
    held: BitVec<u8, Lsb0>,
    /// Held extents captured by the peer flush in progress.
    closing: BitVec<u8, Lsb0>,
    /// Extents marked only because they are held (see
    /// [`ActiveMap::held_only`]), maintained at every change.
    held_only: usize,
    /// Extents whose data write completed since the last local flush
    /// began: the write may still be in the disk's volatile cache, so the
    /// mark must not be cleared on disk yet (a clear could otherwise
    /// become durable before the data it vouches for).
    local_unflushed: BitVec<u8, Lsb0>,
    /// Those captured by the local flush in progress.
    local_flushing: BitVec<u8, Lsb0>,
    stats: ActiveMapStats,
}

impl ActiveMap {
    /// An empty map for `datasize` bytes of data in extents of `extentsize`
    /// bytes, stored in sectors of `sectorsize` bytes.
    ///
    /// # Panics
    /// If the parameters are zero or the extent count does not fit in u32
    /// (metadata validation rejects such values first).
    pub fn new(datasize: u64, extentsize: u32, keepdirty: u32, sectorsize: u32) -> ActiveMap {
        assert!(datasize > 0 && extentsize > 0 && sectorsize > 0);
        let nextents = u32::try_from(datasize.div_ceil(u64::from(extentsize)))
            .expect("extent count fits in u32");
        let n = nextents as usize;
        let mapbytes = n.div_ceil(8);
        let sectors = mapbytes.div_ceil(sectorsize as usize).max(1);
        ActiveMap {
            datasize,
            extentsize: u64::from(extentsize),
            nextents,
            keepdirty,
            sectorsize: sectorsize as usize,
            pending: vec![0; n],
            syncmap: bitvec![u8, Lsb0; 0; n],
            dirty_bytes: 0,
            syncing: bitvec![u8, Lsb0; 0; n],
            redirtied: bitvec![u8, Lsb0; 0; n],
            durable: bitvec![u8, Lsb0; 0; n],
            changed: bitvec![u8, Lsb0; 0; sectors],
            lru_prev: vec![NIL; n],
            lru_next: vec![NIL; n],
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            in_lru: bitvec![u8, Lsb0; 0; n],
            seq: 0,
            last_taken: 0,
            durable_seq: 0,
            outstanding: None,
            last_end: u64::MAX,
            run_start: 0,
            lookahead: (keepdirty / 8).min(MAX_LOOKAHEAD),
            ahead_seq: None,
            held: bitvec![u8, Lsb0; 0; n],
            closing: bitvec![u8, Lsb0; 0; n],
            held_only: 0,
            local_unflushed: bitvec![u8, Lsb0; 0; n],
            local_flushing: bitvec![u8, Lsb0; 0; n],
            stats: ActiveMapStats::default(),
        }
    }

    /// Loads the image read from disk (`mapsize` bytes or more). Every set
    /// bit means the extent may differ from the peer: it needs sync.
    pub fn load(&mut self, image: &[u8]) {
        let n = self.nextents as usize;
        let bits = image.view_bits::<Lsb0>();
        for e in 0..n.min(bits.len()) {
            if bits[e] {
                self.set_sync(e);
                self.durable.set(e, true);
            }
        }
    }

    fn set_sync(&mut self, e: usize) {
        if !self.syncmap[e] {
            self.update(e, |m| m.syncmap.set(e, true));
            self.dirty_bytes += self.extent_bytes(e as u32);
        }
    }

    /// Is `e` marked only because the peer has not flushed it?
    fn is_held_only(&self, e: usize) -> bool {
        (self.held[e] || self.closing[e])
            && self.pending[e] == 0
            && !self.in_lru[e]
            && !self.syncmap[e]
    }

    /// Changes the state of extent `e` with `f`, keeping the
    /// [`ActiveMap::held_only`] count.
    fn update<T>(&mut self, e: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        let before = self.is_held_only(e);
        let out = f(self);
        match (before, self.is_held_only(e)) {
            (false, true) => self.held_only += 1,
            (true, false) => self.held_only -= 1,
            _ => {}
        }
        out
    }

    /// Number of extents.
    pub fn extents(&self) -> u32 {
        self.nextents
    }

    /// Bytes per extent.
    pub fn extentsize(&self) -> u64 {
        self.extentsize
    }

    /// Number of bitmap sectors.
    pub fn sectors(&self) -> usize {
        self.changed.len()
    }

    /// Bitmap sector size.
    pub fn sectorsize(&self) -> usize {
        self.sectorsize
    }

    /// Extents covering `[offset, offset+len)`, clamped to the data area.
    pub fn extent_range(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        if len == 0 || offset >= self.datasize {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.datasize);
        let first = (offset / self.extentsize) as u32;
        let last = ((end - 1) / self.extentsize) as u32;
        first..last + 1
    }

    /// Bytes of extent `e` (the last one may be short).
    pub fn extent_bytes(&self, e: u32) -> u64 {
        let start = u64::from(e) * self.extentsize;
        self.extentsize.min(self.datasize.saturating_sub(start))
    }

    fn wanted(&self, e: usize) -> bool {
        self.pending[e] > 0
            || self.in_lru[e]
            || self.syncmap[e]
            || self.held[e]
            || self.closing[e]
            || self.local_unflushed[e]
            || self.local_flushing[e]
    }

    fn sector_of(&self, e: usize) -> usize {
        e / 8 / self.sectorsize
    }

    /// Marks `e` as needing to be set on disk; returns the sequence to wait
    /// for, or None when the bit is already durable.
    fn require(&mut self, e: usize) -> Option<u64> {
        if self.durable[e] {
            return None;
        }
        // Every requirement raised between two batches shares one sequence
        // number: the next batch carries all of them.
        if self.seq <= self.last_taken {
            self.seq += 1;
        }
        let s = self.sector_of(e);
        self.changed.set(s, true);
        Some(self.seq)
    }

    fn lru_unlink(&mut self, e: u32) {
        let (p, n) = (self.lru_prev[e as usize], self.lru_next[e as usize]);
        if p == NIL {
            self.lru_head = n;
        } else {
            self.lru_next[p as usize] = n;
        }
        if n == NIL {
            self.lru_tail = p;
        } else {
            self.lru_prev[n as usize] = p;
        }
        self.lru_prev[e as usize] = NIL;
        self.lru_next[e as usize] = NIL;
    }

    fn lru_push_front(&mut self, e: u32) {
        self.lru_prev[e as usize] = NIL;
        self.lru_next[e as usize] = self.lru_head;
        if self.lru_head != NIL {
            self.lru_prev[self.lru_head as usize] = e;
        }
        self.lru_head = e;
        if self.lru_tail == NIL {
            self.lru_tail = e;
        }
    }

    /// Moves `e` to the front of the keepdirty list, evicting the oldest.
    fn touch(&mut self, e: u32) {
        if self.lru_head == e {
            return;
        }
        if self.in_lru[e as usize] {
            self.lru_unlink(e);
            self.lru_push_front(e);
            return;
        }
        self.update(e as usize, |m| m.in_lru.set(e as usize, true));
        self.lru_push_front(e);
        self.lru_len += 1;
        if self.lru_len > self.keepdirty {
            let old = self.lru_tail;
            self.evict(old);
        }
    }

    /// Drops `e` (the tail) from the keepdirty list.
    fn evict(&mut self, e: u32) {
        self.lru_unlink(e);
        self.update(e as usize, |m| m.in_lru.set(e as usize, false));
        self.lru_len -= 1;
        self.maybe_clear(e as usize);
    }

    /// Schedules a lazy clear of `e` if nothing needs its bit any more.
    fn maybe_clear(&mut self, e: usize) {
        if !self.wanted(e) && self.durable[e] {
            let s = self.sector_of(e);
            self.changed.set(s, true);
        }
    }

    /// A write of `[offset, offset+len)` is about to be issued. Returns the
    /// sequence that must be durable before the data write may start, or
    /// None when the on-disk map already covers it (the keepdirty fast
    /// path).
    ///
    /// A write that continues the previous one (a sequential stream) also
    /// marks the next few extents, with the same batch when one is due: the
    /// stream then crosses into them without waiting for a metadata write
    /// of its own. Marking more than needed is always safe (at worst those
    /// extents are resynchronised after a crash); the guesses count against
    /// keepdirty like any recently written extent.
    pub fn write_start(&mut self, offset: u64, len: u64) -> Option<u64> {
        let mut need = None;
        let range = self.extent_range(offset, len);
        for e in range.clone() {
            self.update(e as usize, |m| m.pending[e as usize] += 1);
            self.touch(e);
            if let Some(s) = self.require(e as usize) {
                need = Some(s);
            }
        }
        if offset != self.last_end {
            self.run_start = offset;
        }
        // Like read-ahead: the distance grows with the length of the run,
        // so short sequential bursts (a filesystem's metadata, say) mark
        // little beyond what they write.
        let run_extents = (offset.saturating_add(len) - self.run_start) / self.extentsize;
        let ahead = (self.lookahead as u64).min(run_extents) as u32;
        if ahead > 0 && range.end < self.nextents {
            // Lay marks in strides: only when the stream comes within half
            // the distance of the last mark, and then the whole distance,
            // so one metadata write covers many extents.
            let end = range.end.saturating_add(ahead).min(self.nextents);
            let probe = range.end.saturating_add(ahead / 2).min(end - 1);
            let laid = self.in_lru[probe as usize];
            // Furthest first, so the extents the stream reaches next end up
            // most recently used.
            for e in (range.end..end).rev().filter(|_| !laid) {
                self.touch(e);
                if let Some(s) = self.require(e as usize) {
                    if need != Some(s) {
                        self.ahead_seq = Some(s);
                    }
                }
            }
        }
        self.last_end = offset.saturating_add(len);
        need
    }

    /// The peer completed its copy of `[offset, offset+len)` (its Done),
    /// which may still sit in its disk cache: keep the extents marked until
    /// a peer flush begun after now has finished. Call before
    /// [`ActiveMap::write_complete`], so the mark never lapses.
    pub fn hold_until_peer_flush(&mut self, offset: u64, len: u64) {
        for e in self.extent_range(offset, len) {
            self.update(e as usize, |m| m.held.set(e as usize, true));
        }
    }

    /// A flush of the peer's disk is about to be requested: it will cover
    /// every extent held so far. One at a time; a flush abandoned before
    /// [`ActiveMap::peer_flush_done`] leaves its extents to the next one
    /// (which covers them too).
    pub fn peer_flush_begin(&mut self) {
        self.closing |= &self.held;
        self.held.fill(false);
    }

    /// The peer flush finished: its extents are durable on the peer and
    /// their marks may be cleared (lazily, with the next batch).
    pub fn peer_flush_done(&mut self) {
        let done: Vec<usize> = self.closing.iter_ones().collect();
        for e in done {
            self.update(e, |m| m.closing.set(e, false));
            self.maybe_clear(e);
        }
    }

    /// The peer is gone (or could not flush): every held extent may be
    /// missing there and needs synchronisation. The bits are durable
    /// already (held extents stay marked), so no metadata write is needed.
    pub fn peer_lost(&mut self) {
        let lost: Vec<usize> = self
            .held
            .iter_ones()
            .chain(self.closing.iter_ones())
            .collect();
        for e in lost {
            self.update(e, |m| {
                m.held.set(e, false);
                m.closing.set(e, false);
            });
            self.set_sync(e);
            if self.syncing[e] {
                self.redirtied.set(e, true);
            }
        }
    }

    /// A flush of the local disk is about to be issued: it will make
    /// durable every data write completed so far. One at a time.
    pub fn local_flush_begin(&mut self) {
        self.local_flushing |= &self.local_unflushed;
        self.local_unflushed.fill(false);
    }

    /// That flush completed: the data of its extents is durable here, so
    /// their marks may be cleared (lazily, with the next batch).
    pub fn local_flush_done(&mut self) {
        let done: Vec<usize> = self.local_flushing.iter_ones().collect();
        for e in done {
            self.local_flushing.set(e, false);
            self.maybe_clear(e);
        }
    }

    /// That flush failed: its extents wait for the next one.
    pub fn local_flush_failed(&mut self) {
        self.local_unflushed |= &self.local_flushing;
        self.local_flushing.fill(false);
    }

    /// Extents marked only because the peer has not flushed them yet
    /// (neither in flight, nor recently written, nor needing sync). A
    /// count kept at every change: O(1).
    pub fn held_only(&self) -> usize {
        self.held_only
    }

    /// Does any extent wait for a peer flush?
    pub fn holds(&self) -> bool {
        self.held.any() || self.closing.any()
    }

    /// A sequence that only marks laid ahead of a sequential stream wait
    /// for (no writer does): the caller persists it in the background so
    /// the stream finds its next extents already marked.
    pub fn take_lookahead(&mut self) -> Option<u64> {
        self.ahead_seq.take().filter(|&s| !self.is_durable(s))
    }

    /// The write of `[offset, offset+len)` finished on every leg it was
    /// sent to. Call [`ActiveMap::need_sync`] first if a leg failed.
    ///
    /// # Panics
    /// If no matching [`ActiveMap::write_start`] is outstanding (a
    /// programming error that would corrupt the map).
    pub fn write_complete(&mut self, offset: u64, len: u64) {
        for e in self.extent_range(offset, len) {
            let p = self.pending[e as usize];
            assert!(p > 0, "write_complete without write_start on extent {e}");
            self.update(e as usize, |m| m.pending[e as usize] -= 1);
            self.local_unflushed.set(e as usize, true);
            if p == 1 {
                self.maybe_clear(e as usize);
            }
        }
    }

    /// Marks `[offset, offset+len)` as needing synchronisation. Returns a
    /// sequence to wait for when a bit had to be added to the on-disk map
    /// (never when the range has a write in flight: those bits are durable).
    pub fn need_sync(&mut self, offset: u64, len: u64) -> Option<u64> {
        let mut need = None;
        for e in self.extent_range(offset, len) {
            self.set_sync(e as usize);
            if self.syncing[e as usize] {
                self.redirtied.set(e as usize, true);
            }
            if let Some(s) = self.require(e as usize) {
                need = Some(s);
            }
        }
        need
    }

    /// Extent `e` is now identical on both legs.
    pub fn sync_done(&mut self, e: u32) {
        if self.syncmap[e as usize] {
            self.update(e as usize, |m| m.syncmap.set(e as usize, false));
            self.dirty_bytes -= self.extent_bytes(e);
        }
        self.redirtied.set(e as usize, false);
        self.maybe_clear(e as usize);
    }

    /// A synchronisation pass over extent `e` begins: from now on a
    /// [`ActiveMap::need_sync`] on it is remembered, so that
    /// [`ActiveMap::sync_finish`] does not clear a bit that was set again
    /// while the pass ran.
    pub fn sync_begin(&mut self, e: u32) {
        self.redirtied.set(e as usize, false);
        self.syncing.set(e as usize, true);
    }

    /// The pass over `e` copied every byte. Clears its sync bit unless it
    /// was marked again meanwhile; returns whether it was cleared.
    pub fn sync_finish(&mut self, e: u32) -> bool {
        self.syncing.set(e as usize, false);
        if self.redirtied[e as usize] {
            self.redirtied.set(e as usize, false);
            return false;
        }
        self.sync_done(e);
        true
    }

    /// The pass over `e` was interrupted: the bit stays.
    pub fn sync_abort(&mut self, e: u32) {
        self.syncing.set(e as usize, false);
        self.redirtied.set(e as usize, false);
    }

    /// The next extent at or after `from` that needs synchronisation.
    pub fn next_dirty(&self, from: u32) -> Option<u32> {
        let from = from as usize;
        if from >= self.syncmap.len() {
            return None;
        }
        self.syncmap[from..].first_one().map(|i| (from + i) as u32)
    }

    /// Marks every extent set in `bitmap` (one bit per extent, LSB first,
    /// as on disk) as needing synchronisation: the peer's dirty map at
    /// handshake. Returns a sequence to wait for when bits had to be added
    /// to the on-disk map.
    pub fn merge(&mut self, bitmap: &[u8]) -> Option<u64> {
        let bits = bitmap.view_bits::<Lsb0>();
        let mut need = None;
        for e in 0..(self.nextents as usize).min(bits.len()) {
            if bits[e] {
                self.set_sync(e);
                if let Some(s) = self.require(e) {
                    need = Some(s);
                }
            }
        }
        need
    }

    /// Marks every extent as needing synchronisation (full sync).
    pub fn mark_all(&mut self) -> Option<u64> {
        let mut need = None;
        for e in 0..self.nextents as usize {
            self.set_sync(e);
            if let Some(s) = self.require(e) {
                need = Some(s);
            }
        }
        need
    }

    /// Forgets every sync bit: the legs are known identical (the peer
    /// completed a synchronisation). Bits drop from disk lazily.
    pub fn clear_all_sync(&mut self) {
        let ones: Vec<usize> = self.syncmap.iter_ones().collect();
        for e in ones {
            self.sync_done(e as u32);
        }
    }

    /// Empties the keepdirty list (a clean stop: nothing is in flight, so
    /// only extents that need synchronisation must stay marked on disk).
    /// The bits drop with the next batch.
    pub fn clear_keepdirty(&mut self) {
        while self.lru_tail != NIL {
            self.evict(self.lru_tail);
        }
    }

    /// The sync bits as an on-disk style bitmap (for the handshake).
    pub fn sync_bitmap(&self) -> Vec<u8> {
        self.syncmap.as_raw_slice().to_vec()
    }

    /// Does extent `e` need synchronisation?
    pub fn needs_sync(&self, e: u32) -> bool {
        self.syncmap[e as usize]
    }

    /// Extents needing synchronisation.
    pub fn dirty_extents(&self) -> u64 {
        self.syncmap.count_ones() as u64
    }

    /// Bytes needing synchronisation (what `hastctl list` calls `dirty`).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }

    /// Extents with writes in flight.
    pub fn inflight_extents(&self) -> u64 {
        self.pending.iter().filter(|&&p| p > 0).count() as u64
    }

    /// Extents currently set in the on-disk image (durable view).
    pub fn ondisk_extents(&self) -> u64 {
        self.durable.count_ones() as u64
    }

    /// Counters.
    pub fn stats(&self) -> ActiveMapStats {
        self.stats
    }

    /// Is everything up to `seq` durable?
    pub fn is_durable(&self, seq: u64) -> bool {
        self.durable_seq >= seq
    }

    /// Is there anything to write (set or lazy clear)?
    pub fn has_changes(&self) -> bool {
        self.changed.any()
    }

    /// Image of sector `s` as wanted now.
    pub fn sector_image(&self, s: usize) -> Vec<u8> {
        let mut img = vec![0u8; self.sectorsize];
        let first = s * self.sectorsize * 8;
        let last = ((s + 1) * self.sectorsize * 8).min(self.nextents as usize);
        let bits = img.view_bits_mut::<Lsb0>();
        for e in first..last {
            if self.wanted(e) {
                bits.set(e - first, true);
            }
        }
        img
    }

    /// Takes the changed sectors for writing. Returns None when nothing
    /// changed.
    ///
    /// # Panics
    /// If a previous batch has not been reported with
    /// [`ActiveMap::persisted`]: batches must be written one at a time, or
    /// an older image could land after a newer one.
    pub fn take_persist(&mut self) -> Option<PersistBatch> {
        assert!(self.outstanding.is_none(), "one activemap batch at a time");
        if !self.changed.any() {
            return None;
        }
        let sectors: Vec<usize> = self.changed.iter_ones().collect();
        self.changed.fill(false);
        let mut out = Vec::with_capacity(sectors.len());
        for s in sectors {
            let img = self.sector_image(s);
            // Until the batch is known to be on disk, a bit counts as
            // durable only if both the old and the new image have it.
            let first = s * self.sectorsize * 8;
            let bits = img.view_bits::<Lsb0>();
            let last = ((s + 1) * self.sectorsize * 8).min(self.nextents as usize);
            for e in first..last {
                if !bits[e - first] {
                    self.durable.set(e, false);
                }
            }
            out.push((s, img));
        }
        self.outstanding = Some(self.seq);
        self.last_taken = self.seq;
        Some(PersistBatch {
            upto: self.seq,
            sectors: out,
        })
    }

    /// The batch is on disk (written, and flushed when metaflush is on).
    pub fn persisted(&mut self, batch: &PersistBatch) {
        assert_eq!(self.outstanding, Some(batch.upto), "unexpected batch");
        self.outstanding = None;
        for (s, img) in &batch.sectors {
            let first = s * self.sectorsize * 8;
            let bits = img.view_bits::<Lsb0>();
            let last = ((s + 1) * self.sectorsize * 8).min(self.nextents as usize);
            for e in first..last {
                if bits[e - first] {
                    self.durable.set(e, true);
                }
            }
        }
        self.durable_seq = self.durable_seq.max(batch.upto);
        self.stats.updates += 1;
    }

    /// The batch could not be written: its sectors are retried with the
    /// next batch.
    pub fn persist_failed(&mut self, batch: &PersistBatch) {
        assert_eq!(self.outstanding, Some(batch.upto), "unexpected batch");
        self.outstanding = None;
        for (s, _) in &batch.sectors {
            self.changed.set(*s, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXT: u32 = 4096;

    /// Writes every batch as the local disk does with metaflush: the
    /// sectors, then a device flush (which also makes the data written
    /// before it durable, so the clears it ripens go in the next batch).
    fn persist_all(map: &mut ActiveMap, disk: &mut [u8]) {
        while let Some(b) = map.take_persist() {
            for (s, img) in &b.sectors {
                disk[s * map.sectorsize()..(s + 1) * map.sectorsize()].copy_from_slice(img);
            }
            map.local_flush_begin();
            map.local_flush_done();
            map.persisted(&b);
        }
    }

    fn bit(disk: &[u8], e: u32) -> bool {
        disk.view_bits::<Lsb0>()[e as usize]
    }

    #[test]
    fn first_write_needs_persist_then_fast_path() {
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 4, 512);
        let mut disk = vec![0u8; 512];
        let s = m.write_start(0, 100).expect("first write marks the map");
        assert!(!m.is_durable(s));
        persist_all(&mut m, &mut disk);
        assert!(m.is_durable(s));
        assert!(bit(&disk, 0));
        m.write_complete(0, 100);
        // Still in keepdirty: no metadata write for a rewrite.
        assert_eq!(m.write_start(10, 10), None);
        m.write_complete(10, 10);
        assert_eq!(m.stats().updates, 1);
    }

    #[test]
    fn eviction_clears_lazily() {
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 2, 512);
        let mut disk = vec![0u8; 512];
        for e in 0..3u64 {
            m.write_start(e * u64::from(EXT), 1);
            persist_all(&mut m, &mut disk);
            m.write_complete(e * u64::from(EXT), 1);
        }
        // Extent 0 left the keepdirty list when 2 entered; its clear rode
        // along with the batch that set bit 2.
        assert!(!bit(&disk, 0));
        assert!(bit(&disk, 1) && bit(&disk, 2));
        assert!(!m.has_changes());
    }

    #[test]
    fn need_sync_keeps_bits_and_counts_dirty() {
        let mut m = ActiveMap::new(10 * u64::from(EXT) + 100, EXT, 1, 512);
        let mut disk = vec![0u8; 512];
        let last = 10 * u64::from(EXT);
        m.write_start(last, 50);
        persist_all(&mut m, &mut disk);
        assert_eq!(m.need_sync(last, 50), None);
        m.write_complete(last, 50);
        m.write_start(0, 1);
        persist_all(&mut m, &mut disk);
        m.write_complete(0, 1);
        assert!(bit(&disk, 10), "needs-sync extent stays marked");
        assert_eq!(m.dirty_extents(), 1);
        assert_eq!(m.dirty_bytes(), 100, "short last extent");
        m.sync_done(10);
        m.write_start(u64::from(EXT), 1);
        persist_all(&mut m, &mut disk);
        assert!(!bit(&disk, 10));
    }

    #[test]
    fn load_marks_for_sync() {
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 4, 512);
        let mut img = vec![0u8; 512];
        img[0] = 0b1010_0000;
        m.load(&img);
        assert_eq!(m.dirty_extents(), 2);
        assert!(m.needs_sync(5) && m.needs_sync(7));
        // Already on disk: a write there needs no metadata write.
        assert_eq!(m.write_start(5 * u64::from(EXT), 1), None);
    }

    #[test]
    fn no_clear_before_the_data_is_flushed() {
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 1, 512);
        let mut disk = vec![0u8; 512];
        m.write_start(0, 1);
        persist_all(&mut m, &mut disk);
        m.write_complete(0, 1);
        // Evicted while its data may still be in the disk cache: the
        // batch marking extent 1 must not clear extent 0.
        m.write_start(u64::from(EXT), 1);
        let b = m.take_persist().unwrap();
        let img = b.sectors[0].1.clone();
        assert!(bit(&img, 0) && bit(&img, 1), "{img:?}");
        // The batch's flush makes extent 0's data durable; the next batch
        // clears it.
        m.local_flush_begin();
        m.local_flush_done();
        m.persisted(&b);
        persist_all(&mut m, &mut disk);
        assert!(!bit(&disk, 0) && bit(&disk, 1));
        // A failed flush leaves the extent waiting for the next one.
        m.write_complete(u64::from(EXT), 1);
        m.write_start(2 * u64::from(EXT), 1);
        m.local_flush_begin();
        m.local_flush_failed();
        let b = m.take_persist().unwrap();
        assert!(bit(&b.sectors[0].1, 1), "extent 1 stays marked");
        m.persisted(&b);
    }

    #[test]
    fn rewrite_during_inflight_clear_waits() {
        // Extent 0 is being cleared by an outstanding batch when a new
        // write arrives: the write must wait for a later batch.
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 1, 512);
        let mut disk = vec![0u8; 512];
        m.write_start(0, 1);
        persist_all(&mut m, &mut disk);
        m.write_complete(0, 1);
        // Its data is flushed, so its clear may be written.
        m.local_flush_begin();
        m.local_flush_done();
        m.write_start(u64::from(EXT), 1); // evicts 0
        let b = m.take_persist().unwrap();
        let s = m
            .write_start(0, 1)
            .expect("0 is not durable during the clear");
        m.persisted(&b);
        assert!(!m.is_durable(s));
        persist_all(&mut m, &mut disk);
        assert!(m.is_durable(s));
    }

    #[test]
    fn sync_pass_keeps_bits_marked_again_meanwhile() {
        let mut m = ActiveMap::new(8 * u64::from(EXT), EXT, 2, 512);
        m.need_sync(0, 3 * u64::from(EXT));
        assert_eq!(m.next_dirty(0), Some(0));
        m.sync_begin(0);
        assert!(m.sync_finish(0));
        m.sync_begin(1);
        m.need_sync(u64::from(EXT), 1); // a remote leg failed meanwhile
        assert!(!m.sync_finish(1), "re-dirtied extent stays");
        assert!(m.needs_sync(1));
        m.sync_begin(2);
        m.sync_abort(2);
        assert!(m.needs_sync(2));
        assert_eq!(m.next_dirty(0), Some(1));
        assert_eq!(m.next_dirty(3), None);
        assert_eq!(m.next_dirty(100), None);
        m.clear_all_sync();
        assert_eq!(m.dirty_extents(), 0);
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn merge_and_mark_all() {
        let mut m = ActiveMap::new(20 * u64::from(EXT), EXT, 2, 512);
        let mut disk = vec![0u8; 512];
        let s = m
            .merge(&[0b0000_0101, 0b1000_0000])
            .expect("new bits persist");
        persist_all(&mut m, &mut disk);
        assert!(m.is_durable(s));
        assert_eq!(m.dirty_extents(), 3);
        assert!(m.needs_sync(0) && m.needs_sync(2) && m.needs_sync(15));
        assert_eq!(m.sync_bitmap()[..2], [0b0000_0101, 0b1000_0000]);
        m.mark_all();
        persist_all(&mut m, &mut disk);
        assert_eq!(m.dirty_extents(), 20);
        assert_eq!(m.dirty_bytes(), 20 * u64::from(EXT));
        assert_eq!(disk[..3], [0xff, 0xff, 0x0f]);
    }

    #[test]
    fn clean_stop_drops_keepdirty_marks() {
        let mut m = ActiveMap::new(8 * u64::from(EXT), EXT, 4, 512);
        let mut disk = vec![0u8; 512];
        for e in 0..3u64 {
            m.write_start(e * u64::from(EXT), 1);
            persist_all(&mut m, &mut disk);
            m.write_complete(e * u64::from(EXT), 1);
        }
        m.need_sync(u64::from(EXT), 1);
        assert_eq!(disk[0], 0b111);
        m.clear_keepdirty();
        persist_all(&mut m, &mut disk);
        assert_eq!(disk[0], 0b010, "only the extent needing sync stays marked");
        // A new write after the clear marks again.
        assert!(m.write_start(0, 1).is_some());
    }

    #[test]
    fn sequential_stream_marks_ahead() {
        // keepdirty 32: four extents of lookahead.
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 32, 512);
        let mut disk = vec![0u8; 512];
        let half = u64::from(EXT) / 2;
        let (mut waits, mut background) = (0, 0);
        for i in 0..32u64 {
            let need = m.write_start(i * half, half);
            if let Some(s) = m.take_lookahead() {
                // What the disk layer does in the background.
                assert_ne!(need, Some(s));
                background += 1;
                persist_all(&mut m, &mut disk);
            }
            if need.is_some_and(|s| !m.is_durable(s)) {
                waits += 1;
                persist_all(&mut m, &mut disk);
            }
            m.write_complete(i * half, half);
        }
        // 16 extents written front to back: only the first write (which
        // starts the stream) waits; marks are laid by background updates,
        // one extent at a time while the run is short, then two at a time
        // (half the lookahead).
        assert_eq!(waits, 1);
        assert!(
            (7..=12).contains(&background),
            "{background} background updates"
        );
        assert!(bit(&disk, 16), "marked ahead of the stream");
        assert!(!bit(&disk, 20), "no further than the lookahead");
        assert!(m.ondisk_extents() <= 32, "bounded by keepdirty");
        // Random writes do not mark ahead.
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 32, 512);
        let mut disk = vec![0u8; 512];
        for e in [7u64, 3, 40, 12] {
            assert!(m.write_start(e * u64::from(EXT), half).is_some());
            persist_all(&mut m, &mut disk);
            m.write_complete(e * u64::from(EXT), half);
        }
        assert_eq!(m.ondisk_extents(), 4);
        // A short run (one extent) marks one extent ahead at most.
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 32, 512);
        let mut disk = vec![0u8; 512];
        for i in 0..2u64 {
            m.write_start(10 * u64::from(EXT) + i * half, half);
            m.take_lookahead();
            persist_all(&mut m, &mut disk);
            m.write_complete(10 * u64::from(EXT) + i * half, half);
        }
        assert_eq!(m.ondisk_extents(), 2, "extent 10 and one guess");
        // A small keepdirty set gets no guesses.
        let mut m = ActiveMap::new(64 * u64::from(EXT), EXT, 7, 512);
        let mut disk = vec![0u8; 512];
        for i in 0..4u64 {
            m.write_start(i * half, half);
            persist_all(&mut m, &mut disk);
            m.write_complete(i * half, half);
        }
        assert_eq!(disk[0], 0b11);
    }

    #[test]
    fn extents_held_until_the_peer_flushes() {
        // keepdirty 1: writing extent 1 evicts extent 0.
        let mut m = ActiveMap::new(8 * u64::from(EXT), EXT, 1, 512);
        let mut disk = vec![0u8; 512];
        let e = u64::from(EXT);
        m.write_start(0, 1);
        persist_all(&mut m, &mut disk);
        m.hold_until_peer_flush(0, 1);
        m.write_complete(0, 1);
        m.write_start(e, 1);
        persist_all(&mut m, &mut disk);
        assert!(bit(&disk, 0), "evicted but the peer has not flushed it");
        assert_eq!(m.held_only(), 1);
        m.peer_flush_begin();
        // Completed after the flush was sent: not covered by it.
        m.hold_until_peer_flush(e, 1);
        m.write_complete(e, 1);
        m.write_start(2 * e, 1);
        m.peer_flush_done();
        persist_all(&mut m, &mut disk);
        assert!(!bit(&disk, 0), "released by the flush");
        assert!(bit(&disk, 1), "held for the next flush");
        assert!(m.holds());
        // The peer is lost before it flushed extent 1: it needs sync.
        m.peer_lost();
        assert!(m.needs_sync(1) && !m.needs_sync(0));
        assert!(!m.holds());
        m.write_complete(2 * e, 1);
    }

    #[test]
    fn extent_ranges() {
        let m = ActiveMap::new(10 * u64::from(EXT) + 100, EXT, 1, 512);
        assert_eq!(m.extent_range(0, 0), 0..0);
        assert_eq!(m.extent_range(0, 1), 0..1);
        assert_eq!(m.extent_range(u64::from(EXT) - 1, 2), 0..2);
        assert_eq!(m.extent_range(10 * u64::from(EXT), 1 << 40), 10..11);
        assert_eq!(m.extent_range(1 << 40, 1), 0..0);
    }

    // ---- crash model -------------------------------------------------
    //
    // The bitmap area is modelled as a disk with "written" and "durable"
    // contents: a sector write lands in `written`; a flush copies written
    // to durable; a crash keeps, per sector, either the durable or the
    // written content (the write may or may not have reached the media).
    // The driver interleaves write starts, batch writes, flushes, data
    // issues, completions and leg failures in any order the worker allows,
    // then crashes and checks the invariant.

    #[derive(Debug, Clone)]
    enum Op {
        Start { ext: u8, span: u8 },
        TakeBatch,
        WriteSector,
        Flush,
        Issue,
        Complete { which: u8, failed: bool },
        SyncDone { ext: u8 },
        PeerFlushBegin,
        PeerFlushDone,
        PeerLost,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40, 1u8..3).prop_map(|(ext, span)| Op::Start { ext, span }),
            2 => Just(Op::TakeBatch),
            3 => Just(Op::WriteSector),
            2 => Just(Op::Flush),
            3 => Just(Op::Issue),
            3 => (any::<u8>(), any::<bool>()).prop_map(|(which, failed)| Op::Complete { which, failed }),
            1 => (0u8..40).prop_map(|ext| Op::SyncDone { ext }),
            1 => Just(Op::PeerFlushBegin),
            1 => Just(Op::PeerFlushDone),
            1 => prop_oneof![9 => Just(Op::Flush), 1 => Just(Op::PeerLost)],
        ]
    }

    struct Write {
        off: u64,
        len: u64,
        seq: Option<u64>,
        issued: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn crash_never_loses_an_inflight_extent(
            keepdirty in 1u32..6,
            metaflush in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..120),
            crash_pick in any::<u64>(),
        ) {
            // 40 extents, 1-byte "sectors" so that several sectors exist.
            let sector = 1usize;
            let mut m = ActiveMap::new(40 * u64::from(EXT), EXT, keepdirty, sector as u32);
            let nsec = m.sectors();
            let mut written = vec![0u8; nsec];
            let mut durable = vec![0u8; nsec];
            let mut batch: Option<(PersistBatch, usize)> = None;
            let mut writes: Vec<Write> = Vec::new();
            let mut synced_needed = bitvec![u8, Lsb0; 0; 40];
            // Extents whose peer copy is not known durable (held, and
            // captured by the peer flush in progress).
            let mut held = bitvec![u8, Lsb0; 0; 40];
            let mut closing = bitvec![u8, Lsb0; 0; 40];
            let mut flushing = false;
            // Extents whose completed data write may still be in the
            // disk's volatile cache (no device flush since).
            let mut data_unflushed = bitvec![u8, Lsb0; 0; 40];

            for op in ops {
                match op {
                    Op::Start { ext, span } => {
                        let off = u64::from(ext) * u64::from(EXT) + 7;
                        let len = u64::from(span) * u64::from(EXT) - 7;
                        let seq = m.write_start(off, len);
                        writes.push(Write { off, len, seq, issued: false });
                    }
                    Op::TakeBatch => {
                        if batch.is_none() {
                            if let Some(b) = m.take_persist() {
                                batch = Some((b, 0));
                            }
                        }
                    }
                    Op::WriteSector => {
                        if let Some((b, next)) = &mut batch {
                            let (s, img) = &b.sectors[*next];
                            written[*s] = img[0];
                            *next += 1;
                            if *next == b.sectors.len() {
                                if metaflush {
                                    // The batch's flush is a device flush:
                                    // data written before it is durable too.
                                    m.local_flush_begin();
                                    durable.copy_from_slice(&written);
                                    data_unflushed.fill(false);
                                    m.local_flush_done();
                                }
                                let (b, _) = batch.take().unwrap();
                                m.persisted(&b);
                            }
                        }
                    }
                    Op::Flush => {
                        m.local_flush_begin();
                        durable.copy_from_slice(&written);
                        data_unflushed.fill(false);
                        m.local_flush_done();
                    }
                    Op::Issue => {
                        // Issue the oldest write whose map update is durable.
                        if let Some(w) = writes.iter_mut().find(|w| !w.issued && w.seq.is_none_or(|s| m.is_durable(s))) {
                            w.issued = true;
                        }
                    }
                    Op::Complete { which, failed } => {
                        let issued: Vec<usize> = (0..writes.len()).filter(|&i| writes[i].issued).collect();
                        if !issued.is_empty() {
                            let i = issued[which as usize % issued.len()];
                            let w = writes.remove(i);
                            if failed {
                                prop_assert_eq!(m.need_sync(w.off, w.len), None);
                                for e in m.extent_range(w.off, w.len) {
                                    synced_needed.set(e as usize, true);
                                }
                            } else {
                                m.hold_until_peer_flush(w.off, w.len);
                                for e in m.extent_range(w.off, w.len) {
                                    held.set(e as usize, true);
                                }
                            }
                            m.write_complete(w.off, w.len);
                            for e in m.extent_range(w.off, w.len) {
                                data_unflushed.set(e as usize, true);
                            }
                        }
                    }
                    Op::PeerFlushBegin => {
                        if !flushing {
                            m.peer_flush_begin();
                            flushing = true;
                            closing |= &held;
                            held.fill(false);
                        }
                    }
                    Op::PeerFlushDone => {
                        if flushing {
                            m.peer_flush_done();
                            flushing = false;
                            closing.fill(false);
                        }
                    }
                    Op::PeerLost => {
                        m.peer_lost();
                        flushing = false;
                        for e in held.iter_ones().chain(closing.iter_ones()).collect::<Vec<_>>() {
                            synced_needed.set(e, true);
                        }
                        held.fill(false);
                        closing.fill(false);
                    }
                    Op::SyncDone { ext } => {
                        if m.needs_sync(u32::from(ext)) && m.pending[ext as usize] == 0 {
                            m.sync_done(u32::from(ext));
                            synced_needed.set(ext as usize, false);
                        }
                    }
                }
                // The maintained count matches its definition.
                let recount = (0..40).filter(|&e| m.is_held_only(e)).count();
                prop_assert_eq!(m.held_only(), recount);
            }

            // Crash: each sector is either its durable or its written image
            // (with metaflush off, only what was written is guaranteed to
            // have reached the device for a process crash; model that case
            // as "written").
            let mut after = vec![0u8; nsec];
            for s in 0..nsec {
                let pick_written = !metaflush || (crash_pick >> (s % 64)) & 1 == 1;
                after[s] = if pick_written { written[s] } else { durable[s] };
            }
            // Both possible images must hold every issued, uncompleted write
            // and every extent that needs sync.
            for img in [&after, if metaflush { &durable } else { &written }] {
                let bits = img.view_bits::<Lsb0>();
                for w in writes.iter().filter(|w| w.issued) {
                    for e in m.extent_range(w.off, w.len) {
                        prop_assert!(bits[e as usize], "in-flight extent {} lost by crash", e);
                    }
                }
                for e in synced_needed.iter_ones() {
                    prop_assert!(bits[e], "needs-sync extent {} lost by crash", e);
                }
                for e in held.iter_ones().chain(closing.iter_ones()) {
                    prop_assert!(bits[e], "extent {} not yet flushed on the peer lost by crash", e);
                }
                // Only meaningful with metaflush: without it nothing is
                // durable across a power cut anyway.
                if metaflush {
                    for e in data_unflushed.iter_ones() {
                        prop_assert!(bits[e], "extent {} cleared before its data was flushed locally", e);
                    }
                }
            }
        }
    }
}
