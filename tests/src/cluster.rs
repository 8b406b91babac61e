//! Two hastd nodes on this host: "nodeA" on 127.0.0.1 and "nodeB" on
//! 127.0.0.2, each with its own directory, config, providers and listen
//! port, optionally talking to each other through fault-injecting
//! [`Proxy`]s.
//!
//! Addressing. hastd recognises its peer by the source IP of an incoming
//! connection, so each node connects from its own IP (`source`). With
//! proxies, the proxy carrying A's connections to B listens on **B's** IP
//! (A's `remote` is that proxy) and connects to B from **A's** IP; the one
//! carrying B's connections listens on A's IP and connects from B's. Every
//! node thus sees its peer at the IP its `remote` names, whichever way the
//! connection went:
//!
//! ```text
//!   A (127.0.0.1, source 127.0.0.1) --> proxy_ab 127.0.0.2:P --(from 127.0.0.1)--> B listen 127.0.0.2:LB
//!   B (127.0.0.2, source 127.0.0.2) --> proxy_ba 127.0.0.1:Q --(from 127.0.0.2)--> A listen 127.0.0.1:LA
//! ```

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::proxy::{free_port, Proxy};
use crate::{NodeConfig, ResourceDef, TestNode};

/// nodeA's IP.
pub const IP_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// nodeB's IP.
pub const IP_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// How [`Cluster::new`] configures the nodes.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Global `replication` (default `memsync`).
    pub replication: String,
    /// Global `timeout` in seconds (default 5).
    pub timeout_secs: u32,
    /// Route each node's outgoing connections through a [`Proxy`].
    pub with_proxy: bool,
    /// Global `exec`.
    pub exec: Option<PathBuf>,
    /// Extra statements for every resource block.
    pub extra_resource: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replication: "memsync".into(),
            timeout_secs: 5,
            with_proxy: false,
            exec: None,
            extra_resource: String::new(),
        }
    }
}

/// Two nodes on this host; see the module documentation. Dropping it kills
/// both hastd (by PID) and then stops the proxies.
pub struct Cluster {
    /// "nodeA", on 127.0.0.1.
    pub a: TestNode,
    /// "nodeB", on 127.0.0.2.
    pub b: TestNode,
    /// nodeA's listen address.
    pub a_listen: SocketAddr,
    /// nodeB's listen address.
    pub b_listen: SocketAddr,
    proxy_ab: Option<Proxy>,
    proxy_ba: Option<Proxy>,
    opts: ClusterOptions,
}

/// How many times [`Cluster::start`] picks new listen ports when a port
/// turns out to be taken.
const START_ATTEMPTS: usize = 5;

impl Cluster {
    /// Node "nodeA" on 127.0.0.1 and "nodeB" on 127.0.0.2, each listening
    /// on its own free port (in a global `on <node>` block), each resource
    /// with a provider file per node, `remote` pointing at the other node
    /// (or at the proxy that forwards to it), `source` the node's own IP.
    /// Resources must not have a `path` (each node needs its own); set
    /// `c.a.resources[i].path` and call `write_conf` afterwards for
    /// devices.
    pub fn new(resources: Vec<ResourceDef>, opts: ClusterOptions) -> Cluster {
        for r in &resources {
            assert!(
                r.path.is_none(),
                "resource {}: a cluster creates one provider per node; set paths afterwards",
                r.name
            );
        }
        let a_listen = SocketAddr::new(IP_A, free_port(IP_A));
        let b_listen = SocketAddr::new(IP_B, free_port(IP_B));
        let (proxy_ab, proxy_ba) = if opts.with_proxy {
            let ab = Proxy::start(SocketAddr::new(IP_B, 0), b_listen, IP_A)
                .unwrap_or_else(|e| panic!("start proxy a->b: {e}"));
            let ba = Proxy::start(SocketAddr::new(IP_A, 0), a_listen, IP_B)
                .unwrap_or_else(|e| panic!("start proxy b->a: {e}"));
            (Some(ab), Some(ba))
        } else {
            (None, None)
        };
        let remote_of_a = proxy_ab.as_ref().map_or(b_listen, Proxy::addr);
        let remote_of_b = proxy_ba.as_ref().map_or(a_listen, Proxy::addr);
        let cfg = |ip: IpAddr, listen: SocketAddr, remote: SocketAddr| NodeConfig {
            ip: Some(ip),
            listen: vec![tcp4(listen)],
            global_listen: Vec::new(),
            remote: Some(tcp4(remote)),
            source: Some(format!("tcp4://{ip}")),
            replication: Some(opts.replication.clone()),
            timeout: Some(opts.timeout_secs),
            exec: opts.exec.clone(),
            global_extra: String::new(),
            resource_extra: opts.extra_resource.clone(),
        };
        let a = TestNode::new("nodeA", cfg(IP_A, a_listen, remote_of_a), resources.clone());
        let b = TestNode::new("nodeB", cfg(IP_B, b_listen, remote_of_b), resources);
        Cluster {
            a,
            b,
            a_listen,
            b_listen,
            proxy_ab,
            proxy_ba,
            opts,
        }
    }

