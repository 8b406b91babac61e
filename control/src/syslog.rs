//! Logging to syslog(3) when hastd runs as a daemon (the journal picks it
//! up on systemd hosts). Each tracing event becomes one syslog message with
//! the matching priority.

use std::ffi::CString;
use std::io;
use std::sync::Once;

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;

static OPEN: Once = Once::new();

/// A `MakeWriter` sending each event to syslog.
#[derive(Clone, Copy)]
pub struct SyslogWriter {
    ident: &'static std::ffi::CStr,
}

impl SyslogWriter {
    /// Opens the syslog connection under `ident` (once per process).
    pub fn new(ident: &'static str) -> SyslogWriter {
        let ident: &'static std::ffi::CStr = Box::leak(
            CString::new(ident)
                .unwrap_or_else(|_| c"hastd".to_owned())
                .into_boxed_c_str(),
        );
        OPEN.call_once(|| {
            // SAFETY: ident is a NUL-terminated string leaked for the life
            // of the process, as openlog(3) requires.
            unsafe {
                libc::openlog(
                    ident.as_ptr(),
                    libc::LOG_PID | libc::LOG_NDELAY,
                    libc::LOG_DAEMON,
                )
            };
        });
        SyslogWriter { ident }
    }
}

/// Buffers one event and sends it on drop.
pub struct EventWriter {
    priority: libc::c_int,
    buf: Vec<u8>,
}

impl io::Write for EventWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        while self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        self.buf.retain(|&b| b != 0);
        if let Ok(msg) = CString::new(std::mem::take(&mut self.buf)) {
            // SAFETY: both the format and the message are NUL-terminated C
            // strings; "%s" consumes exactly the one vararg passed.
            unsafe { libc::syslog(self.priority, c"%s".as_ptr(), msg.as_ptr()) };
        }
    }
}

impl<'a> MakeWriter<'a> for SyslogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        let _ = self.ident;
        EventWriter {
            priority: libc::LOG_INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        let priority = match *meta.level() {
            Level::ERROR => libc::LOG_ERR,
            Level::WARN => libc::LOG_WARNING,
            Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        EventWriter {
            priority,
            buf: Vec::new(),
        }
    }
}
