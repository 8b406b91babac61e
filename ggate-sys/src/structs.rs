//! `#[repr(C)]` mirrors of the request structures in FreeBSD's
//! `sys/geom/gate/g_gate.h`. Field names follow the C header so code can be
//! compared line by line with the original HAST sources.

#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::fmt;
use core::mem::size_of;
use core::ptr;

use crate::consts::{BioCmd, G_GATE_INFOSIZE, G_GATE_NAMELEN, G_GATE_VERSION};
use crate::cstr::{cbuf_to_string, copy_to_cbuf, CBufError};

/// FreeBSD `off_t`: always a signed 64-bit integer, on every architecture.
pub type off_t = i64;

/// Argument of [`G_GATE_CMD_CREATE`](crate::G_GATE_CMD_CREATE): create a new
/// provider.
///
/// With `gctl_unit` = [`G_GATE_NAME_GIVEN`](crate::G_GATE_NAME_GIVEN) the
/// provider is called `gctl_name` (HAST: `hast/<resource>`, i.e.
/// `/dev/hast/<resource>`); with [`G_GATE_UNIT_AUTO`](crate::G_GATE_UNIT_AUTO)
/// or a unit number it is `ggate<unit>`. On success the kernel stores the
/// unit number in `gctl_unit`; that number identifies the device in all later
/// requests. `EEXIST` means a provider of that name/unit already exists.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct g_gate_ctl_create {
    /// Must be [`G_GATE_VERSION`].
    pub gctl_version: c_uint,
    /// Provider size in bytes; must be a multiple of `gctl_sectorsize`.
    pub gctl_mediasize: off_t,
    /// Logical sector size in bytes (power of two).
    pub gctl_sectorsize: c_uint,
    /// [`G_GATE_FLAG_READONLY`](crate::G_GATE_FLAG_READONLY) /
    /// [`G_GATE_FLAG_WRITEONLY`](crate::G_GATE_FLAG_WRITEONLY).
    pub gctl_flags: c_uint,
    /// Maximum number of queued requests; `0` selects the kernel default.
    pub gctl_maxcount: c_uint,
    /// Seconds before an unanswered request fails with `EIO`; `0` = never.
    pub gctl_timeout: c_uint,
    /// Provider name, used when `gctl_unit` is `G_GATE_NAME_GIVEN`.
    pub gctl_name: [c_char; G_GATE_NAMELEN],
    /// Free-form description shown by `ggatec list -v` and friends.
    pub gctl_info: [c_char; G_GATE_INFOSIZE],
    /// Optional provider to serve reads from directly in the kernel.
    pub gctl_readprov: [c_char; G_GATE_NAMELEN],
    /// Offset applied to reads sent to `gctl_readprov`.
    pub gctl_readoffset: off_t,
    /// In: unit number, `G_GATE_UNIT_AUTO` or `G_GATE_NAME_GIVEN`.
    /// Out: the unit actually assigned.
    pub gctl_unit: c_int,
}

/// Argument of [`G_GATE_CMD_MODIFY`](crate::G_GATE_CMD_MODIFY): change
/// properties of an existing provider. Only the fields selected by the
/// `GG_MODIFY_*` bits in `gctl_modify` are applied. HAST uses it to resize
/// the provider.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct g_gate_ctl_modify {
    /// Must be [`G_GATE_VERSION`].
    pub gctl_version: c_uint,
    /// Unit number of the provider.
    pub gctl_unit: c_int,
    /// Bit set of [`GG_MODIFY_MEDIASIZE`](crate::GG_MODIFY_MEDIASIZE),
    /// [`GG_MODIFY_INFO`](crate::GG_MODIFY_INFO),
    /// [`GG_MODIFY_READPROV`](crate::GG_MODIFY_READPROV) and
    /// [`GG_MODIFY_READOFFSET`](crate::GG_MODIFY_READOFFSET).
    pub gctl_modify: u32,
    /// New size in bytes.
    pub gctl_mediasize: off_t,
    /// New description.
    pub gctl_info: [c_char; G_GATE_INFOSIZE],
    /// New read-through provider.
    pub gctl_readprov: [c_char; G_GATE_NAMELEN],
    /// New read-through offset.
    pub gctl_readoffset: off_t,
}