    /// The options the cluster was made with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// The proxy carrying A's outgoing connections to B.
    pub fn proxy_ab(&self) -> Option<&Proxy> {
        self.proxy_ab.as_ref()
    }

    /// The proxy carrying B's outgoing connections to A.
    pub fn proxy_ba(&self) -> Option<&Proxy> {
        self.proxy_ba.as_ref()
    }

    /// `hastctl create` of every resource on both nodes.
    pub fn create_all(&self) {
        self.a.create_all();
        self.b.create_all();
    }

    /// Starts both hastd (A, then B). If one exits early because its
    /// listen port was taken meanwhile (EADDRINUSE), that node gets a new
    /// port, the configs (or the proxy) are updated and the start retried.
    pub fn start(&mut self) {
        for attempt in 1..=START_ATTEMPTS {
            let retry = match self.a.try_start() {
                Err(e) => Some((true, e)),
                Ok(()) => match self.b.try_start() {
                    Err(e) => Some((false, e)),
                    Ok(()) => None,
                },
            };
            let Some((is_a, err)) = retry else { return };
            if !err.contains("Address already in use") || attempt == START_ATTEMPTS {
                panic!("cannot start the cluster (attempt {attempt}): {err}");
            }
            self.a.stop();
            self.b.stop();
            for n in [&self.a, &self.b] {
                let log = n.dir.join("hastd.log");
                let _ = std::fs::rename(&log, n.dir.join(format!("hastd.log.{attempt}")));
            }
            self.move_listen(is_a);
        }
    }

    /// Gives node A (`is_a`) or B a new listen port and points its peer
    /// (or the peer's proxy) at it.
    fn move_listen(&mut self, is_a: bool) {
        let ip = if is_a { IP_A } else { IP_B };
        let new = SocketAddr::new(ip, free_port(ip));
        let (node, peer, proxy) = if is_a {
            self.a_listen = new;
            (&mut self.a, &mut self.b, &self.proxy_ba)
        } else {
            self.b_listen = new;
            (&mut self.b, &mut self.a, &self.proxy_ab)
        };
        node.cfg.listen = vec![tcp4(new)];
        node.write_conf();
        match proxy {
            Some(p) => p.set_target(new),
            None => {
                peer.cfg.remote = Some(tcp4(new));
                peer.write_conf();
            }
        }
    }

    /// Stops both hastd (SIGTERM, expecting exit 0).
    pub fn stop(&mut self) {
        self.a.stop();
        self.b.stop();
    }

    /// Compares the data areas of a resource's two providers byte for byte
    /// (read straight from the providers at `localoff`, `datasize` bytes,
    /// from each node's `hastctl dump --json`). Returns the first differing
    /// offset within the data area, or None. Data areas of different sizes
    /// differ at the smaller size if they agree up to there.
    pub fn data_diff(&self, res: &str) -> Option<u64> {
        let area = |n: &TestNode| {
            let md = n.dump(res);
            let off = md["localoff"].as_u64().expect("localoff");
            let size = md["datasize"].as_u64().expect("datasize");
            let f = File::open(n.provider(res))
                .unwrap_or_else(|e| panic!("open {}: {e}", n.provider(res).display()));
            (f, off, size)
        };
        let (fa, offa, sizea) = area(&self.a);
        let (fb, offb, sizeb) = area(&self.b);
        let size = sizea.min(sizeb);
        const STEP: u64 = 1 << 20;
        let mut ba = vec![0u8; STEP as usize];
        let mut bb = vec![0u8; STEP as usize];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(STEP) as usize;
            fa.read_exact_at(&mut ba[..n], offa + pos)
                .unwrap_or_else(|e| panic!("read nodeA's {res} at {pos}: {e}"));
            fb.read_exact_at(&mut bb[..n], offb + pos)
                .unwrap_or_else(|e| panic!("read nodeB's {res} at {pos}: {e}"));
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .expect("a difference");
                return Some(pos + i as u64);
            }
            pos += n as u64;
        }
        (sizea != sizeb).then_some(size)
    }
}

/// `tcp4://ip:port`.
fn tcp4(a: SocketAddr) -> String {
    format!("tcp4://{a}")
}
