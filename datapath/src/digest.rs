//! Block checksums for `hastctl verify` and the checksum-based
//! synchronisation (pure: no I/O). Both nodes digest the same blocks with
//! the same algorithm and compare the digests instead of the data.
//!
//! A range is cut into blocks of `block` bytes from its start (the last
//! one may be short); each block gets one digest, in order. `xxh3` (64-bit
//! XXH3, 8 bytes, little-endian) is the default: fast, not cryptographic;
//! `sha256` (32 bytes) on request, for a peer one does not trust to be
//! merely unlucky.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Bytes per digest block (a 4 KiB random write differs in one block).
pub const DIGEST_BLOCK: u32 = 4096;

/// A digest algorithm (its wire code in `Checksums` requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algo {
    /// 64-bit XXH3.
    #[default]
    Xxh3,
    /// SHA-256.
    Sha256,
}

impl Algo {
    /// Every algorithm.
    pub const ALL: [Algo; 2] = [Algo::Xxh3, Algo::Sha256];

    /// Wire code.
    pub const fn code(self) -> u8 {
        match self {
            Algo::Xxh3 => 1,
            Algo::Sha256 => 2,
        }
    }

    /// From the wire code.
    pub const fn from_code(c: u8) -> Option<Algo> {
        match c {
            1 => Some(Algo::Xxh3),
            2 => Some(Algo::Sha256),
            _ => None,
        }
    }

    /// Bytes of one digest.
    pub const fn digest_len(self) -> usize {
        match self {
            Algo::Xxh3 => 8,
            Algo::Sha256 => 32,
        }
    }

    /// Name as written on the command line and in reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algo::Xxh3 => "xxh3",
            Algo::Sha256 => "sha256",
        }
    }

    /// Appends the digest of `block` to `out`.
    pub fn digest_into(self, block: &[u8], out: &mut Vec<u8>) {
        match self {
            Algo::Xxh3 => out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(block).to_le_bytes()),
            Algo::Sha256 => out.extend_from_slice(&Sha256::digest(block)),
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> Result<Algo, String> {
        Algo::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown checksum algorithm '{s}' (expected xxh3 or sha256)"))
    }
}

/// Number of blocks of `block` bytes covering `len` bytes.
pub fn block_count(len: u64, block: u32) -> u64 {
    len.div_ceil(u64::from(block.max(1)))
}

/// Appends the digest of every block of `data` (blocks of `block` bytes,
/// the last one possibly short) to `out`.
pub fn digest_blocks(algo: Algo, data: &[u8], block: u32, out: &mut Vec<u8>) {
    for b in data.chunks(block.max(1) as usize) {
        algo.digest_into(b, out);
    }
}

/// The digest of `len` zero bytes (a hole is digested without reading it).
pub fn zero_digest(algo: Algo, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(algo.digest_len());
    algo.digest_into(&vec![0u8; len], &mut out);
    out
}

/// Digests of a range of `len` bytes starting at a block boundary whose
/// content is given piece by piece: data slices, or runs of zeros (holes)
/// that are not read. Pieces must cover the range in order; holes and data
/// may start and end anywhere (a block that mixes both is assembled).
#[derive(Debug)]
pub struct BlockDigester {
    algo: Algo,
    block: usize,
    /// The block being assembled (only when a piece ends inside it).
    partial: Vec<u8>,
    /// Digest of a whole zero block, computed once.
    zero: Vec<u8>,
    out: Vec<u8>,
}

impl BlockDigester {
    /// A digester for blocks of `block` bytes.
    pub fn new(algo: Algo, block: u32) -> BlockDigester {
        let block = block.max(1) as usize;
        BlockDigester {
            algo,
            block,
            partial: Vec::new(),
            zero: zero_digest(algo, block),
            out: Vec::new(),
        }
    }

