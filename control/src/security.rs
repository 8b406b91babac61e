//! A resource's security settings as the data path uses them: the shared
//! secret (written in hast.conf or read from `secretfile`) and the TLS
//! identity (`tlscert`, `tlskey`, `tlsca`), read and checked when hastd
//! starts, reloads, or checks the file (`hastd -t`).
//!
//! Files holding a secret or a private key must be regular files owned
//! by the user hastd runs as and closed to group and others (mode 0600 or
//! 0400): anything else is refused, with the fix in the message.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use hast_datapath::peer::auth::Secret;
use hast_datapath::peer::presession::PeerSecurity;
use hast_datapath::peer::tls::TlsIdentity;

use crate::config::{Config, ConfigError, Located, ResourceConfig, SecretSource};

/// Largest secret or PEM file read.
const MAX_FILE: u64 = 1 << 20;

/// An error at the statement that named the file.
fn at<T>(cfg: &Config, loc: &Located<T>, message: String) -> ConfigError {
    ConfigError::Parse {
        file: cfg.source.clone(),
        line: loc.line,
        column: loc.column,
        message,
    }
}

/// Reads a file that holds a secret or a private key (`what` is the
/// statement), refusing one that others may read.
pub fn read_private(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let md = std::fs::metadata(path).map_err(|e| format!("{what} {shown}: cannot read: {e}"))?;
    if !md.is_file() {
        return Err(format!("{what} {shown}: not a regular file"));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} may be read by {} (mode {mode:04o}): it must be readable by its owner only; \
             run 'chmod 600 {shown}'",
            if mode & 0o007 != 0 { "anyone" } else { "its group" }
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(format!(
            "{what} {shown} is owned by uid {}, not by the user hastd runs as (uid {me}); \
             run 'chown {me} {shown}'",
            md.uid()
        ));
    }
    read_bounded(path, what)
}

fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let shown = path.display();
    let md = std::fs::metadata(path).map_err(|e| format!("{what} {shown}: cannot read: {e}"))?;
    if md.len() > MAX_FILE {
        return Err(format!(
            "{what} {shown}: {} bytes is too large for this (at most {MAX_FILE})",
            md.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{what} {shown}: cannot read: {e}"))
}

/// The security of resource `r` of `cfg`: its secret and TLS identity
/// read and checked; errors point at the statement.
pub fn load(cfg: &Config, r: &ResourceConfig) -> Result<PeerSecurity, ConfigError> {
    let secret = match &r.secret {
        None => None,
        Some(loc) => {
            let bytes = match &loc.value {
                SecretSource::Inline(s) => s.as_bytes().to_vec(),
                SecretSource::File(p) => {
                    let mut b = read_private(p, "secretfile").map_err(|m| at(cfg, loc, m))?;
                    // A final newline (echo, openssl rand -hex) is not
                    // part of the secret.
                    while b.last().is_some_and(|c| c.is_ascii_whitespace()) {
                        b.pop();
                    }
                    b
                }
            };
            let what = match &loc.value {
                SecretSource::Inline(_) => "secret".to_string(),
                SecretSource::File(p) => format!("secretfile {}", p.display()),
            };
            Some(Secret::new(&bytes).map_err(|m| at(cfg, loc, format!("{what}: {m}")))?)
        }
    };
    let tls = match &r.tls {
        None => None,
        Some(t) => {
            let cert = read_bounded(&t.cert.value, "tlscert").map_err(|m| at(cfg, &t.cert, m))?;
            let key = read_private(&t.key.value, "tlskey").map_err(|m| at(cfg, &t.key, m))?;
            let ca = read_bounded(&t.ca.value, "tlsca").map_err(|m| at(cfg, &t.ca, m))?;
            let names = [
                t.cert.value.to_string_lossy().into_owned(),
                t.key.value.to_string_lossy().into_owned(),
                t.ca.value.to_string_lossy().into_owned(),
            ];
            let id = TlsIdentity::from_pem(
                &cert,
                &key,
                &ca,
                [names[0].as_str(), names[1].as_str(), names[2].as_str()],
            )
            .map_err(|m| at(cfg, &t.cert, format!("resource \"{}\": {m}", r.name)))?;
            Some(id)
        }
    };
    Ok(PeerSecurity {
        secret,
        tls,
        peer_name: r
            .remote
            .as_ref()
            .map(|a| a.host.clone())
            .unwrap_or_default(),
    })
}
