//! Peer addresses (`listen`, `remote`, `source`) and control addresses.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use super::ValueError;

/// Port used when an address has none.
pub const DEFAULT_PORT: u16 = 8457;
/// Port of a `metrics listen` address that has none (drbd-reactor's).
pub const METRICS_PORT: u16 = 9942;

/// Address family selector written as the address scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// `tcp://`: IPv4 or IPv6, whatever the host resolves to.
    Tcp,
    /// `tcp4://`: IPv4 only.
    Tcp4,
    /// `tcp6://`: IPv6 only.
    Tcp6,
}

impl Scheme {
    pub const fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Tcp4 => "tcp4",
            Scheme::Tcp6 => "tcp6",
        }
    }

    /// Whether `addr` is of a family this scheme allows.
    pub fn admits(self, addr: &IpAddr) -> bool {
        match self {
            Scheme::Tcp => true,
            Scheme::Tcp4 => addr.is_ipv4(),
            Scheme::Tcp6 => addr.is_ipv6(),
        }
    }

    fn family(self) -> &'static str {
        match self {
            Scheme::Tcp => "IPv4 or IPv6",
            Scheme::Tcp4 => "IPv4",
            Scheme::Tcp6 => "IPv6",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TCP endpoint: `[tcp|tcp4|tcp6://]host[:port]`, IPv6 hosts in brackets.
///
/// `host` holds an IP address in canonical text form (without brackets) or a
/// host name. Displays (and serializes) as `scheme://host:port`, e.g.
/// `tcp4://127.0.0.2:8457` or `tcp6://[::1]:8457`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl PeerAddr {
    pub fn new(scheme: Scheme, host: impl Into<String>, port: u16) -> Self {
        PeerAddr {
            scheme,
            host: host.into(),
            port,
        }
    }

    /// The host as an IP address, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The socket addresses this endpoint stands for, restricted to the
    /// scheme's family. Host names are looked up (this may block).
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let all: Vec<SocketAddr> = match self.ip() {
            Some(ip) => vec![SocketAddr::new(ip, self.port)],
            None => (self.host.as_str(), self.port).to_socket_addrs()?.collect(),
        };
        let found: Vec<SocketAddr> = all
            .into_iter()
            .filter(|a| self.scheme.admits(&a.ip()))
            .collect();
        if found.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{self}: no {} address found", self.scheme.family()),
            ));
        }
        Ok(found)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

impl Serialize for PeerAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The host part of an address, before the scheme is checked.
enum Host {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    Name(String),
}

/// Parses a `listen` or `remote` address; the port defaults to
/// [`DEFAULT_PORT`].
impl FromStr for PeerAddr {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        parse_peer(s, DEFAULT_PORT)
    }
}

impl PeerAddr {
    /// Parses a `source` address: as for [`FromStr`], but the port defaults to
    /// 0 (any local port), which may also be given explicitly.
    pub fn parse_source(s: &str) -> Result<Self, ValueError> {
        parse_peer(s, 0)
    }

    /// Parses a `metrics listen` address: the port defaults to
    /// [`METRICS_PORT`].
    pub fn parse_metrics(s: &str) -> Result<Self, ValueError> {
        parse_peer(s, METRICS_PORT)
    }
}

/// Parses an address. Port 0 is accepted only where it is the default.
fn parse_peer(s: &str, default_port: u16) -> Result<PeerAddr, ValueError> {
    parse_parts(s, default_port).map_err(|why| ValueError(format!("invalid address '{s}': {why}")))
}