/// Argument of [`G_GATE_CMD_DESTROY`](crate::G_GATE_CMD_DESTROY): remove a
/// provider. Pending requests fail, and a daemon blocked in `START` wakes up
/// with `ECANCELED`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct g_gate_ctl_destroy {
    /// Must be [`G_GATE_VERSION`].
    pub gctl_version: c_uint,
    /// Unit number, or `G_GATE_NAME_GIVEN` to look the device up by name.
    pub gctl_unit: c_int,
    /// Non-zero: destroy even if the provider is open (otherwise `EBUSY`).
    pub gctl_force: c_int,
    /// Provider name, used when `gctl_unit` is `G_GATE_NAME_GIVEN`.
    pub gctl_name: [c_char; G_GATE_NAMELEN],
}

/// Argument of [`G_GATE_CMD_CANCEL`](crate::G_GATE_CMD_CANCEL): move requests
/// that were handed out by `START` but not yet `DONE` back to the incoming
/// queue, so that a (new) daemon receives them again.
///
/// HAST calls this after `CREATE` fails with `EEXIST` to take over the
/// provider left behind by a previous worker process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct g_gate_ctl_cancel {
    /// Must be [`G_GATE_VERSION`].
    pub gctl_version: c_uint,
    /// In: unit number or `G_GATE_NAME_GIVEN`. Out (when looked up by name):
    /// the real unit number.
    pub gctl_unit: c_int,
    /// Sequence number of the single request to cancel; `0` cancels all.
    pub gctl_seq: usize,
    /// Provider name, used when `gctl_unit` is `G_GATE_NAME_GIVEN`.
    pub gctl_name: [c_char; G_GATE_NAMELEN],
}

/// Argument of [`G_GATE_CMD_START`](crate::G_GATE_CMD_START) and
/// [`G_GATE_CMD_DONE`](crate::G_GATE_CMD_DONE): one I/O request.
///
/// **START** — fill in `gctl_version`, `gctl_unit`, `gctl_data` and
/// `gctl_length` (the size of the buffer at `gctl_data`). The call blocks
/// until a request is queued and then sets `gctl_seq`, `gctl_cmd`,
/// `gctl_offset`, `gctl_length`; for `BIO_WRITE` it copies the payload into
/// `gctl_data`. Request-level outcomes come back in `gctl_error` while the
/// `ioctl` itself returns 0 (an `ioctl` failure such as `ENXIO`/`EINVAL`/
/// `EFAULT` concerns the call itself):
/// * `0` — a request was dequeued;
/// * `ENOMEM` — the buffer is too small for the pending write; `gctl_length`
///   holds the size needed and the request stays queued, so retry with a
///   bigger buffer;
/// * `ECANCELED` — the device is being destroyed (or the sleep was
///   interrupted by a signal); the daemon should stop serving.
///
/// **DONE** — pass back the structure with the same `gctl_seq`, `gctl_unit`
/// and `gctl_cmd`, `gctl_error` set to the result (`0` or an errno) and, for
/// `BIO_READ`, `gctl_data` pointing at `gctl_length` bytes of read data. The
/// kernel looks the request up by `gctl_seq`; an unknown seq (for example a
/// request that was cancelled meanwhile) is silently ignored.
/// `gctl_error` = `EAGAIN` puts the request back on the incoming queue
/// instead of completing it.
///
/// Contains a raw pointer, so it is neither `Send` nor `Sync`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct g_gate_ctl_io {
    /// Must be [`G_GATE_VERSION`].
    pub gctl_version: c_uint,
    /// Unit number of the provider (as returned by `CREATE`).
    pub gctl_unit: c_int,
    /// Request identifier assigned by the kernel (`uintptr_t`).
    pub gctl_seq: usize,
    /// One of the `BIO_*` commands.
    pub gctl_cmd: c_uint,
    /// Byte offset of the request on the provider.
    pub gctl_offset: off_t,
    /// START in: buffer size. START out / DONE: request length in bytes.
    pub gctl_length: off_t,
    /// User buffer for the request payload.
    pub gctl_data: *mut c_void,
    /// Request status: errno from START, result to report in DONE.
    pub gctl_error: c_int,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<g_gate_ctl_create>() == 2608);
    assert!(size_of::<g_gate_ctl_modify>() == 2336);
    assert!(size_of::<g_gate_ctl_destroy>() == 268);
    assert!(size_of::<g_gate_ctl_cancel>() == 272);
    assert!(size_of::<g_gate_ctl_io>() == 56);
};

// The ioctl number only has 13 bits for the argument size.
const _: () = {
    assert!(size_of::<g_gate_ctl_create>() <= 0x1fff);
    assert!(size_of::<g_gate_ctl_modify>() <= 0x1fff);
};

