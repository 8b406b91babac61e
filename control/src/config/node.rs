//! Which names this host answers to in `on <node>` blocks.

use std::fmt;

use serde::Serialize;

/// Environment variable that overrides the node name.
pub const NODE_ENV: &str = "HAST_NODE";

/// File holding the machine id, used as a node name.
const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// The names this node answers to, in order of preference: normally the full
/// host name, the host name up to its first dot and the machine id; with an
/// explicit override, only that name. Serializes as the list of names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct NodeIdentity {
    names: Vec<String>,
}

impl NodeIdentity {
    /// Exactly one name (an explicit override, or tests).
    pub fn named(name: impl Into<String>) -> Self {
        NodeIdentity {
            names: vec![name.into()],
        }
    }

    /// The identity made of a host name and a machine id, either of which may
    /// be missing: full host name, short host name, machine id (trimmed),
    /// without empty names or repeats.
    pub fn from_parts(hostname: Option<&str>, machine_id: Option<&str>) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            let name = name.trim();
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        };
        if let Some(host) = hostname {
            let host = host.trim();
            add(host);
            add(host.split('.').next().unwrap_or(host));
        }
        if let Some(id) = machine_id {
            add(id);
        }
        NodeIdentity { names }
    }

    /// This host's identity from its host name and `/etc/machine-id`
    /// (either may be unavailable).
    pub fn from_system() -> Self {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok());
        let machine_id = std::fs::read_to_string(MACHINE_ID_PATH).ok();
        Self::from_parts(hostname.as_deref(), machine_id.as_deref())
    }

    /// The identity to use: the command-line `--node` value if given, else
    /// `$HAST_NODE` if set and not empty, else [`NodeIdentity::from_system`].
    pub fn resolve(cli: Option<&str>) -> Self {
        let env = std::env::var(NODE_ENV).ok();
        Self::resolve_with(cli, env.as_deref(), Self::from_system)
    }

    fn resolve_with(cli: Option<&str>, env: Option<&str>, system: impl FnOnce() -> Self) -> Self {
        let explicit = [cli, env]
            .into_iter()
            .flatten()
            .map(str::trim)
            .find(|n| !n.is_empty());
        match explicit {
            Some(name) => Self::named(name),
            None => system(),
        }
    }

    /// The names, most specific first.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether an `on <name>` block is for this node (exact comparison).
    pub fn matches(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.names.is_empty() {
            f.write_str("(no name)")
        } else {
            f.write_str(&self.names.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_give_full_short_and_machine_id() {
        let id = NodeIdentity::from_parts(Some("host.example.org"), Some("8f3c\n"));
        assert_eq!(id.names(), ["host.example.org", "host", "8f3c"]);
        assert_eq!(id.to_string(), "host.example.org, host, 8f3c");
        assert!(id.matches("host") && id.matches("8f3c") && !id.matches("example"));

        let id = NodeIdentity::from_parts(Some("plain"), None);
        assert_eq!(id.names(), ["plain"]);
        let id = NodeIdentity::from_parts(None, Some("  "));
        assert!(id.names().is_empty());
        assert_eq!(id.to_string(), "(no name)");
    }

    #[test]
    fn resolve_prefers_cli_then_env_then_system() {
        let system = || NodeIdentity::named("sys");
        let pick = |cli, env| NodeIdentity::resolve_with(cli, env, system);
        assert_eq!(pick(Some("cli"), Some("env")), NodeIdentity::named("cli"));
        assert_eq!(pick(None, Some("env")), NodeIdentity::named("env"));
        assert_eq!(pick(Some(""), Some("env")), NodeIdentity::named("env"));
        assert_eq!(pick(None, Some("")), NodeIdentity::named("sys"));
        assert_eq!(pick(None, None), NodeIdentity::named("sys"));
    }

    #[test]
    fn from_system_has_the_host_name() {
        let id = NodeIdentity::from_system();
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        if !host.is_empty() {
            assert_eq!(id.names()[0], host);
        }
    }
}