fn parse_parts(s: &str, default_port: u16) -> Result<PeerAddr, String> {
    let (scheme, rest) = match s.split_once("://") {
        None => (None, s),
        Some(("tcp", rest)) => (Some(Scheme::Tcp), rest),
        Some(("tcp4", rest)) => (Some(Scheme::Tcp4), rest),
        Some(("tcp6", rest)) => (Some(Scheme::Tcp6), rest),
        Some(("uds", _)) => return Err("uds:// addresses are only valid for 'control'".into()),
        Some((other, _)) => {
            return Err(format!(
                "unsupported scheme '{other}://' (expected tcp://, tcp4://, tcp6:// or none)"
            ))
        }
    };
    let (host, port) = split_host_port(rest)?;
    let port = match port {
        None => default_port,
        Some(p) => parse_port(p, default_port == 0)?,
    };
    let scheme = match (scheme, &host) {
        (Some(Scheme::Tcp4), Host::V6(ip)) => {
            return Err(format!("tcp4:// cannot be used with IPv6 address {ip}"))
        }
        (Some(Scheme::Tcp6), Host::V4(ip)) => {
            return Err(format!("tcp6:// cannot be used with IPv4 address {ip}"))
        }
        (Some(scheme), _) => scheme,
        (None, Host::V4(_)) => Scheme::Tcp4,
        (None, Host::V6(_)) => Scheme::Tcp6,
        (None, Host::Name(_)) => Scheme::Tcp,
    };
    let host = match host {
        Host::V4(ip) => ip.to_string(),
        Host::V6(ip) => ip.to_string(),
        Host::Name(name) => name,
    };
    Ok(PeerAddr { scheme, host, port })
}

fn split_host_port(rest: &str) -> Result<(Host, Option<&str>), String> {
    if let Some(inner) = rest.strip_prefix('[') {
        let (inside, after) = inner
            .split_once(']')
            .ok_or("missing ']' after the IPv6 address")?;
        let ip = inside
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("'{inside}' is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| format!("unexpected '{after}' after ']'"))?,
            ),
        };
        return Ok((Host::V6(ip), port));
    }
    if rest.matches(':').count() > 1 {
        // An unbracketed IPv6 address cannot carry a port.
        return match rest.parse::<Ipv6Addr>() {
            Ok(ip) => Ok((Host::V6(ip), None)),
            Err(_) => Err("IPv6 addresses must be written in brackets, e.g. [::1]:8457".into()),
        };
    }
    let (host, port) = match rest.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    };
    Ok((parse_host(host)?, port))
}

fn parse_host(host: &str) -> Result<Host, String> {
    if host.is_empty() {
        return Err("missing host".into());
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::V4(ip));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("'{host}' is not a valid IPv4 address"));
    }
    let valid_name = !host.starts_with(['.', '-'])
        && !host.contains("..")
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !valid_name {
        return Err(format!("'{host}' is not a valid host name"));
    }
    Ok(Host::Name(host.to_string()))
}

fn parse_port(port: &str, allow_zero: bool) -> Result<u16, String> {
    let lowest = u16::from(!allow_zero);
    match port.parse::<u16>() {
        Ok(p) if p >= lowest && port.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ if port.is_empty() => Err("missing port after ':'".into()),
        _ => Err(format!(
            "invalid port '{port}' (expected a number from {lowest} to 65535)"
        )),
    }
}

