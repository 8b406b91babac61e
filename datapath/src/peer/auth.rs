//! Peer authentication (pure: no I/O): the shared secret, the nonces, the
//! handshake transcript both proofs cover, the proofs themselves and the
//! keys of the authenticated stream that follows (see `docs/protocol.md`,
//! "Authentication").
//!
//! - Each side proves it knows the secret with
//!   `HMAC-SHA256(secret, role label || transcript)`; the transcript holds
//!   the protocol version, the modes (TLS, secret), the resource, both node
//!   names, both fresh nonces and, under TLS, a value exported from the TLS
//!   session. A fresh nonce from each side makes every proof good for one
//!   connection only: a replayed handshake fails.
//! - The keys of the authenticated stream come from HKDF-SHA256 with the
//!   nonces as salt and the secret as input keying material, one key per
//!   direction, bound to the transcript's hash.
//!
//! The cryptography is RustCrypto's `hmac`, `sha2` and `hkdf`; nothing here
//! is more than how their outputs are put together.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// HMAC-SHA256.
pub type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 output).
pub const PROOF_LEN: usize = 32;
/// Bytes of a key of the authenticated stream.
pub const KEY_LEN: usize = 32;
/// Shortest secret accepted, bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret accepted, bytes.
pub const MAX_SECRET_LEN: usize = 4096;
/// Bytes exported from a TLS session into the transcript.
pub const TLS_BINDING_LEN: usize = 32;
/// The TLS exporter label (RFC 8446 section 7.5).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-hast-rs-peer-auth";

/// Label opening every transcript (its version is the protocol's).
const TRANSCRIPT_LABEL: &[u8] = b"hast-rs peer handshake\0";

/// A nonce: 32 random bytes, fresh for every handshake.
pub type Nonce = [u8; NONCE_LEN];

/// A new random nonce from the operating system's generator.
pub fn fresh_nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// A shared secret (`secret` / `secretfile` in hast.conf). Never printed:
/// `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret of 16 to 4096 bytes.
    pub fn new(bytes: &[u8]) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(format!(
                "a secret must be at least {MIN_SECRET_LEN} bytes long (this one has {}); \
                 generate one with e.g. `openssl rand -hex 32`",
                bytes.len()
            ));
        }
        if bytes.len() > MAX_SECRET_LEN {
            return Err(format!(
                "a secret must be at most {MAX_SECRET_LEN} bytes long (this one has {})",
                bytes.len()
            ));
        }
        Ok(Secret(Arc::from(bytes)))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes, not shown>)", self.0.len())
    }
}

/// Which side a proof or a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The connecting side.
    Primary,
    /// The listening side.
    Secondary,
}

impl Side {
    fn proof_label(self) -> &'static [u8] {
        match self {
            Side::Primary => b"hast-rs proof of the primary\0",
            Side::Secondary => b"hast-rs proof of the secondary\0",
        }
    }

    /// The key label of the stream this side sends.
    fn key_label(self) -> &'static [u8] {
        match self {
            Side::Primary => b"hast-rs stream primary to secondary\0",
            Side::Secondary => b"hast-rs stream secondary to primary\0",
        }
    }

    /// The other side.
    pub fn peer(self) -> Side {
        match self {
            Side::Primary => Side::Secondary,
            Side::Secondary => Side::Primary,
        }
    }
}

/// Everything both proofs cover, as each side saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// The negotiated protocol version.
    pub version: u16,
    /// The security mode bits both sides announced (`hello_flags` TLS and
    /// SECRET bits, shifted to the low bits: see `security_modes`).
    pub modes: u16,
    /// The resource.
    pub resource: String,
    /// The primary's node name, as it sent it.
    pub primary_node: String,
    /// The secondary's node name, as it sent it.
    pub secondary_node: String,
    /// The secondary's nonce.
    pub nonce_s: Nonce,
    /// The primary's nonce.
    pub nonce_p: Nonce,
    /// Under TLS, [`TLS_BINDING_LEN`] bytes exported from the session
    /// (label [`TLS_EXPORTER_LABEL`], no context); empty otherwise.
    pub channel: Vec<u8>,
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&field[..usize::from(len)]);
}

