//! `tracing` set-up: human-readable by default, JSON by configuration.

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
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
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

/// A MongoDB URI with any password replaced, for logs and errors.
pub fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &uri[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &uri[..scheme + 3], user, &uri[at..])
        }
        _ => uri.to_owned(),
    }
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
    }
}
