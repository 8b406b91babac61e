//! Raw bindings for FreeBSD's GEOM Gate (`ggate`) control interface,
//! ABI version 3.
//!
//! # What GEOM Gate is
//!
//! GEOM Gate (`geom_gate.ko`, header `sys/geom/gate/g_gate.h`) lets a
//! userspace process implement a block device. The process opens the control
//! device `/dev/ggctl` and, with `ioctl(2)`, creates a GEOM provider that
//! appears as `/dev/ggate<N>` or under a chosen name. Every I/O request the
//! rest of the system sends to that provider is queued in the kernel until
//! the daemon picks it up, services it however it likes (local disk, network,
//! ...) and reports the result back.
//!
//! # Scope of this crate
//!
//! This crate is the ABI only: the `#[repr(C)]` request structures, the
//! constants and the `_IOWR` ioctl numbers, plus a few safe helpers for the
//! fixed-size C string buffers. Structures and constants compile on every
//! platform so layout can be tested anywhere (on 64-bit targets the sizes
//! are checked at compile time against FreeBSD's LP64 layout). The thin
//! `ioctl` wrappers (`GgateCtl`) exist only when building for FreeBSD.
//!
//! # How HAST uses it
//!
//! On the primary node the HAST worker for resource `<name>`:
//!
//! 1. opens `/dev/ggctl`;
//! 2. issues [`G_GATE_CMD_CREATE`] with `gctl_unit` = [`G_GATE_NAME_GIVEN`],
//!    `gctl_name` = `hast/<name>` and the resource's media and sector size,
//!    which makes `/dev/hast/<name>` appear. If that fails with `EEXIST` (a
//!    previous worker died) it adopts the provider with
//!    [`G_GATE_CMD_CANCEL`], which also requeues unfinished requests;
//! 3. loops: [`G_GATE_CMD_START`] blocks until the next request and returns
//!    its `gctl_seq`, command, offset and length (and for writes the
//!    payload); the request is replicated/served; [`G_GATE_CMD_DONE`]
//!    completes it by `gctl_seq` with an errno in `gctl_error` (and for reads
//!    the data). `START` reporting `ECANCELED` means the provider is being
//!    destroyed and the loop ends;
//! 4. on role change or shutdown destroys the provider with
//!    [`G_GATE_CMD_DESTROY`].
//!
//! ```
//! use ggate_sys::*;
//!
//! let mut req = g_gate_ctl_create::new();
//! req.gctl_mediasize = 1 << 30;
//! req.gctl_sectorsize = 512;
//! req.gctl_unit = G_GATE_NAME_GIVEN;
//! req.set_name("hast/shared").unwrap();
//! assert_eq!(req.gctl_version, G_GATE_VERSION);
//! assert_eq!(req.name(), "hast/shared");
//!
//! #[cfg(target_os = "freebsd")]
//! fn serve(ctl: &GgateCtl, unit: i32) -> std::io::Result<()> {
//!     let mut buf = vec![0u8; 1 << 20];
//!     loop {
//!         let mut io = g_gate_ctl_io::new(unit);
//!         ctl.start(&mut io, &mut buf)?;
//!         match io.gctl_error {
//!             0 => {}
//!             libc::ECANCELED => return Ok(()),
//!             e => return Err(std::io::Error::from_raw_os_error(e)),
//!         }
//!         let len = io.gctl_length as usize;
//!         match io.cmd() {
//!             Some(BioCmd::Read) => {
//!                 buf[..len].fill(0); // serve the read
//!                 ctl.done_read(&mut io, &buf[..len])?;
//!             }
//!             _ => ctl.done(&mut io)?, // write/delete/flush handled
//!         }
//!     }
//! }
//! ```

mod consts;
mod cstr;
mod structs;

#[cfg(target_os = "freebsd")]
mod freebsd;

pub use consts::*;
pub use cstr::{
    cbuf_as_bytes, cbuf_bytes, cbuf_to_string, copy_to_cbuf, copy_to_cbuf_truncate, CBufError,
};
pub use structs::*;

#[cfg(target_os = "freebsd")]
pub use freebsd::GgateCtl;