impl Transcript {
    /// The bytes the proofs are computed over: the label, then every field
    /// with explicit little-endian lengths (no two transcripts share an
    /// encoding).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(TRANSCRIPT_LABEL);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.modes.to_le_bytes());
        put(&mut out, self.resource.as_bytes());
        put(&mut out, self.primary_node.as_bytes());
        put(&mut out, self.secondary_node.as_bytes());
        out.extend_from_slice(&self.nonce_s);
        out.extend_from_slice(&self.nonce_p);
        put(&mut out, &self.channel);
        out
    }
}

fn hmac_of(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        m.update(p);
    }
    m
}

/// `side`'s proof that it knows `secret`, over `t`.
pub fn proof(secret: &Secret, side: Side, t: &Transcript) -> [u8; PROOF_LEN] {
    hmac_of(secret.bytes(), &[side.proof_label(), &t.encode()])
        .finalize()
        .into_bytes()
        .into()
}

/// Is `mac` `side`'s proof over `t`? (A constant-time comparison.)
pub fn verify(secret: &Secret, side: Side, t: &Transcript, mac: &[u8]) -> bool {
    hmac_of(secret.bytes(), &[side.proof_label(), &t.encode()])
        .verify_slice(mac)
        .is_ok()
}

/// The keys of one side's authenticated stream.
#[derive(Clone)]
pub struct StreamKeys {
    /// Authenticates what this side sends.
    pub send: [u8; KEY_LEN],
    /// Authenticates what this side receives.
    pub recv: [u8; KEY_LEN],
}

impl fmt::Debug for StreamKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamKeys(<not shown>)")
    }
}

