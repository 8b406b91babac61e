//! Safe helpers for the fixed-size, NUL-terminated `char` buffers embedded in
//! the request structures (`gctl_name`, `gctl_info`, `gctl_readprov`).

use core::ffi::c_char;
use core::fmt;

/// Why a string could not be stored in a fixed C buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CBufError {
    /// The string plus its terminating NUL does not fit.
    TooLong {
        /// Length of the rejected string in bytes.
        len: usize,
        /// Longest string the buffer can hold (buffer size minus one).
        max: usize,
    },
    /// The string contains a NUL byte, which C would treat as its end.
    InteriorNul {
        /// Byte offset of the first NUL.
        pos: usize,
    },
}

impl fmt::Display for CBufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooLong { len, max } => {
                write!(f, "string of {len} bytes exceeds the {max}-byte limit")
            }
            Self::InteriorNul { pos } => write!(f, "string contains a NUL byte at offset {pos}"),
        }
    }
}

impl std::error::Error for CBufError {}

/// Copies `src` into `dst` as a NUL-terminated C string and zero-fills the
/// rest of the buffer (so no stale bytes reach the kernel).
///
/// Fails, leaving `dst` untouched, if `src` contains a NUL byte or needs more
/// than `dst.len() - 1` bytes. An empty `dst` can only fail.
pub fn copy_to_cbuf(dst: &mut [c_char], src: &str) -> Result<(), CBufError> {
    let bytes = src.as_bytes();
    if let Some(pos) = bytes.iter().position(|&b| b == 0) {
        return Err(CBufError::InteriorNul { pos });
    }
    let max = dst.len().saturating_sub(1);
    if dst.is_empty() || bytes.len() > max {
        return Err(CBufError::TooLong {
            len: bytes.len(),
            max,
        });
    }
    fill(dst, bytes);
    Ok(())
}

/// Like [`copy_to_cbuf`] but truncates instead of failing, in the spirit of
/// `strlcpy`/`snprintf`. Truncation happens on a UTF-8 character boundary and
/// at the first NUL byte of `src`, if any.
///
/// Returns the number of bytes stored (excluding the terminator). An empty
/// `dst` stores nothing and returns 0.
pub fn copy_to_cbuf_truncate(dst: &mut [c_char], src: &str) -> usize {
    if dst.is_empty() {
        return 0;
    }
    let src = src.split('\0').next().unwrap_or_default();
    let mut len = src.len().min(dst.len() - 1);
    while !src.is_char_boundary(len) {
        len -= 1;
    }
    fill(dst, &src.as_bytes()[..len]);
    len
}

/// Writes `bytes` to the start of `dst` and zeroes everything after them.
/// The caller guarantees `bytes.len() < dst.len()`.
fn fill(dst: &mut [c_char], bytes: &[u8]) {
    let (head, tail) = dst.split_at_mut(bytes.len());
    for (d, &s) in head.iter_mut().zip(bytes) {
        // Bit-preserving reinterpretation; `c_char` is `i8` or `u8`.
        *d = s as c_char;
    }
    tail.fill(0);
}

/// Views a C `char` buffer as bytes.
pub fn cbuf_as_bytes(buf: &[c_char]) -> &[u8] {
    // SAFETY: `c_char` is either `i8` or `u8`, which have the same size (1)
    // and alignment (1) as `u8`, and every bit pattern is a valid `u8`. The
    // returned slice covers exactly the same memory as `buf` and borrows it
    // for the same lifetime, so no aliasing rules are broken.
    unsafe { core::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len()) }
}