#[cfg(all(test, target_pointer_width = "64"))]
mod layout_tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn create_layout() {
        type T = g_gate_ctl_create;
        assert_eq!(size_of::<T>(), 2608);
        assert_eq!(align_of::<T>(), 8);
        assert_eq!(offset_of!(T, gctl_version), 0);
        assert_eq!(offset_of!(T, gctl_mediasize), 8);
        assert_eq!(offset_of!(T, gctl_sectorsize), 16);
        assert_eq!(offset_of!(T, gctl_flags), 20);
        assert_eq!(offset_of!(T, gctl_maxcount), 24);
        assert_eq!(offset_of!(T, gctl_timeout), 28);
        assert_eq!(offset_of!(T, gctl_name), 32);
        assert_eq!(offset_of!(T, gctl_info), 287);
        assert_eq!(offset_of!(T, gctl_readprov), 2335);
        assert_eq!(offset_of!(T, gctl_readoffset), 2592);
        assert_eq!(offset_of!(T, gctl_unit), 2600);
    }

    #[test]
    fn modify_layout() {
        type T = g_gate_ctl_modify;
        assert_eq!(size_of::<T>(), 2336);
        assert_eq!(offset_of!(T, gctl_version), 0);
        assert_eq!(offset_of!(T, gctl_unit), 4);
        assert_eq!(offset_of!(T, gctl_modify), 8);
        assert_eq!(offset_of!(T, gctl_mediasize), 16);
        assert_eq!(offset_of!(T, gctl_info), 24);
        assert_eq!(offset_of!(T, gctl_readprov), 2072);
        assert_eq!(offset_of!(T, gctl_readoffset), 2328);
    }

    #[test]
    fn destroy_layout() {
        type T = g_gate_ctl_destroy;
        assert_eq!(size_of::<T>(), 268);
        assert_eq!(align_of::<T>(), 4);
        assert_eq!(offset_of!(T, gctl_version), 0);
        assert_eq!(offset_of!(T, gctl_unit), 4);
        assert_eq!(offset_of!(T, gctl_force), 8);
        assert_eq!(offset_of!(T, gctl_name), 12);
    }

    #[test]
    fn cancel_layout() {
        type T = g_gate_ctl_cancel;
        assert_eq!(size_of::<T>(), 272);
        assert_eq!(offset_of!(T, gctl_version), 0);
        assert_eq!(offset_of!(T, gctl_unit), 4);
        assert_eq!(offset_of!(T, gctl_seq), 8);
        assert_eq!(offset_of!(T, gctl_name), 16);
    }

    #[test]
    fn io_layout() {
        type T = g_gate_ctl_io;
        assert_eq!(size_of::<T>(), 56);
        assert_eq!(offset_of!(T, gctl_version), 0);
        assert_eq!(offset_of!(T, gctl_unit), 4);
        assert_eq!(offset_of!(T, gctl_seq), 8);
        assert_eq!(offset_of!(T, gctl_cmd), 16);
        assert_eq!(offset_of!(T, gctl_offset), 24);
        assert_eq!(offset_of!(T, gctl_length), 32);
        assert_eq!(offset_of!(T, gctl_data), 40);
        assert_eq!(offset_of!(T, gctl_error), 48);
    }

    #[test]
    fn ioctl_numbers_match_freebsd() {
        assert_eq!(G_GATE_CMD_CREATE, 0xCA30_6D00);
        assert_eq!(G_GATE_CMD_MODIFY, 0xC920_6D01);
        assert_eq!(G_GATE_CMD_DESTROY, 0xC10C_6D02);
        assert_eq!(G_GATE_CMD_CANCEL, 0xC110_6D03);
        assert_eq!(G_GATE_CMD_START, 0xC038_6D04);
        assert_eq!(G_GATE_CMD_DONE, 0xC038_6D05);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_header() {
        assert_eq!(G_GATE_CTL_PATH, "/dev/ggctl");
        assert_eq!(G_GATE_CTL_NAME, "ggctl");
        assert_eq!(G_GATE_PROVIDER_NAME, "ggate");
        assert_eq!(G_GATE_VERSION, 3);
        assert_eq!(G_GATE_TIMEOUT, 0);
        assert_eq!(G_GATE_UNIT_AUTO, -1);
        assert_eq!(G_GATE_NAME_GIVEN, -2);
        assert_eq!(G_GATE_FLAG_READONLY, 0x1);
        assert_eq!(G_GATE_FLAG_WRITEONLY, 0x2);
        assert_eq!(G_GATE_USERFLAGS, 0x3);
        assert_eq!(GG_MODIFY_MEDIASIZE, 0x1);
        assert_eq!(GG_MODIFY_INFO, 0x2);
        assert_eq!(GG_MODIFY_READPROV, 0x4);
        assert_eq!(GG_MODIFY_READOFFSET, 0x8);
        assert_eq!(G_GATE_INFOSIZE, 2048);
        assert_eq!(G_GATE_NAMELEN, 255);
        assert_eq!(BIO_READ, 1);
        assert_eq!(BIO_WRITE, 2);
        assert_eq!(BIO_DELETE, 3);
        assert_eq!(BIO_GETATTR, 4);
        assert_eq!(BIO_FLUSH, 5);
    }

    #[test]
    fn iowr_encoding() {
        assert_eq!(iowr(0, 0), 0xC000_6D00);
        assert_eq!(iowr(7, 0x38), 0xC038_6D07);
        // Sizes wider than 13 bits are masked, as in FreeBSD's _IOC.
        assert_eq!(iowr(1, 0x2001), 0xC001_6D01);
        assert_eq!(iowr(0xff, 0x1fff), 0xDFFF_6DFF);
    }

    #[test]
    fn bio_cmd_roundtrip() {
        for cmd in [
            BioCmd::Read,
            BioCmd::Write,
            BioCmd::Delete,
            BioCmd::GetAttr,
            BioCmd::Flush,
        ] {
            assert_eq!(BioCmd::from_raw(cmd.as_raw()), Some(cmd));
        }
        assert_eq!(BioCmd::from_raw(0), None);
        assert_eq!(BioCmd::from_raw(6), None);
        let mut io = g_gate_ctl_io::new(3);
        io.gctl_cmd = BIO_WRITE;
        assert_eq!(io.cmd(), Some(BioCmd::Write));
    }

    #[test]
    fn default_is_all_zero() {
        let c = g_gate_ctl_create::default();
        assert_eq!(c.gctl_version, 0);
        assert_eq!(c.gctl_mediasize, 0);
        assert_eq!(c.gctl_unit, 0);
        assert!(c.gctl_name.iter().all(|&b| b == 0));
        assert!(c.gctl_info.iter().all(|&b| b == 0));
        assert!(c.gctl_readprov.iter().all(|&b| b == 0));

        let m = g_gate_ctl_modify::default();
        assert_eq!((m.gctl_version, m.gctl_unit, m.gctl_modify), (0, 0, 0));
        assert!(m.gctl_info.iter().all(|&b| b == 0));

        let d = g_gate_ctl_destroy::default();
        assert_eq!((d.gctl_version, d.gctl_unit, d.gctl_force), (0, 0, 0));

        let x = g_gate_ctl_cancel::default();
        assert_eq!((x.gctl_version, x.gctl_unit, x.gctl_seq), (0, 0, 0));

        let io = g_gate_ctl_io::default();
        assert_eq!(io.gctl_version, 0);
        assert!(io.gctl_data.is_null());
        assert_eq!((io.gctl_seq, io.gctl_length, io.gctl_error), (0, 0, 0));
    }

    #[test]
    fn new_sets_version_and_unit() {
        assert_eq!(g_gate_ctl_create::new().gctl_version, G_GATE_VERSION);
        let m = g_gate_ctl_modify::new(7);
        assert_eq!((m.gctl_version, m.gctl_unit), (G_GATE_VERSION, 7));
        let d = g_gate_ctl_destroy::new(G_GATE_NAME_GIVEN);
        assert_eq!((d.gctl_version, d.gctl_unit), (G_GATE_VERSION, -2));
        let x = g_gate_ctl_cancel::new(G_GATE_NAME_GIVEN);
        assert_eq!((x.gctl_version, x.gctl_unit, x.gctl_seq), (3, -2, 0));
        let io = g_gate_ctl_io::new(4);
        assert_eq!((io.gctl_version, io.gctl_unit), (G_GATE_VERSION, 4));
        assert!(io.gctl_data.is_null());
    }

    #[test]
    fn string_accessors() {
        let mut c = g_gate_ctl_create::new();
        c.set_name("hast/test").unwrap();
        c.set_info("primary").unwrap();
        c.set_readprov("ada0p1").unwrap();
        assert_eq!(c.name(), "hast/test");
        assert_eq!(c.info(), "primary");
        assert_eq!(c.readprov(), "ada0p1");
        assert!(c.set_name(&"x".repeat(255)).is_err());
        assert_eq!(c.name(), "hast/test", "failed set keeps old name");
        c.set_info(&"i".repeat(2047)).unwrap();
        assert!(c.set_info(&"i".repeat(2048)).is_err());

        let mut m = g_gate_ctl_modify::new(0);
        m.set_info("resized").unwrap();
        m.set_readprov("da1").unwrap();
        assert_eq!(
            (m.info().as_str(), m.readprov().as_str()),
            ("resized", "da1")
        );

        let mut d = g_gate_ctl_destroy::new(G_GATE_NAME_GIVEN);
        d.set_name("hast/test").unwrap();
        assert_eq!(d.name(), "hast/test");

        let mut x = g_gate_ctl_cancel::new(G_GATE_NAME_GIVEN);
        x.set_name("hast/test").unwrap();
        assert_eq!(x.name(), "hast/test");
    }

    #[test]
    fn debug_shows_names_as_text() {
        let mut d = g_gate_ctl_destroy::new(1);
        d.set_name("hast/r0").unwrap();
        let s = format!("{d:?}");
        assert!(s.contains("gctl_name: \"hast/r0\""), "{s}");
        assert!(format!("{:?}", g_gate_ctl_create::new()).contains("gctl_version: 3"));
        assert!(format!("{:?}", g_gate_ctl_modify::new(0)).contains("gctl_modify: 0x0"));
        assert!(format!("{:?}", g_gate_ctl_cancel::new(0)).contains("gctl_seq: 0"));
        assert!(format!("{:?}", g_gate_ctl_io::new(0)).contains("gctl_data: 0x0"));
    }
}
