//! A small blocking NBD client for tests that need to know exactly which
//! requests were sent and which were acknowledged (real clients do not
//! tell). Fixed newstyle, NBD_OPT_GO, simple replies. Written from the
//! protocol, independent of the server's code.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;

/// Command codes.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;

/// A connected client.
pub struct Client {
    sock: UnixStream,
    /// Export size from the handshake.
    pub size: u64,
    /// Transmission flags from the handshake.
    pub flags: u16,
}

/// A simple reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// NBD error (0 = success).
    pub error: u32,
    /// Handle of the request.
    pub handle: u64,
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

impl Client {
    /// Connects and negotiates `export` with NBD_OPT_GO.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let mut sock = UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        if be_u64(&hello) != NBDMAGIC || be_u64(&hello[8..]) != IHAVEOPT {
            return Err(io::Error::other("bad server greeting"));
        }
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        sock.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&opt)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut hdr = [0u8; 20];
            sock.read_exact(&mut hdr)?;
            if be_u64(&hdr) != REPLY_MAGIC {
                return Err(io::Error::other("bad option reply magic"));
            }
            let rtype = be_u32(&hdr[12..]);
            let len = be_u32(&hdr[16..]) as usize;
            let mut data = vec![0u8; len];
            sock.read_exact(&mut data)?;
            match rtype {
                REP_ACK => break,
                REP_INFO if len >= 12 && data[..2] == [0, 0] => {
                    size = be_u64(&data[2..]);
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                other => {
                    return Err(io::Error::other(format!(
                        "option GO refused: reply type {other:#x}"
                    )))
                }
            }
        }
        Ok(Client { sock, size, flags })
    }

    /// Sends a request (with payload for writes) without waiting.
    pub fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        data: &[u8],
        len: u32,
    ) -> io::Result<()> {
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.sock.write_all(&req)
    }

    /// Receives one simple reply; `read_len` is the payload length to
    /// read when the reply is for a successful read (returned).
    pub fn recv(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<(Reply, Vec<u8>)> {
        let mut hdr = [0u8; 16];
        self.sock.read_exact(&mut hdr)?;
        if be_u32(&hdr) != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::other("bad reply magic"));
        }
        let reply = Reply {
            error: be_u32(&hdr[4..]),
            handle: be_u64(&hdr[8..]),
        };
        let mut data = Vec::new();
        if reply.error == 0 {
            let n = read_len(reply.handle);
            data.resize(n, 0);
            self.sock.read_exact(&mut data)?;
        }
        Ok((reply, data))
    }

    /// Writes and waits for the reply.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Reply> {
        self.send(CMD_WRITE, 0, 1, offset, data, data.len() as u32)?;
        Ok(self.recv(|_| 0)?.0)
    }

    /// Reads and waits for the reply.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<(Reply, Vec<u8>)> {
        self.send(CMD_READ, 0, 2, offset, &[], len)?;
        self.recv(|_| len as usize)
    }

    /// Flushes and waits for the reply.
    pub fn flush(&mut self) -> io::Result<Reply> {
        self.send(CMD_FLUSH, 0, 3, 0, &[], 0)?;
        Ok(self.recv(|_| 0)?.0)
    }

    /// Sends NBD_CMD_DISC.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 0, 4, 0, &[], 0)
    }

    /// The underlying socket (for raw tests).
    pub fn socket(&mut self) -> &mut UnixStream {
        &mut self.sock
    }
}