/// `control` value: `uds://` followed by an absolute path.
pub(crate) fn parse_control(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("uds://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        Some(_) => Err(format!(
            "the uds:// control path must be absolute, e.g. uds:///var/run/hastctl, found '{s}'"
        )),
        None => Err(format!(
            "only uds:// control addresses are supported, found '{s}'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> PeerAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<PeerAddr>().unwrap_err().0
    }

    #[test]
    fn forms_and_canonical_display() {
        let cases = [
            ("127.0.0.2", "tcp4://127.0.0.2:8457"),
            ("127.0.0.2:1234", "tcp4://127.0.0.2:1234"),
            ("tcp4://127.0.0.2", "tcp4://127.0.0.2:8457"),
            ("tcp://127.0.0.2:99", "tcp://127.0.0.2:99"),
            ("tcp6://[::1]:8457", "tcp6://[::1]:8457"),
            ("tcp6://[::1]", "tcp6://[::1]:8457"),
            ("[::1]", "tcp6://[::1]:8457"),
            ("[::1]:7", "tcp6://[::1]:7"),
            ("tcp6://::1", "tcp6://[::1]:8457"),
            ("[0:0::0:1]", "tcp6://[::1]:8457"),
            ("tcp://[::]:1", "tcp://[::]:1"),
            ("hosta", "tcp://hosta:8457"),
            ("host-a.example.com:9000", "tcp://host-a.example.com:9000"),
            ("tcp4://hosta", "tcp4://hosta:8457"),
            ("tcp6://hosta:65535", "tcp6://hosta:65535"),
        ];
        for (input, shown) in cases {
            assert_eq!(ok(input).to_string(), shown, "{input}");
            // The canonical form parses back to the same address.
            assert_eq!(ok(shown), ok(input), "{input}");
        }
        assert_eq!(
            ok("tcp6://[::1]:8457"),
            PeerAddr::new(Scheme::Tcp6, "::1", 8457)
        );
    }

    #[test]
    fn bad_addresses() {
        let cases = [
            (
                "10.0.0.1:0",
                "invalid port '0' (expected a number from 1 to 65535)",
            ),
            (
                "10.0.0.1:65536",
                "invalid port '65536' (expected a number from 1 to 65535)",
            ),
            (
                "10.0.0.1:http",
                "invalid port 'http' (expected a number from 1 to 65535)",
            ),
            ("10.0.0.1:", "missing port after ':'"),
            ("tcp4://:80", "missing host"),
            ("[::1", "missing ']' after the IPv6 address"),
            ("[x]:1", "'x' is not an IPv6 address"),
            ("[::1]1", "unexpected '1' after ']'"),
            (
                "::1:80:x",
                "IPv6 addresses must be written in brackets, e.g. [::1]:8457",
            ),
            (
                "tcp4://[::1]",
                "tcp4:// cannot be used with IPv6 address ::1",
            ),
            (
                "tcp6://10.0.0.1",
                "tcp6:// cannot be used with IPv4 address 10.0.0.1",
            ),
            (
                "udp://a",
                "unsupported scheme 'udp://' (expected tcp://, tcp4://, tcp6:// or none)",
            ),
            ("uds:///x", "uds:// addresses are only valid for 'control'"),
            ("999.1.1.1", "'999.1.1.1' is not a valid IPv4 address"),
            ("a/b", "'a/b' is not a valid host name"),
            ("a..b", "'a..b' is not a valid host name"),
        ];
        for (input, why) in cases {
            assert_eq!(err(input), format!("invalid address '{input}': {why}"));
        }
    }

    #[test]
    fn source_addresses_default_to_any_port() {
        let src = PeerAddr::parse_source("127.0.0.1").unwrap();
        assert_eq!(src, PeerAddr::new(Scheme::Tcp4, "127.0.0.1", 0));
        assert_eq!(src.to_string(), "tcp4://127.0.0.1:0");
        assert_eq!(PeerAddr::parse_source(&src.to_string()).unwrap(), src);
        assert_eq!(PeerAddr::parse_source("[::1]:9").unwrap().port, 9);
        assert!(PeerAddr::parse_source("[::1]:65536")
            .unwrap_err()
            .0
            .contains("from 0 to 65535"));
    }

    #[test]
    fn resolve_filters_by_family() {
        let v4 = ok("tcp4://127.0.0.1:5").resolve().unwrap();
        assert_eq!(v4, vec!["127.0.0.1:5".parse().unwrap()]);
        let v6 = ok("[::1]:5").resolve().unwrap();
        assert_eq!(v6, vec!["[::1]:5".parse().unwrap()]);
        // "localhost" resolves without a network; tcp4 keeps only IPv4.
        if let Ok(addrs) = ok("tcp4://localhost:5").resolve() {
            assert!(addrs.iter().all(|a| a.is_ipv4() && a.port() == 5));
        }
    }

    #[test]
    fn serializes_as_string() {
        let json = serde_json::to_string(&ok("tcp6://[::1]")).unwrap();
        assert_eq!(json, "\"tcp6://[::1]:8457\"");
        assert_eq!(serde_json::to_string(&Scheme::Tcp4).unwrap(), "\"tcp4\"");
    }

    #[test]
    fn control_addresses() {
        assert_eq!(
            parse_control("uds:///var/run/hastctl").unwrap(),
            PathBuf::from("/var/run/hastctl")
        );
        assert_eq!(
            parse_control("tcp://127.0.0.1").unwrap_err(),
            "only uds:// control addresses are supported, found 'tcp://127.0.0.1'"
        );
        assert!(parse_control("uds://rel")
            .unwrap_err()
            .contains("must be absolute"));
    }
}