/// The keys of `side`'s authenticated stream after the handshake `t`:
/// `HKDF-SHA256(salt = nonce_s || nonce_p, ikm = secret)`, expanded with
/// the direction's label and `SHA-256(transcript)`.
pub fn stream_keys(secret: &Secret, side: Side, t: &Transcript) -> StreamKeys {
    let mut salt = [0u8; 2 * NONCE_LEN];
    salt[..NONCE_LEN].copy_from_slice(&t.nonce_s);
    salt[NONCE_LEN..].copy_from_slice(&t.nonce_p);
    let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), secret.bytes());
    let th = Sha256::digest(t.encode());
    let key = |s: Side| {
        let mut k = [0u8; KEY_LEN];
        let info = [s.key_label(), th.as_slice()].concat();
        hk.expand(&info, &mut k)
            .expect("32 bytes are a valid HKDF-SHA256 output length");
        k
    };
    StreamKeys {
        send: key(side),
        recv: key(side.peer()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes()).unwrap()
    }

    fn transcript() -> Transcript {
        Transcript {
            version: 3,
            modes: 2,
            resource: "r0".into(),
            primary_node: "alpha".into(),
            secondary_node: "beta".into(),
            nonce_s: [1; NONCE_LEN],
            nonce_p: [2; NONCE_LEN],
            channel: Vec::new(),
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn secrets_are_bounded_and_never_printed() {
        assert!(Secret::new(b"short").unwrap_err().contains("at least 16"));
        assert!(Secret::new(&[b'x'; 4097]).is_err());
        let s = secret("correct horse battery staple");
        let shown = format!("{s:?}");
        assert!(!shown.contains("horse"), "{shown}");
        assert!(shown.contains("28 bytes"), "{shown}");
    }

    #[test]
    fn nonces_are_fresh() {
        let a = fresh_nonce();
        let b = fresh_nonce();
        assert_ne!(a, b);
        assert_ne!(a, [0; NONCE_LEN]);
    }

    /// The proof is HMAC-SHA256 over the label and the transcript,
    /// nothing else: checked against an HMAC computed independently here.
    #[test]
    fn proof_is_hmac_sha256_of_label_and_transcript() {
        let s = secret("0123456789abcdef0123");
        let t = transcript();
        let mut msg = b"hast-rs proof of the primary\0".to_vec();
        msg.extend_from_slice(&t.encode());
        let expect = hmac_of(b"0123456789abcdef0123", &[&msg])
            .finalize()
            .into_bytes();
        assert_eq!(proof(&s, Side::Primary, &t).to_vec(), expect.to_vec());
        // The encoding is frozen: its hash must not change silently.
        let enc = t.encode();
        assert!(enc.starts_with(b"hast-rs peer handshake\0\x03\x00\x02\x00\x02\x00r0"));
        assert_eq!(enc.len(), 23 + 2 + 2 + 4 + 7 + 6 + 64 + 2);
    }

    /// RFC 4231 test case 2: the HMAC underneath is the standard one.
    #[test]
    fn hmac_matches_rfc_4231() {
        let mac = hmac_of(b"Jefe", &[b"what do ya want ", b"for nothing?"])
            .finalize()
            .into_bytes();
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn proofs_verify_only_with_everything_equal() {
        let s = secret("the right secret, long enough");
        let t = transcript();
        let p = proof(&s, Side::Primary, &t);
        assert!(verify(&s, Side::Primary, &t, &p));
        // Another secret, the other side's label (a reflected proof), a
        // truncated or altered proof.
        assert!(!verify(
            &secret("the wrong secret, long enough"),
            Side::Primary,
            &t,
            &p
        ));
        assert!(!verify(&s, Side::Secondary, &t, &p));
        assert!(!verify(&s, Side::Primary, &t, &p[..31]));
        let mut bad = p;
        bad[7] ^= 1;
        assert!(!verify(&s, Side::Primary, &t, &bad));
        // Every field of the transcript counts: a replay under a fresh
        // nonce of the secondary fails, and so does any other change.
        type Change = Box<dyn Fn(&mut Transcript)>;
        let changes: Vec<Change> = vec![
            Box::new(|t| t.nonce_s[0] ^= 1),
            Box::new(|t| t.nonce_p[31] ^= 1),
            Box::new(|t| t.version = 4),
            Box::new(|t| t.modes = 3),
            Box::new(|t| t.resource = "r1".into()),
            Box::new(|t| t.primary_node = "alphA".into()),
            Box::new(|t| t.secondary_node = "bet".into()),
            Box::new(|t| t.channel = vec![0; TLS_BINDING_LEN]),
            // Moving bytes between fields changes the encoding too.
            Box::new(|t| {
                t.primary_node = "alphab".into();
                t.secondary_node = "eta".into();
            }),
        ];
        for change in changes {
            let mut t2 = transcript();
            change(&mut t2);
            assert_ne!(t2.encode(), t.encode());
            assert!(!verify(&s, Side::Primary, &t2, &p), "{t2:?}");
        }
    }

    #[test]
    fn stream_keys_pair_up_and_differ_per_direction_and_session() {
        let s = secret("a secret of enough length");
        let t = transcript();
        let p = stream_keys(&s, Side::Primary, &t);
        let q = stream_keys(&s, Side::Secondary, &t);
        assert_eq!(p.send, q.recv);
        assert_eq!(p.recv, q.send);
        assert_ne!(p.send, p.recv);
        let mut t2 = transcript();
        t2.nonce_p[0] ^= 1;
        let p2 = stream_keys(&s, Side::Primary, &t2);
        assert_ne!(p.send, p2.send);
        assert_ne!(p.recv, p2.recv);
        let p3 = stream_keys(
            &secret("another secret of enough length"),
            Side::Primary,
            &t,
        );
        assert_ne!(p.send, p3.send);
        assert_eq!(format!("{p:?}"), "StreamKeys(<not shown>)");
    }
}
