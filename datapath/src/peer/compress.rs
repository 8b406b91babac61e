//! Wire compression of data payloads (hast.conf `compression`), pure.
//!
//! - `none`: payloads travel as they are (the zero-copy path).
//! - `hole` (the default): a payload of zeros travels as a `Zero` request,
//!   without payload; anything else as it is.
//! - `lzf`, `lz4`: as `hole`, and other payloads are compressed when that
//!   saves at least an eighth of the bytes; the frame then carries the
//!   algorithm's flag (`flags::LZF` / `flags::LZ4`) and `length` keeps
//!   the uncompressed size. Incompressible data travels as it is, with no
//!   flag: each frame says for itself how to read it, so a receiver needs
//!   no setting to decompress.
//!
//! See docs/protocol.md ("Compression").

use std::fmt;
use std::str::FromStr;

use super::frame::is_zero;
use super::proto::{flags, FrameError};

/// What `compression` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Payloads as they are.
    None,
    /// Zero payloads as `Zero` requests (the default).
    #[default]
    Hole,
    /// `hole`, then LZF.
    Lzf,
    /// `hole`, then LZ4.
    Lz4,
}

impl Compression {
    /// Every setting.
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Hole,
        Compression::Lzf,
        Compression::Lz4,
    ];

    /// The hast.conf keyword.
    pub const fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Hole => "hole",
            Compression::Lzf => "lzf",
            Compression::Lz4 => "lz4",
        }
    }

    /// Are zero payloads sent as `Zero` requests?
    pub const fn holes(self) -> bool {
        !matches!(self, Compression::None)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown compression '{s}' (expected none, hole, lzf or lz4)"))
    }
}

/// How one data payload travels.
#[derive(Debug, PartialEq, Eq)]
pub enum Wire {
    /// As it is.
    AsIs,
    /// All zeros: as a `Zero` request (replies: not applicable).
    Zero,
    /// Compressed with the algorithm of `flag` (`flags::LZ4` or
    /// `flags::LZF`).
    Compressed {
        /// The frame flag naming the algorithm.
        flag: u8,
        /// The compressed bytes.
        bytes: Vec<u8>,
    },
}

/// The largest compressed size worth sending for `len` bytes: at least an
/// eighth saved.
fn worth(len: usize) -> usize {
    len - len / 8
}

/// Decides how `data` travels under `mode`. `zero_ok`: the frame may
/// become a `Zero` request (a Write; not a ReadReply).
pub fn encode(mode: Compression, data: &[u8], zero_ok: bool) -> Wire {
    if mode == Compression::None || data.is_empty() {
        return Wire::AsIs;
    }
    if zero_ok && is_zero(data) {
        return Wire::Zero;
    }
    let budget = worth(data.len());
    if budget == 0 {
        return Wire::AsIs;
    }
    match mode {
        Compression::None | Compression::Hole => Wire::AsIs,
        Compression::Lz4 => {
            let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
            match lz4_flex::block::compress_into(data, &mut out) {
                Ok(n) if n > 0 && n <= budget => {
                    out.truncate(n);
                    Wire::Compressed {
                        flag: flags::LZ4,
                        bytes: out,
                    }
                }
                _ => Wire::AsIs,
            }
        }
        Compression::Lzf => {
            // LZF stops as soon as the output would not fit: incompressible
            // data costs little.
            let mut out = vec![0u8; budget];
            match lzf_rust::compress(data, &mut out) {
                Ok(n) if n > 0 => {
                    out.truncate(n);
                    Wire::Compressed {
                        flag: flags::LZF,
                        bytes: out,
                    }
                }
                _ => Wire::AsIs,
            }
        }
    }
}

/// Decompresses `src` (compressed with the algorithm of `flag`) into all
/// of `dst`. A payload that does not decompress to exactly `dst.len()`
/// bytes is a protocol error (the connection is closed, the disk is not
/// touched).
pub fn decode(flag: u8, src: &[u8], dst: &mut [u8]) -> Result<(), FrameError> {
    let n = match flag & flags::COMPRESSED {
        flags::LZ4 => lz4_flex::block::decompress_into(src, dst)
            .map_err(|e| FrameError::Malformed(format!("LZ4 payload does not decompress: {e}")))?,
        flags::LZF => lzf_rust::decompress(src, dst)
            .map_err(|e| FrameError::Malformed(format!("LZF payload does not decompress: {e}")))?,
        other => {
            return Err(FrameError::Malformed(format!(
                "compression flags {other:#04x} name no single algorithm"
            )))
        }
    };
    if n != dst.len() {
        return Err(FrameError::Malformed(format!(
            "compressed payload decompresses to {n} bytes, the frame announced {}",
            dst.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(n: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .cycle()
            .take(n)
            .copied()
            .collect()
    }

    #[test]
    fn settings() {
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        }
        assert!("gzip".parse::<Compression>().unwrap_err().contains("lz4"));
        assert_eq!(Compression::default(), Compression::Hole);
        assert!(!Compression::None.holes());
    }

    #[test]
    fn choices() {
        let zeros = vec![0u8; 4096];
        assert_eq!(encode(Compression::None, &zeros, true), Wire::AsIs);
        assert_eq!(encode(Compression::Hole, &zeros, true), Wire::Zero);
        assert_eq!(encode(Compression::Lz4, &zeros, true), Wire::Zero);
        // A reply cannot become a Zero request; it compresses instead.
        assert!(matches!(
            encode(Compression::Lz4, &zeros, false),
            Wire::Compressed {
                flag: flags::LZ4,
                ..
            }
        ));
        assert_eq!(encode(Compression::Hole, &text(4096), true), Wire::AsIs);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        for c in [Compression::Lz4, Compression::Lzf] {
            assert!(
                encode(c, &random, true) == Wire::AsIs,
                "{c}: random data sent as is"
            );
            let t = text(1 << 20);
            let Wire::Compressed { flag, bytes } = encode(c, &t, true) else {
                panic!("{c}: text compresses");
            };
            assert!(bytes.len() < t.len() / 8, "{c}: {}", bytes.len());
            let mut back = vec![0u8; t.len()];
            decode(flag, &bytes, &mut back).unwrap();
            assert_eq!(back, t);
            // Wrong size announced: refused.
            let mut short = vec![0u8; t.len() - 1];
            assert!(decode(flag, &bytes, &mut short).is_err());
        }
        assert!(decode(flags::COMPRESSED, b"x", &mut [0u8; 4]).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(0u8..4, 0..10_000), lz4 in any::<bool>()) {
            let c = if lz4 { Compression::Lz4 } else { Compression::Lzf };
            match encode(c, &data, true) {
                Wire::AsIs => {}
                Wire::Zero => prop_assert!(data.iter().all(|&b| b == 0)),
                Wire::Compressed { flag, bytes } => {
                    prop_assert!(bytes.len() <= worth(data.len()));
                    let mut back = vec![0u8; data.len()];
                    decode(flag, &bytes, &mut back).unwrap();
                    prop_assert_eq!(back, data);
                }
            }
        }

        #[test]
        fn garbage_never_panics(src in proptest::collection::vec(any::<u8>(), 0..300), n in 0usize..2000, lz4 in any::<bool>()) {
            let mut dst = vec![0u8; n];
            let _ = decode(if lz4 { flags::LZ4 } else { flags::LZF }, &src, &mut dst);
        }
    }
}
