//! Constants and ioctl request numbers of the GEOM Gate version 3 ABI.

use core::ffi::{c_int, c_uint, c_ulong};
use core::mem::size_of;

use crate::structs::{
    g_gate_ctl_cancel, g_gate_ctl_create, g_gate_ctl_destroy, g_gate_ctl_io, g_gate_ctl_modify,
};

/// Path of the GEOM Gate control device created by `geom_gate.ko`.
pub const G_GATE_CTL_PATH: &str = "/dev/ggctl";

/// Name of the control device node relative to `/dev` (`G_GATE_CTL_NAME`).
pub const G_GATE_CTL_NAME: &str = "ggctl";

/// Prefix of automatically named providers: unit `N` appears as `/dev/ggateN`.
pub const G_GATE_PROVIDER_NAME: &str = "ggate";

/// ABI version understood by this crate. Every request structure starts with
/// a `gctl_version` field that must hold this value, otherwise the kernel
/// rejects the ioctl with `EINVAL`.
pub const G_GATE_VERSION: c_uint = 3;

/// Default request timeout in seconds; `0` disables the timeout, so pending
/// requests wait for the daemon forever (what HAST uses).
pub const G_GATE_TIMEOUT: c_uint = 0;

/// Size of the free-form `gctl_info` text buffer.
pub const G_GATE_INFOSIZE: usize = 2048;

/// Size of the `gctl_name` / `gctl_readprov` buffers (FreeBSD's `NAME_MAX`),
/// including the terminating NUL, so at most 254 bytes of text fit.
pub const G_GATE_NAMELEN: usize = 255;

/// `gctl_unit` value asking the kernel to pick the first free unit number.
/// The chosen unit is written back into `gctl_unit`.
pub const G_GATE_UNIT_AUTO: c_int = -1;

/// `gctl_unit` value meaning "the provider is identified by `gctl_name`".
///
/// On `CREATE` the provider is named after `gctl_name` (HAST uses
/// `hast/<resource>`); on `DESTROY` / `CANCEL` the device is looked up by
/// name. The kernel writes the real unit number back where the request
/// structure has room for it.
pub const G_GATE_NAME_GIVEN: c_int = -2;

/// `gctl_flags`: the provider rejects writes.
pub const G_GATE_FLAG_READONLY: c_uint = 0x0001;
/// `gctl_flags`: the provider rejects reads.
pub const G_GATE_FLAG_WRITEONLY: c_uint = 0x0002;
/// Flags userland may pass in `gctl_flags`.
pub const G_GATE_USERFLAGS: c_uint = G_GATE_FLAG_READONLY | G_GATE_FLAG_WRITEONLY;

/// `gctl_modify` bit: apply `gctl_mediasize`.
pub const GG_MODIFY_MEDIASIZE: u32 = 0x01;
/// `gctl_modify` bit: apply `gctl_info`.
pub const GG_MODIFY_INFO: u32 = 0x02;
/// `gctl_modify` bit: apply `gctl_readprov`.
pub const GG_MODIFY_READPROV: u32 = 0x04;
/// `gctl_modify` bit: apply `gctl_readoffset`.
pub const GG_MODIFY_READOFFSET: u32 = 0x08;

/// `gctl_cmd`: read `gctl_length` bytes at `gctl_offset`; the daemon fills
/// the data buffer before `DONE`.
pub const BIO_READ: c_uint = 1;
/// `gctl_cmd`: write; the payload was copied into the data buffer by `START`.
pub const BIO_WRITE: c_uint = 2;
/// `gctl_cmd`: delete (TRIM) the range `gctl_offset .. gctl_offset + gctl_length`.
pub const BIO_DELETE: c_uint = 3;
/// `gctl_cmd`: attribute query. GEOM Gate answers these in the kernel, so a
/// daemon normally never sees it; listed for completeness.
pub const BIO_GETATTR: c_uint = 4;
/// `gctl_cmd`: flush the write cache; `gctl_offset`/`gctl_length` are unused.
pub const BIO_FLUSH: c_uint = 5;