/// Returns the bytes of `buf` before the first NUL (the whole buffer if it
/// has no terminator, which the kernel never produces but a caller might).
pub fn cbuf_bytes(buf: &[c_char]) -> &[u8] {
    let bytes = cbuf_as_bytes(buf);
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// Returns the text of `buf` up to the first NUL, replacing invalid UTF-8.
pub fn cbuf_to_string(buf: &[c_char]) -> String {
    String::from_utf8_lossy(cbuf_bytes(buf)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::G_GATE_NAMELEN;

    #[test]
    fn copy_fits_and_terminates() {
        let mut buf = [0x55 as c_char; 8];
        copy_to_cbuf(&mut buf, "hast").unwrap();
        assert_eq!(cbuf_as_bytes(&buf), b"hast\0\0\0\0");
        assert_eq!(cbuf_bytes(&buf), b"hast");
        assert_eq!(cbuf_to_string(&buf), "hast");
    }

    #[test]
    fn copy_exact_limit() {
        let mut buf = [0 as c_char; 5];
        copy_to_cbuf(&mut buf, "abcd").unwrap();
        assert_eq!(cbuf_as_bytes(&buf), b"abcd\0");
    }

    #[test]
    fn copy_too_long_is_rejected_without_modifying() {
        let mut buf = [7 as c_char; 5];
        assert_eq!(
            copy_to_cbuf(&mut buf, "abcde"),
            Err(CBufError::TooLong { len: 5, max: 4 })
        );
        assert_eq!(buf, [7 as c_char; 5]);
    }

    #[test]
    fn copy_name_buffer_limits() {
        let mut buf = [0 as c_char; G_GATE_NAMELEN];
        let ok = "n".repeat(G_GATE_NAMELEN - 1);
        copy_to_cbuf(&mut buf, &ok).unwrap();
        assert_eq!(cbuf_bytes(&buf).len(), 254);
        assert_eq!(buf[254], 0);
        let too_long = "n".repeat(G_GATE_NAMELEN);
        assert_eq!(
            copy_to_cbuf(&mut buf, &too_long),
            Err(CBufError::TooLong { len: 255, max: 254 })
        );
    }

    #[test]
    fn copy_rejects_interior_nul() {
        let mut buf = [0 as c_char; 16];
        assert_eq!(
            copy_to_cbuf(&mut buf, "ab\0cd"),
            Err(CBufError::InteriorNul { pos: 2 })
        );
    }

    #[test]
    fn copy_into_empty_buffer_fails() {
        let mut buf: [c_char; 0] = [];
        assert_eq!(
            copy_to_cbuf(&mut buf, ""),
            Err(CBufError::TooLong { len: 0, max: 0 })
        );
        assert_eq!(copy_to_cbuf_truncate(&mut buf, "x"), 0);
    }

    #[test]
    fn copy_empty_string_clears() {
        let mut buf = [b'x' as c_char; 4];
        copy_to_cbuf(&mut buf, "").unwrap();
        assert_eq!(buf, [0 as c_char; 4]);
        assert_eq!(cbuf_to_string(&buf), "");
    }

    #[test]
    fn truncate_ascii() {
        let mut buf = [0x55 as c_char; 5];
        assert_eq!(copy_to_cbuf_truncate(&mut buf, "abcdefgh"), 4);
        assert_eq!(cbuf_as_bytes(&buf), b"abcd\0");
        assert_eq!(copy_to_cbuf_truncate(&mut buf, "ab"), 2);
        assert_eq!(cbuf_as_bytes(&buf), b"ab\0\0\0");
    }

    #[test]
    fn truncate_respects_char_boundary() {
        // "é" is two bytes; with room for 4 bytes "aéé" (5 bytes) must be cut
        // to "aé" (3 bytes), never splitting a code point.
        let mut buf = [0 as c_char; 5];
        assert_eq!(copy_to_cbuf_truncate(&mut buf, "aéé"), 3);
        assert_eq!(cbuf_to_string(&buf), "aé");
    }

    #[test]
    fn truncate_stops_at_nul() {
        let mut buf = [0x55 as c_char; 8];
        assert_eq!(copy_to_cbuf_truncate(&mut buf, "ab\0cd"), 2);
        assert_eq!(cbuf_as_bytes(&buf), b"ab\0\0\0\0\0\0");
    }

    #[test]
    fn unterminated_buffer_reads_whole() {
        let buf = [b'z' as c_char; 3];
        assert_eq!(cbuf_bytes(&buf), b"zzz");
    }

    #[test]
    fn non_utf8_is_lossy() {
        let buf = [0xff_u8 as c_char, b'a' as c_char, 0];
        assert_eq!(cbuf_to_string(&buf), "\u{fffd}a");
    }

    #[test]
    fn error_display() {
        assert_eq!(
            CBufError::TooLong { len: 300, max: 254 }.to_string(),
            "string of 300 bytes exceeds the 254-byte limit"
        );
        assert_eq!(
            CBufError::InteriorNul { pos: 3 }.to_string(),
            "string contains a NUL byte at offset 3"
        );
    }
}
