//! `eventsyncd admin ...`: the operator's command line over the admin routes, so no curl
//! is needed. Plain HTTP/1.1 to the sync port (`--url`, default from the configuration's
//! `sync.listen`), with an admin token (`--token` / `EVENTSYNC_ADMIN_TOKEN`, default the
//! configuration's first `auth.admin_tokens` or `sync.tokens` entry).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What an admin command failed on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The URL is not `http://host:port[/prefix]`.
    #[error("bad --url {0:?}: expected http://host:port")]
    Url(String),
    /// The daemon could not be reached.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("unreadable answer from the daemon")]
    Protocol,
    /// The daemon refused (status and its JSON error).
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status.
        status: u16,
        /// The body.
        body: String,
    },
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One admin request.
#[derive(Debug, Clone)]
pub struct AdminRequest {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Path and query.
    pub path: String,
    /// JSON body for POST.
    pub body: Option<serde_json::Value>,
}

/// The request for an `eventsyncd admin` command line (after `admin`).
pub fn request_for(cmd: &AdminCommand) -> AdminRequest {
    let enc = |s: &str| percent(s);
    let get = |path: String| AdminRequest {
        method: "GET",
        path,
        body: None,
    };
    let post = |path: String, body: serde_json::Value| AdminRequest {
        method: "POST",
        path,
        body: Some(body),
    };
    match cmd {
        AdminCommand::Status { stream: None } => get("/v1/admin/streams".into()),
        AdminCommand::Status { stream: Some(s) } => get(format!("/v1/admin/streams/{}", enc(s))),
        AdminCommand::Resync { stream } => post(
            format!("/v1/admin/streams/{}/resync", enc(stream)),
            serde_json::json!({}),
        ),
        AdminCommand::Pause { stream } => post(
            format!("/v1/admin/streams/{}/pause", enc(stream)),
            serde_json::json!({}),
        ),
        AdminCommand::Resume { stream } => post(
            format!("/v1/admin/streams/{}/resume", enc(stream)),
            serde_json::json!({}),
        ),
        AdminCommand::StartAt {
            stream,
            at_ms,
            resume_token,
        } => {
            let body = match (at_ms, resume_token) {
                (Some(ms), _) => serde_json::json!({ "at_ms": ms }),
                (None, Some(t)) => serde_json::json!({
                    "resume_token": serde_json::from_str::<serde_json::Value>(t)
                        .unwrap_or(serde_json::Value::String(t.clone()))
                }),
                (None, None) => serde_json::json!({}),
            };
            post(format!("/v1/admin/streams/{}/start-at", enc(stream)), body)
        }
        AdminCommand::Controls { stream } => get(match stream {
            Some(s) => format!("/v1/admin/controls?stream={}", enc(s)),
            None => "/v1/admin/controls".into(),
        }),
        AdminCommand::DeadLetters { stream, id: None } => get(match stream {
            Some(s) => format!("/v1/admin/dead-letters?stream={}", enc(s)),
            None => "/v1/admin/dead-letters".into(),
        }),
        AdminCommand::DeadLetters { id: Some(id), .. } => {
            get(format!("/v1/admin/dead-letters/{}", enc(id)))
        }
        AdminCommand::Redrive { id } => post(
            format!("/v1/admin/dead-letters/{}/redrive", enc(id)),
            serde_json::json!({}),
        ),
    }
}