/// `ioctl` direction bits: data is copied out of the kernel (`IOC_OUT`).
const IOC_OUT: c_ulong = 0x4000_0000;
/// `ioctl` direction bits: data is copied into the kernel (`IOC_IN`).
const IOC_IN: c_ulong = 0x8000_0000;
/// Both directions (`IOC_INOUT`).
const IOC_INOUT: c_ulong = IOC_IN | IOC_OUT;
/// Mask for the parameter length encoded in an ioctl number (`IOCPARM_MASK`).
const IOCPARM_MASK: c_ulong = 0x1fff;
/// Ioctl group letter used by GEOM Gate.
const G_GATE_IOC_GROUP: u8 = b'm';

/// FreeBSD's `_IOWR(group, num, T)` for the GEOM Gate group `'m'`, where
/// `size` is `sizeof(T)`.
///
/// The encoding is `IOC_INOUT | (size & IOCPARM_MASK) << 16 | group << 8 | num`.
pub const fn iowr(num: u8, size: usize) -> c_ulong {
    IOC_INOUT
        | ((size as c_ulong & IOCPARM_MASK) << 16)
        | ((G_GATE_IOC_GROUP as c_ulong) << 8)
        | num as c_ulong
}

/// Create a provider (`_IOWR('m', 0, struct g_gate_ctl_create)`).
pub const G_GATE_CMD_CREATE: c_ulong = iowr(0, size_of::<g_gate_ctl_create>());
/// Change an existing provider (`_IOWR('m', 1, struct g_gate_ctl_modify)`).
pub const G_GATE_CMD_MODIFY: c_ulong = iowr(1, size_of::<g_gate_ctl_modify>());
/// Destroy a provider (`_IOWR('m', 2, struct g_gate_ctl_destroy)`).
pub const G_GATE_CMD_DESTROY: c_ulong = iowr(2, size_of::<g_gate_ctl_destroy>());
/// Put in-flight requests back on the incoming queue
/// (`_IOWR('m', 3, struct g_gate_ctl_cancel)`).
pub const G_GATE_CMD_CANCEL: c_ulong = iowr(3, size_of::<g_gate_ctl_cancel>());
/// Fetch the next I/O request (`_IOWR('m', 4, struct g_gate_ctl_io)`).
pub const G_GATE_CMD_START: c_ulong = iowr(4, size_of::<g_gate_ctl_io>());
/// Complete an I/O request (`_IOWR('m', 5, struct g_gate_ctl_io)`).
pub const G_GATE_CMD_DONE: c_ulong = iowr(5, size_of::<g_gate_ctl_io>());

/// Typed view of the `gctl_cmd` values a daemon can receive from `START`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BioCmd {
    /// [`BIO_READ`]
    Read,
    /// [`BIO_WRITE`]
    Write,
    /// [`BIO_DELETE`]
    Delete,
    /// [`BIO_GETATTR`]
    GetAttr,
    /// [`BIO_FLUSH`]
    Flush,
}

impl BioCmd {
    /// Decodes a raw `gctl_cmd`; unknown values (newer kernels may add e.g.
    /// `BIO_SPEEDUP`) give `None`.
    pub const fn from_raw(cmd: c_uint) -> Option<Self> {
        match cmd {
            BIO_READ => Some(Self::Read),
            BIO_WRITE => Some(Self::Write),
            BIO_DELETE => Some(Self::Delete),
            BIO_GETATTR => Some(Self::GetAttr),
            BIO_FLUSH => Some(Self::Flush),
            _ => None,
        }
    }

    /// The raw `gctl_cmd` value.
    pub const fn as_raw(self) -> c_uint {
        match self {
            Self::Read => BIO_READ,
            Self::Write => BIO_WRITE,
            Self::Delete => BIO_DELETE,
            Self::GetAttr => BIO_GETATTR,
            Self::Flush => BIO_FLUSH,
        }
    }
}
