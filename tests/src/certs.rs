//! Certificates for `tls on` clusters (rcgen): a CA, and for each node a
//! certificate naming its IP address, written as PEM files (keys mode
//! 0600, as hastd requires) under a directory.

use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A certificate authority that signs node certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its certificate, PEM, written at creation.
    pub pem_path: PathBuf,
}

/// A node's `tlscert` and `tlskey` files.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

fn write(path: &Path, text: &str, mode: u32) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

impl TestCa {
    /// A new CA called `name`, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        let pem_path = dir.join(format!("{name}.pem"));
        write(&pem_path, &cert.pem(), 0o644);
        TestCa {
            cert,
            key,
            pem_path,
        }
    }

    /// A certificate for `ip` signed by this CA, written to
    /// `dir/<file>.pem` and `dir/<file>.key`.
    pub fn node(&self, dir: &Path, file: &str, ip: IpAddr) -> NodeCert {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names.push(SanType::IpAddress(ip));
        p.distinguished_name.push(DnType::CommonName, file);
        let key = KeyPair::generate().expect("node key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("node certificate");
        let nc = NodeCert {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        write(&nc.cert, &cert.pem(), 0o644);
        write(&nc.key, &key.serialize_pem(), 0o600);
        nc
    }
}

/// The resource statements of `tls on` with `ca` and `cert`.
pub fn tls_statements(ca: &Path, cert: &NodeCert) -> String {
    format!(
        "\ttls on\n\ttlsca {}\n\ttlscert {}\n\ttlskey {}\n",
        ca.display(),
        cert.cert.display(),
        cert.key.display()
    )
}