/// The admin commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Stream status: holder, epoch, checkpoint position and age, lag, pause, last error.
    Status {
        /// One stream (`db.collection`); all when absent.
        stream: Option<String>,
    },
    /// Re-read a stream now (compare with the shadows, emit only the differences).
    Resync {
        /// `db.collection`.
        stream: String,
    },
    /// Pause a stream (nothing appended until resume; nothing skipped).
    Pause {
        /// `db.collection`.
        stream: String,
    },
    /// Resume a paused stream.
    Resume {
        /// `db.collection`.
        stream: String,
    },
    /// Restart a stream's change stream at a time or after a resume token.
    StartAt {
        /// `db.collection`.
        stream: String,
        /// Unix milliseconds.
        #[arg(long, conflicts_with = "resume_token")]
        at_ms: Option<i64>,
        /// A resume token as Extended JSON, e.g. '{"_data":"82..."}'.
        #[arg(long)]
        resume_token: Option<String>,
    },
    /// Control requests (the stream's notice history), newest first.
    Controls {
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
    },
    /// List dead letters, or show one.
    DeadLetters {
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// Show this dead letter.
        #[arg(long)]
        id: Option<String>,
    },
    /// Re-drive a dead letter (re-reads its stream).
    Redrive {
        /// The dead letter id.
        id: String,
    },
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends `req` to `url` (`http://host:port`) with `token`; returns the status and body.
pub async fn send(
    url: &str,
    token: Option<&str>,
    req: &AdminRequest,
    timeout: Duration,
) -> Result<(u16, String), CliError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| CliError::Url(url.to_owned()))?;
    let (addr, prefix) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let prefix = if prefix == "/" { String::new() } else { prefix };
    if addr.is_empty() {
        return Err(CliError::Url(url.to_owned()));
    }
    let body = req.body.as_ref().map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{} {}{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n",
        req.method, prefix, req.path
    );
    if let Some(t) = token {
        head += &format!("Authorization: Bearer {t}\r\n");
    }
    if req.body.is_some() {
        head += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head += "\r\n";
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| CliError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let io = |source| CliError::Connect {
            addr: addr.to_owned(),
            source,
        };
        s.write_all(head.as_bytes()).await.map_err(io)?;
        s.write_all(body.as_bytes()).await.map_err(io)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(io)?;
        Ok::<_, CliError>(out)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CliError::Timeout(timeout))??;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), CliError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(CliError::Protocol)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(CliError::Protocol)?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or(CliError::Protocol)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        s = rest.get(n..)?.strip_prefix("\r\n")?;
    }
}

/// Runs one command and pretty-prints the answer; `Err` on a refusal.
pub async fn run(url: &str, token: Option<&str>, cmd: &AdminCommand) -> Result<String, CliError> {
    let req = request_for(cmd);
    let (status, body) = send(url, token, &req, Duration::from_secs(30)).await?;
    let pretty = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(body);
    if status >= 400 {
        return Err(CliError::Status {
            status,
            body: pretty,
        });
    }
    Ok(pretty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_routes() {
        let r = request_for(&AdminCommand::Resync {
            stream: "app.players".into(),
        });
        assert_eq!(
            (r.method, r.path.as_str()),
            ("POST", "/v1/admin/streams/app.players/resync")
        );
        let r = request_for(&AdminCommand::Status { stream: None });
        assert_eq!((r.method, r.path.as_str()), ("GET", "/v1/admin/streams"));
        let r = request_for(&AdminCommand::Pause {
            stream: "a b.c".into(),
        });
        assert_eq!(r.path, "/v1/admin/streams/a%20b.c/pause");
        for cmd in [
            AdminCommand::Status {
                stream: Some("x.y".into()),
            },
            AdminCommand::Resume {
                stream: "x.y".into(),
            },
            AdminCommand::StartAt {
                stream: "x.y".into(),
                at_ms: Some(1),
                resume_token: None,
            },
            AdminCommand::Controls { stream: None },
            AdminCommand::DeadLetters {
                stream: None,
                id: None,
            },
            AdminCommand::DeadLetters {
                stream: None,
                id: Some("ab".into()),
            },
            AdminCommand::Redrive { id: "ab".into() },
        ] {
            let r = request_for(&cmd);
            let template = r
                .path
                .split('?')
                .next()
                .unwrap_or_default()
                .replace("x.y", "{stream}")
                .replace("/ab", "/{id}");
            assert!(
                crate::api::ROUTES
                    .contains(&(r.method.to_ascii_lowercase().as_str(), template.as_str())),
                "{cmd:?} → {} {template} is not a route",
                r.method
            );
        }
    }

    #[test]
    fn responses_parse() {
        let raw = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n\r\n{\"a\":1}";
        assert_eq!(
            parse_response(raw).ok(),
            Some((202, "{\"a\":1}".to_owned()))
        );
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).ok(),
            Some((200, "{\"a\":1}".to_owned()))
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