    /// The next `data.len()` bytes of the range.
    pub fn data(&mut self, mut data: &[u8]) {
        if !self.partial.is_empty() {
            let take = (self.block - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == self.block {
                self.algo.digest_into(&self.partial, &mut self.out);
                self.partial.clear();
            }
        }
        let whole = data.len() / self.block * self.block;
        digest_blocks(self.algo, &data[..whole], self.block as u32, &mut self.out);
        self.partial.extend_from_slice(&data[whole..]);
    }

    /// The next `len` bytes of the range are zeros.
    pub fn zeros(&mut self, mut len: u64) {
        if !self.partial.is_empty() {
            let take = ((self.block - self.partial.len()) as u64).min(len) as usize;
            self.partial.resize(self.partial.len() + take, 0);
            len -= take as u64;
            if self.partial.len() == self.block {
                self.algo.digest_into(&self.partial, &mut self.out);
                self.partial.clear();
            }
        }
        let whole = len / self.block as u64;
        for _ in 0..whole {
            self.out.extend_from_slice(&self.zero);
        }
        self.partial
            .resize(self.partial.len() + (len % self.block as u64) as usize, 0);
    }

    /// The digests (the last block short if the range ended inside one).
    pub fn finish(mut self) -> Vec<u8> {
        if !self.partial.is_empty() {
            self.algo.digest_into(&self.partial, &mut self.out);
        }
        self.out
    }
}

/// The runs of block indexes whose digests differ between `a` and `b`
/// (digests of `dlen` bytes each; a missing digest counts as different).
pub fn differing_runs(a: &[u8], b: &[u8], dlen: usize) -> Vec<Range<u64>> {
    let n = a.len().max(b.len()).div_ceil(dlen.max(1));
    let mut runs: Vec<Range<u64>> = Vec::new();
    for i in 0..n {
        let da = a.get(i * dlen..(i + 1) * dlen);
        let db = b.get(i * dlen..(i + 1) * dlen);
        if da.is_some() && da == db {
            continue;
        }
        let i = i as u64;
        match runs.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // SHA-256("abc"), the FIPS 180-2 example.
        let mut out = Vec::new();
        Algo::Sha256.digest_into(b"abc", &mut out);
        assert_eq!(
            out[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "sha256(abc) starts ba7816bf"
        );
        assert_eq!(out.len(), 32);
        let mut x = Vec::new();
        Algo::Xxh3.digest_into(b"", &mut x);
        // XXH3_64bits of the empty input, from the reference implementation.
        assert_eq!(x, 0x2D06_8005_38D3_94C2u64.to_le_bytes());
        assert_eq!("sha256".parse::<Algo>(), Ok(Algo::Sha256));
        assert!("md5"
            .parse::<Algo>()
            .unwrap_err()
            .contains("xxh3 or sha256"));
        for a in Algo::ALL {
            assert_eq!(Algo::from_code(a.code()), Some(a));
        }
    }

    #[test]
    fn runs() {
        let a = [1u8, 1, 2, 2, 3, 3, 4, 4];
        let b = [1u8, 1, 9, 9, 9, 9, 4, 4];
        assert_eq!(differing_runs(&a, &b, 2), vec![1..3]);
        assert_eq!(differing_runs(&a, &a, 2), Vec::<Range<u64>>::new());
        assert_eq!(differing_runs(&a, &b[..4], 2), vec![1..4]);
        assert_eq!(block_count(8193, 4096), 3);
    }

    proptest! {
        /// Whatever the pieces, the digests are those of the whole buffer.
        #[test]
        fn pieces_digest_like_the_whole(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            cuts in proptest::collection::vec((any::<u16>(), any::<bool>()), 0..12),
            block_shift in 9u32..13,
        ) {
            let block = 1u32 << block_shift;
            // Holes are zeroed in the reference copy.
            let mut reference = data.clone();
            let mut points: Vec<(usize, bool)> = cuts.iter().map(|&(c, h)| (c as usize % (data.len() + 1), h)).collect();
            points.sort();
            let mut d = BlockDigester::new(Algo::Xxh3, block);
            let mut pos = 0;
            for (cut, hole) in points.into_iter().chain([(data.len(), false)]) {
                if cut < pos { continue; }
                if hole {
                    reference[pos..cut].fill(0);
                    d.zeros((cut - pos) as u64);
                } else {
                    d.data(&data[pos..cut]);
                }
                pos = cut;
            }
            let mut want = Vec::new();
            digest_blocks(Algo::Xxh3, &reference, block, &mut want);
            prop_assert_eq!(d.finish(), want);
        }
    }
}
