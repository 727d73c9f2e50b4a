//! `tracing` set-up: human-readable by default, JSON by configuration.

use std::io::IsTerminal;

use serde::Deserialize;

use crate::config::ConfigError;

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: String,
    /// A `tracing` filter such as `info` or `eventsync=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl LogConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.format.as_str(), "text" | "json") {
            return Err(ConfigError::invalid(
                "log.format",
                format!("is {:?}; allowed: \"text\" or \"json\"", self.format),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.level).map_err(|e| {
            ConfigError::invalid("log.level", format!("is not a valid filter: {e}"))
        })?;
        Ok(())
    }

    /// Installs the global subscriber (once; later calls do nothing).
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(&self.level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Colours only on a terminal: not in files, `kubectl logs` or log shippers.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        let _ = if self.format == "json" {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .try_init()
        } else {
            builder.try_init()
        };
    }
}

/// A MongoDB URI with its secrets replaced by `***`, for logs and errors: the password
/// of the user info, and the values of query options that can carry secrets
/// (`tlsCertificateKeyFilePassword`, `authMechanismProperties`, …).
///
/// Errs on the side of hiding: the user info ends at the *last* `@`, so a password with an
/// unencoded `@`, `/` or `?` is hidden whole.
pub fn redact_uri(uri: &str) -> String {
    let start = uri.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = uri.split_at(start);
    let (userinfo, hosts_and_options) = match rest.rfind('@') {
        Some(at) => {
            let creds = &rest[..at];
            let shown = match creds.split_once(':') {
                Some((user, _password)) => format!("{user}:***@"),
                None => format!("{creds}@"),
            };
            (shown, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let (hosts, options) = match hosts_and_options.split_once('?') {
        Some((h, o)) => (h, Some(o)),
        None => (hosts_and_options, None),
    };
    let mut out = format!("{scheme}{userinfo}{hosts}");
    if let Some(options) = options {
        out.push('?');
        let mut first = true;
        for pair in options.split(['&', ';']) {
            if !first {
                out.push('&');
            }
            first = false;
            match pair.split_once('=') {
                Some((key, _value)) if is_secret_option(key) => {
                    out.push_str(key);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("token")
        || k == "authmechanismproperties"
}

#[cfg(test)]
mod tests {
    use super::redact_uri;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_uri("mongodb://app:s3cret@db:27017/?tls=true"),
            "mongodb://app:***@db:27017/?tls=true"
        );
        assert_eq!(redact_uri("mongodb://db:27017"), "mongodb://db:27017");
        assert_eq!(
            redact_uri("mongodb://db:27017/?replicaSet=rs0&w=majority"),
            "mongodb://db:27017/?replicaSet=rs0&w=majority"
        );
    }

    #[test]
    fn awkward_passwords_and_secret_options_are_hidden() {
        for (uri, secret) in [
            ("mongodb://app:p@ss@db/x", "p@ss"),
            ("mongodb://app:pa/ss?w@db:1,db2:2/x?authSource=admin", "pa/ss"),
            ("mongodb+srv://app:s3cret@cluster.example.com/", "s3cret"),
            ("app:s3cret@db:27017", "s3cret"),
            (
                "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=s3cret",
                "s3cret",
            ),
            (
                "mongodb://db/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:s3cret",
                "s3cret",
            ),
        ] {
            let shown = redact_uri(uri);
            assert!(!shown.contains(secret), "{uri} -> {shown}");
            assert!(shown.contains("***"), "{uri} -> {shown}");
        }
        assert_eq!(
            redact_uri(
                "mongodb://app:pw@db1:1,db2:2/?replicaSet=rs0&tlsCertificateKeyFilePassword=x"
            ),
            "mongodb://app:***@db1:1,db2:2/?replicaSet=rs0&tlsCertificateKeyFilePassword=***"
        );
        assert_eq!(
            redact_uri("mongodb://x509user@db/"),
            "mongodb://x509user@db/"
        );
    }
}
