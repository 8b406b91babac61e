//! Thin `ioctl(2)` wrappers around `/dev/ggctl` (FreeBSD only).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::consts::{
    G_GATE_CMD_CANCEL, G_GATE_CMD_CREATE, G_GATE_CMD_DESTROY, G_GATE_CMD_DONE, G_GATE_CMD_MODIFY,
    G_GATE_CMD_START, G_GATE_CTL_PATH,
};
use crate::structs::{
    g_gate_ctl_cancel, g_gate_ctl_create, g_gate_ctl_destroy, g_gate_ctl_io, g_gate_ctl_modify,
};

/// Issues `ioctl(fd, request, arg)` and maps `-1` to the current `errno`.
///
/// # Safety
///
/// `request` must be a GEOM Gate command whose argument type is `T` (the
/// size encoded in `request` equals `size_of::<T>()`), and every pointer
/// stored inside `*arg` must satisfy what the kernel does with it for that
/// command.
unsafe fn ioctl_rw<T>(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor borrowed for the duration of the
    // call; `arg` is an exclusive reference to a properly sized and aligned
    // `T`, which matches the `_IOWR` size in `request` per this function's
    // contract, so the kernel's copyin/copyout of that many bytes stays
    // within `*arg`. Embedded pointers are the caller's responsibility.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open handle on the GEOM Gate control device `/dev/ggctl`.
///
/// One handle can drive several providers; HAST opens it once per resource
/// worker. Methods take `&self`, so threads may share the handle (HAST runs
/// the `START` loop and the `DONE` path on different threads).
#[derive(Debug)]
pub struct GgateCtl {
    fd: OwnedFd,
}

impl GgateCtl {
    /// Opens [`G_GATE_CTL_PATH`] read-write with `O_CLOEXEC`.
    ///
    /// Fails with `ENOENT` if the `geom_gate` kernel module is not loaded.
    pub fn open() -> io::Result<Self> {
        let path = CString::new(G_GATE_CTL_PATH).map_err(io::Error::other)?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the
        // call, and `open` with these flags takes no mode argument.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `open` just returned this descriptor, it is valid and owned
        // by nobody else, so `OwnedFd` may take responsibility for closing it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Wraps an already open control descriptor.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Returns the descriptor, e.g. to hand it to a child process.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// `G_GATE_CMD_CREATE`: creates a provider; the assigned unit is written
    /// to `req.gctl_unit`. `EEXIST` if the name/unit is taken.
    pub fn create(&self, req: &mut g_gate_ctl_create) -> io::Result<()> {
        // SAFETY: `G_GATE_CMD_CREATE` takes a `g_gate_ctl_create`, which is
        // pointer-free, so the kernel only touches `*req`.
        unsafe { ioctl_rw(self.fd.as_fd(), G_GATE_CMD_CREATE, req) }
    }

    /// `G_GATE_CMD_MODIFY`: applies the fields selected by `req.gctl_modify`.
    pub fn modify(&self, req: &mut g_gate_ctl_modify) -> io::Result<()> {
        // SAFETY: `G_GATE_CMD_MODIFY` takes a `g_gate_ctl_modify`, which is
        // pointer-free, so the kernel only touches `*req`.
        unsafe { ioctl_rw(self.fd.as_fd(), G_GATE_CMD_MODIFY, req) }
    }

    /// `G_GATE_CMD_DESTROY`: removes a provider (`EBUSY` if it is open and
    /// `gctl_force` is 0). Wakes any `START` waiter with `ECANCELED`.
    pub fn destroy(&self, req: &mut g_gate_ctl_destroy) -> io::Result<()> {
        // SAFETY: `G_GATE_CMD_DESTROY` takes a `g_gate_ctl_destroy`, which
        // is pointer-free, so the kernel only touches `*req`.
        unsafe { ioctl_rw(self.fd.as_fd(), G_GATE_CMD_DESTROY, req) }
    }

    /// `G_GATE_CMD_CANCEL`: requeues request `req.gctl_seq` (or all of them
    /// if 0) that were started but not completed. When looked up by name the
    /// unit is written to `req.gctl_unit`.
    pub fn cancel(&self, req: &mut g_gate_ctl_cancel) -> io::Result<()> {
        // SAFETY: `G_GATE_CMD_CANCEL` takes a `g_gate_ctl_cancel`, which is
        // pointer-free, so the kernel only touches `*req`.
        unsafe { ioctl_rw(self.fd.as_fd(), G_GATE_CMD_CANCEL, req) }
    }

    /// `G_GATE_CMD_START` with a raw request: blocks until the next request
    /// is queued. See [`g_gate_ctl_io`] for the fields and for the statuses
    /// (`ENOMEM`, `ECANCELED`) reported in `req.gctl_error`.
    ///
    /// # Safety
    ///
    /// `req.gctl_data` must be valid for writes of `req.gctl_length` bytes
    /// and not be accessed by anything else during the call: for a write
    /// request the kernel copies up to that many bytes into it.
    pub unsafe fn start_raw(&self, req: &mut g_gate_ctl_io) -> io::Result<()> {
        // SAFETY: `G_GATE_CMD_START` takes a `g_gate_ctl_io`; the kernel
        // copies out at most `gctl_length` bytes to `gctl_data` (it reports
        // `ENOMEM` instead when the request is larger), and the caller
        // guarantees that region is writable and unaliased.
        unsafe { ioctl_rw(self.fd.as_fd(), G_GATE_CMD_START, req) }
    }

    /// `G_GATE_CMD_START` into `buf`: sets `req.gctl_data`/`req.gctl_length`
    /// from `buf` and waits for the next request. On return check
    /// `req.gctl_error` (see [`g_gate_ctl_io`]); for `BIO_WRITE` the payload
    /// is in `buf[..req.gctl_length]`.
    ///
    /// `req.gctl_data` keeps pointing at `buf` afterwards; don't let it
    /// outlive the buffer.
    pub fn start(&self, req: &mut g_gate_ctl_io, buf: &mut [u8]) -> io::Result<()> {
        req.gctl_data = buf.as_mut_ptr().cast();
        req.gctl_length = i64::try_from(buf.len()).map_err(io::Error::other)?;
        // SAFETY: `gctl_data`/`gctl_length` describe exactly `buf`, which is
        // writable and exclusively borrowed for the whole call.
        unsafe { self.start_raw(req) }
    }

    /// `G_GATE_CMD_DONE` with a raw request: completes request
    /// `req.gctl_seq` with status `req.gctl_error`.
    ///
    /// # Safety
    ///
    /// For a successful `BIO_READ` the kernel copies the request's length
    /// (the `gctl_length` `START` reported for this seq) from
    /// `req.gctl_data`, so that pointer must be valid for reads of that many
    /// bytes.
    pub unsafe fn done_raw(&self, req: &mut g_gate_ctl_io) -> io::Result<()> {
        // SAFETY: `G_GATE_CMD_DONE` takes a `g_gate_ctl_io`; the kernel only
        // reads from `gctl_data`, and the caller guarantees it covers the
        // request's length.
        unsafe { ioctl_rw(self.fd.as_fd(), G_GATE_CMD_DONE, req) }
    }

    /// `G_GATE_CMD_DONE` for a request that carries no data back (write,
    /// delete, flush, or any failed request): clears `gctl_data` first.
    /// Use [`done_read`](Self::done_read) for successful reads; here they
    /// would fail with `EFAULT`.
    pub fn done(&self, req: &mut g_gate_ctl_io) -> io::Result<()> {
        req.gctl_data = core::ptr::null_mut();
        // SAFETY: DONE never writes to user memory, and with a null
        // `gctl_data` it cannot read any either: a successful `BIO_READ`
        // passed here makes the kernel's copyin fail with `EFAULT`, which is
        // returned to us and to the reader of the provider.
        unsafe { self.done_raw(req) }
    }

    /// `G_GATE_CMD_DONE` for a successful read: hands `data` to the kernel.
    ///
    /// Fails with `EINVAL` (without calling the kernel) if `data` is shorter
    /// than `req.gctl_length`. Keep `gctl_seq` and `gctl_length` as `START`
    /// returned them: the kernel copies the length recorded for `gctl_seq`,
    /// so a tampered pair could make it read past `data` (or fail with
    /// `EFAULT`). DONE never writes to user memory.
    pub fn done_read(&self, req: &mut g_gate_ctl_io, data: &[u8]) -> io::Result<()> {
        let need = usize::try_from(req.gctl_length)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if data.len() < need {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        req.gctl_data = data.as_ptr().cast_mut().cast();
        // SAFETY: `data` is readable for at least `gctl_length` bytes, the
        // length START reported for this request; the kernel only reads it.
        unsafe { self.done_raw(req) }
    }
}

impl AsFd for GgateCtl {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for GgateCtl {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