impl g_gate_ctl_create {
    /// All fields zero (like `memset(&s, 0, sizeof(s))` in C).
    pub const fn zeroed() -> Self {
        Self {
            gctl_version: 0,
            gctl_mediasize: 0,
            gctl_sectorsize: 0,
            gctl_flags: 0,
            gctl_maxcount: 0,
            gctl_timeout: 0,
            gctl_name: [0; G_GATE_NAMELEN],
            gctl_info: [0; G_GATE_INFOSIZE],
            gctl_readprov: [0; G_GATE_NAMELEN],
            gctl_readoffset: 0,
            gctl_unit: 0,
        }
    }

    /// Zeroed, with `gctl_version` = [`G_GATE_VERSION`].
    pub const fn new() -> Self {
        let mut s = Self::zeroed();
        s.gctl_version = G_GATE_VERSION;
        s
    }

    /// Stores `name` in `gctl_name` (NUL-terminated, at most 254 bytes).
    pub fn set_name(&mut self, name: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_name, name)
    }

    /// `gctl_name` as text.
    pub fn name(&self) -> String {
        cbuf_to_string(&self.gctl_name)
    }

    /// Stores `info` in `gctl_info` (at most 2047 bytes).
    pub fn set_info(&mut self, info: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_info, info)
    }

    /// `gctl_info` as text.
    pub fn info(&self) -> String {
        cbuf_to_string(&self.gctl_info)
    }

    /// Stores `prov` in `gctl_readprov` (at most 254 bytes).
    pub fn set_readprov(&mut self, prov: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_readprov, prov)
    }

    /// `gctl_readprov` as text.
    pub fn readprov(&self) -> String {
        cbuf_to_string(&self.gctl_readprov)
    }
}

impl g_gate_ctl_modify {
    /// All fields zero.
    pub const fn zeroed() -> Self {
        Self {
            gctl_version: 0,
            gctl_unit: 0,
            gctl_modify: 0,
            gctl_mediasize: 0,
            gctl_info: [0; G_GATE_INFOSIZE],
            gctl_readprov: [0; G_GATE_NAMELEN],
            gctl_readoffset: 0,
        }
    }

    /// Zeroed, with `gctl_version` = [`G_GATE_VERSION`] and the given unit.
    pub const fn new(unit: c_int) -> Self {
        let mut s = Self::zeroed();
        s.gctl_version = G_GATE_VERSION;
        s.gctl_unit = unit;
        s
    }

    /// Stores `info` in `gctl_info`; the caller still sets
    /// [`GG_MODIFY_INFO`](crate::GG_MODIFY_INFO).
    pub fn set_info(&mut self, info: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_info, info)
    }

    /// `gctl_info` as text.
    pub fn info(&self) -> String {
        cbuf_to_string(&self.gctl_info)
    }

    /// Stores `prov` in `gctl_readprov`; the caller still sets
    /// [`GG_MODIFY_READPROV`](crate::GG_MODIFY_READPROV).
    pub fn set_readprov(&mut self, prov: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_readprov, prov)
    }

    /// `gctl_readprov` as text.
    pub fn readprov(&self) -> String {
        cbuf_to_string(&self.gctl_readprov)
    }
}

impl g_gate_ctl_destroy {
    /// All fields zero.
    pub const fn zeroed() -> Self {
        Self {
            gctl_version: 0,
            gctl_unit: 0,
            gctl_force: 0,
            gctl_name: [0; G_GATE_NAMELEN],
        }
    }

    /// Zeroed, with `gctl_version` = [`G_GATE_VERSION`] and the given unit.
    pub const fn new(unit: c_int) -> Self {
        let mut s = Self::zeroed();
        s.gctl_version = G_GATE_VERSION;
        s.gctl_unit = unit;
        s
    }

    /// Stores `name` in `gctl_name` (at most 254 bytes).
    pub fn set_name(&mut self, name: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_name, name)
    }

    /// `gctl_name` as text.
    pub fn name(&self) -> String {
        cbuf_to_string(&self.gctl_name)
    }
}

impl g_gate_ctl_cancel {
    /// All fields zero.
    pub const fn zeroed() -> Self {
        Self {
            gctl_version: 0,
            gctl_unit: 0,
            gctl_seq: 0,
            gctl_name: [0; G_GATE_NAMELEN],
        }
    }

    /// Zeroed, with `gctl_version` = [`G_GATE_VERSION`] and the given unit
    /// (`gctl_seq` = 0 cancels every outstanding request).
    pub const fn new(unit: c_int) -> Self {
        let mut s = Self::zeroed();
        s.gctl_version = G_GATE_VERSION;
        s.gctl_unit = unit;
        s
    }

    /// Stores `name` in `gctl_name` (at most 254 bytes).
    pub fn set_name(&mut self, name: &str) -> Result<(), CBufError> {
        copy_to_cbuf(&mut self.gctl_name, name)
    }

    /// `gctl_name` as text.
    pub fn name(&self) -> String {
        cbuf_to_string(&self.gctl_name)
    }
}

impl g_gate_ctl_io {
    /// All fields zero, `gctl_data` null.
    pub const fn zeroed() -> Self {
        Self {
            gctl_version: 0,
            gctl_unit: 0,
            gctl_seq: 0,
            gctl_cmd: 0,
            gctl_offset: 0,
            gctl_length: 0,
            gctl_data: ptr::null_mut(),
            gctl_error: 0,
        }
    }

    /// Zeroed, with `gctl_version` = [`G_GATE_VERSION`] and the given unit.
    pub const fn new(unit: c_int) -> Self {
        let mut s = Self::zeroed();
        s.gctl_version = G_GATE_VERSION;
        s.gctl_unit = unit;
        s
    }

    /// `gctl_cmd` decoded, `None` for commands this crate does not know.
    pub const fn cmd(&self) -> Option<BioCmd> {
        BioCmd::from_raw(self.gctl_cmd)
    }
}

macro_rules! impl_default_zeroed {
    ($($t:ty),*) => {$(
        /// All fields zero, like C's `memset(&s, 0, sizeof(s))`. Note that
        /// `gctl_version` is then 0 too; `new()` fills it in.
        impl Default for $t {
            fn default() -> Self {
                Self::zeroed()
            }
        }
    )*};
}

impl_default_zeroed!(
    g_gate_ctl_create,
    g_gate_ctl_modify,
    g_gate_ctl_destroy,
    g_gate_ctl_cancel,
    g_gate_ctl_io
);

impl fmt::Debug for g_gate_ctl_create {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("g_gate_ctl_create")
            .field("gctl_version", &self.gctl_version)
            .field("gctl_mediasize", &self.gctl_mediasize)
            .field("gctl_sectorsize", &self.gctl_sectorsize)
            .field("gctl_flags", &self.gctl_flags)
            .field("gctl_maxcount", &self.gctl_maxcount)
            .field("gctl_timeout", &self.gctl_timeout)
            .field("gctl_name", &self.name())
            .field("gctl_info", &self.info())
            .field("gctl_readprov", &self.readprov())
            .field("gctl_readoffset", &self.gctl_readoffset)
            .field("gctl_unit", &self.gctl_unit)
            .finish()
    }
}

impl fmt::Debug for g_gate_ctl_modify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("g_gate_ctl_modify")
            .field("gctl_version", &self.gctl_version)
            .field("gctl_unit", &self.gctl_unit)
            .field("gctl_modify", &format_args!("{:#x}", self.gctl_modify))
            .field("gctl_mediasize", &self.gctl_mediasize)
            .field("gctl_info", &self.info())
            .field("gctl_readprov", &self.readprov())
            .field("gctl_readoffset", &self.gctl_readoffset)
            .finish()
    }
}

impl fmt::Debug for g_gate_ctl_destroy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("g_gate_ctl_destroy")
            .field("gctl_version", &self.gctl_version)
            .field("gctl_unit", &self.gctl_unit)
            .field("gctl_force", &self.gctl_force)
            .field("gctl_name", &self.name())
            .finish()
    }
}

impl fmt::Debug for g_gate_ctl_cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("g_gate_ctl_cancel")
            .field("gctl_version", &self.gctl_version)
            .field("gctl_unit", &self.gctl_unit)
            .field("gctl_seq", &self.gctl_seq)
            .field("gctl_name", &self.name())
            .finish()
    }
}

impl fmt::Debug for g_gate_ctl_io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("g_gate_ctl_io")
            .field("gctl_version", &self.gctl_version)
            .field("gctl_unit", &self.gctl_unit)
            .field("gctl_seq", &self.gctl_seq)
            .field("gctl_cmd", &self.gctl_cmd)
            .field("gctl_offset", &self.gctl_offset)
            .field("gctl_length", &self.gctl_length)
            .field("gctl_data", &self.gctl_data)
            .field("gctl_error", &self.gctl_error)
            .finish()
    }
}
