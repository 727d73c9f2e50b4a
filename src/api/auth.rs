//! Authorization of the sync and admin API.
//!
//! Every request carries `Authorization: Bearer <token>`; the token resolves to a
//! [`Principal`]:
//!
//! * `sync.tokens` — the original shared tokens: **full access** (every client id, every
//!   stream, the admin routes). Kept so existing set-ups work unchanged.
//! * `auth.admin_tokens` — operators: full access, including `/v1/admin/...`.
//! * `[[auth.clients]]` — static client tokens: `{ token, client_id, streams }`; the
//!   holder reads, registers, acknowledges and deletes only `client_id`, and reads only
//!   `streams` (`["*"]`: every stream).
//! * `[auth.jwt]` — signed tokens (HS256 with a shared secret; RS256/ES256 with a PEM
//!   public key or a JWKS file): claim `sub` is the client id, `streams` the readable
//!   streams (absent: none; `["*"]`: all), `admin: true` makes an admin token.
//!   `exp` is required and checked.
//!
//! No credentials configured at all: the API is open (logged at start-up). A missing token
//! or a JWT that fails validation (expired, bad signature, wrong issuer/audience) is
//! `401`; an unknown static token, another client's id, an unlisted stream or an admin
//! route with a client token is `403`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::error::ApiError;
use crate::config::ConfigError;

/// `[auth]`: per-client and admin credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens that may use every route, including `/v1/admin/...`.
    pub admin_tokens: Vec<String>,
    /// Static client tokens.
    pub clients: Vec<StaticClient>,
    /// Signed tokens (JWT).
    pub jwt: Option<JwtConfig>,
}

/// A static token bound to one client id and the streams it may read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticClient {
    /// The bearer token (at least 16 characters).
    pub token: String,
    /// The client id the token acts as.
    pub client_id: String,
    /// Streams it may read (`db.collection`); `["*"]`: all.
    pub streams: Vec<String>,
}

/// `[auth.jwt]`: how signed tokens are verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: String,
    /// HS256: the shared secret (at least 32 bytes).
    #[serde(default)]
    pub secret: Option<String>,
    /// RS256/ES256: a PEM public key.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// RS256/ES256: a JWKS file (`{"keys": [...]}`); the token's `kid` picks the key.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_leeway() -> u64 {
    30
}

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The only client id it may act as; `None`: any.
    pub client: Option<String>,
    /// The streams it may read; `None`: all.
    pub streams: Option<Vec<String>>,
    /// May use `/v1/admin/...`.
    pub admin: bool,
}

impl Principal {
    /// Full access (open API, `sync.tokens`, admin tokens).
    pub fn full() -> Self {
        Self {
            client: None,
            streams: None,
            admin: true,
        }
    }

    /// A label for logs and notices.
    pub fn label(&self) -> String {
        match (&self.client, self.admin) {
            (Some(c), _) => format!("client:{c}"),
            (None, true) => "admin".into(),
            (None, false) => "any".into(),
        }
    }

    /// 403 unless it may act as client `id`.
    pub fn check_client(&self, id: &str) -> Result<(), ApiError> {
        match &self.client {
            Some(c) if c != id => Err(ApiError::Forbidden(format!(
                "this token acts as client {c:?}, not {id:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether it may read `stream`.
    pub fn can_read(&self, stream: &str) -> bool {
        match &self.streams {
            None => true,
            Some(list) => list.iter().any(|s| s == "*" || s == stream),
        }
    }

    /// 403 unless it may read `stream`.
    pub fn check_stream(&self, stream: &str) -> Result<(), ApiError> {
        if self.can_read(stream) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token may not read stream {stream:?}"
            )))
        }
    }

    /// 403 unless an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "admin routes need an admin token (auth.admin_tokens)".into(),
            ))
        }
    }
}

/// The principal of the request (set by the auth middleware).
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| ApiError::Internal("request without a principal".into()))
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    streams: Option<Vec<String>>,
    #[serde(default)]
    admin: bool,
}

enum Keys {
    One(DecodingKey),
    Set(jsonwebtoken::jwk::JwkSet),
}

struct Jwt {
    keys: Keys,
    validation: Validation,
}

/// Resolves bearer tokens to principals; built once from the configuration.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<AuthInner>,
}

struct AuthInner {
    full: Vec<String>,
    clients: Vec<StaticClient>,
    jwt: Option<Jwt>,
}

/// Why a token was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// 401: no token, or a signed token that fails validation.
    Unauthenticated(String),
    /// 403: a token that is not configured.
    Unknown,
}

/// Compares without an early exit on the first differing byte.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn looks_like_jwt(t: &str) -> bool {
    t.split('.').count() == 3
}

fn read_file(key: &str, path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
}

impl Authenticator {
    /// Builds from `sync.tokens` and `[auth]`, reading key files.
    pub fn new(sync_tokens: &[String], auth: &AuthConfig) -> Result<Self, ConfigError> {
        for (i, t) in auth.admin_tokens.iter().enumerate() {
            if t.len() < 16 {
                return Err(ConfigError::invalid(
                    format!("auth.admin_tokens[{i}]"),
                    "is shorter than 16 characters; use a long random token",
                ));
            }
        }
        for (i, c) in auth.clients.iter().enumerate() {
            if c.token.len() < 16 {
                return Err(ConfigError::invalid(
                    format!("auth.clients[{i}].token"),
                    "is shorter than 16 characters; use a long random token",
                ));
            }
            if c.client_id.is_empty() || c.client_id.len() > 200 {
                return Err(ConfigError::invalid(
                    format!("auth.clients[{i}].client_id"),
                    "must be 1–200 characters",
                ));
            }
        }
        let jwt = auth.jwt.as_ref().map(Self::jwt).transpose()?;
        let mut full = sync_tokens.to_vec();
        full.extend(auth.admin_tokens.iter().cloned());
        Ok(Self {
            inner: Arc::new(AuthInner {
                full,
                clients: auth.clients.clone(),
                jwt,
            }),
        })
    }

    fn jwt(c: &JwtConfig) -> Result<Jwt, ConfigError> {
        let alg = match c.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(ConfigError::invalid(
                    "auth.jwt.algorithm",
                    format!("is {other:?}; allowed: HS256, RS256, ES256"),
                ))
            }
        };
        let keys = match (alg, &c.secret, &c.public_key_file, &c.jwks_file) {
            (Algorithm::HS256, Some(s), None, None) => {
                if s.len() < 32 {
                    return Err(ConfigError::invalid(
                        "auth.jwt.secret",
                        "is shorter than 32 bytes",
                    ));
                }
                Keys::One(DecodingKey::from_secret(s.as_bytes()))
            }
            (Algorithm::HS256, _, _, _) => {
                return Err(ConfigError::invalid(
                    "auth.jwt",
                    "HS256 needs `secret` and no key file",
                ))
            }
            (_, None, Some(p), None) => {
                let pem = read_file("auth.jwt.public_key_file", p)?;
                let key = if alg == Algorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ec_pem(&pem)
                };
                Keys::One(key.map_err(|e| {
                    ConfigError::invalid(
                        "auth.jwt.public_key_file",
                        format!("is not a {} PEM public key: {e}", c.algorithm),
                    )
                })?)
            }
            (_, None, None, Some(p)) => {
                let text = read_file("auth.jwt.jwks_file", p)?;
                let set: jsonwebtoken::jwk::JwkSet =
                    serde_json::from_slice(&text).map_err(|e| {
                        ConfigError::invalid("auth.jwt.jwks_file", format!("is not a JWKS: {e}"))
                    })?;
                if set.keys.is_empty() {
                    return Err(ConfigError::invalid("auth.jwt.jwks_file", "has no keys"));
                }
                Keys::Set(set)
            }
            _ => return Err(ConfigError::invalid(
                "auth.jwt",
                "RS256/ES256 need exactly one of `public_key_file` or `jwks_file`, and no `secret`",
            )),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = c.leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &c.issuer {
            validation.set_issuer(&[iss]);
        }
        match &c.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Jwt { keys, validation })
    }

    /// No credentials: the API is open.
    pub fn empty() -> Self {
        Self {
            inner: Arc::new(AuthInner {
                full: Vec::new(),
                clients: Vec::new(),
                jwt: None,
            }),
        }
    }

    /// True when no credential is configured (the API is open).
    pub fn is_open(&self) -> bool {
        self.inner.full.is_empty() && self.inner.clients.is_empty() && self.inner.jwt.is_none()
    }

    /// Resolves a bearer token (`None`: no `Authorization` header).
    pub fn resolve(&self, token: Option<&str>) -> Result<Principal, Rejection> {
        if self.is_open() {
            return Ok(Principal::full());
        }
        let Some(token) = token else {
            return Err(Rejection::Unauthenticated("missing bearer token".into()));
        };
        if self
            .inner
            .full
            .iter()
            .any(|t| same_token(t.as_bytes(), token.as_bytes()))
        {
            return Ok(Principal::full());
        }
        if let Some(c) = self
            .inner
            .clients
            .iter()
            .find(|c| same_token(c.token.as_bytes(), token.as_bytes()))
        {
            return Ok(Principal {
                client: Some(c.client_id.clone()),
                streams: Some(c.streams.clone()),
                admin: false,
            });
        }
        match &self.inner.jwt {
            Some(jwt) if looks_like_jwt(token) => Self::verify(jwt, token),
            _ => Err(Rejection::Unknown),
        }
    }

    fn verify(jwt: &Jwt, token: &str) -> Result<Principal, Rejection> {
        let bad = |e: jsonwebtoken::errors::Error| {
            Rejection::Unauthenticated(format!("invalid token: {e}"))
        };
        let key = match &jwt.keys {
            Keys::One(k) => k.clone(),
            Keys::Set(set) => {
                let header = jsonwebtoken::decode_header(token).map_err(bad)?;
                let jwk = match &header.kid {
                    Some(kid) => set.find(kid),
                    None if set.keys.len() == 1 => set.keys.first(),
                    None => None,
                }
                .ok_or_else(|| {
                    Rejection::Unauthenticated("invalid token: no JWKS key for its kid".into())
                })?;
                DecodingKey::from_jwk(jwk).map_err(bad)?
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &jwt.validation).map_err(bad)?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 200 {
            return Err(Rejection::Unauthenticated(
                "invalid token: `sub` must be a client id of 1–200 characters".into(),
            ));
        }
        Ok(Principal {
            client: if c.admin { None } else { Some(c.sub) },
            streams: if c.admin {
                None
            } else {
                Some(c.streams.unwrap_or_default())
            },
            admin: c.admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef-secret";

    fn auth() -> Authenticator {
        Authenticator::new(
            &["legacy-token-0123456789".into()],
            &AuthConfig {
                admin_tokens: vec!["admin-token-0123456789".into()],
                clients: vec![StaticClient {
                    token: "client-a-token-0123456789".into(),
                    client_id: "a".into(),
                    streams: vec!["app.players".into()],
                }],
                jwt: Some(JwtConfig {
                    algorithm: "HS256".into(),
                    secret: Some(SECRET.into()),
                    public_key_file: None,
                    jwks_file: None,
                    issuer: None,
                    audience: None,
                    leeway_secs: 0,
                }),
            },
        )
        .expect("valid")
    }

    fn jwt(secret: &str, exp_offset: i64, admin: bool) -> String {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = serde_json::json!({
            "sub": "b", "streams": ["app.players"], "admin": admin, "exp": now + exp_offset
        });
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encodes")
    }

    #[test]
    fn tokens_resolve_to_principals() {
        let a = auth();
        assert_eq!(
            a.resolve(Some("legacy-token-0123456789")),
            Ok(Principal::full())
        );
        assert_eq!(
            a.resolve(Some("admin-token-0123456789")),
            Ok(Principal::full())
        );
        let c = a
            .resolve(Some("client-a-token-0123456789"))
            .expect("client");
        assert_eq!(c.client.as_deref(), Some("a"));
        assert!(c.can_read("app.players") && !c.can_read("app.other"));
        assert!(c.check_client("b").is_err() && c.check_client("a").is_ok());
        assert!(c.require_admin().is_err());
        assert_eq!(
            a.resolve(Some("nope-0123456789012345")),
            Err(Rejection::Unknown)
        );
        assert!(matches!(
            a.resolve(None),
            Err(Rejection::Unauthenticated(_))
        ));
    }

    #[test]
    fn jwts_are_verified() {
        let a = auth();
        let ok = a
            .resolve(Some(&jwt(SECRET, 600, false)))
            .expect("valid jwt");
        assert_eq!(ok.client.as_deref(), Some("b"));
        assert!(ok.can_read("app.players"));
        let admin = a.resolve(Some(&jwt(SECRET, 600, true))).expect("admin jwt");
        assert!(admin.admin);
        assert!(matches!(
            a.resolve(Some(&jwt(SECRET, -600, false))),
            Err(Rejection::Unauthenticated(_))
        ));
        let other = "another-secret-0123456789abcdefghijklmnop";
        assert!(matches!(
            a.resolve(Some(&jwt(other, 600, false))),
            Err(Rejection::Unauthenticated(_))
        ));
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");

    fn keyed(algorithm: &str, key_file: Option<&str>, jwks: bool) -> Authenticator {
        Authenticator::new(
            &[],
            &AuthConfig {
                jwt: Some(JwtConfig {
                    algorithm: algorithm.into(),
                    secret: None,
                    public_key_file: key_file.map(|f| format!("{FIXTURES}/{f}").into()),
                    jwks_file: jwks.then(|| format!("{FIXTURES}/jwks.json").into()),
                    issuer: Some("https://auth.example.com/".into()),
                    audience: Some("eventsync".into()),
                    leeway_secs: 0,
                }),
                ..AuthConfig::default()
            },
        )
        .expect("valid")
    }

    fn signed(alg: Algorithm, private: &str, kid: Option<&str>, iss: &str) -> String {
        let pem = std::fs::read(format!("{FIXTURES}/{private}")).expect("fixture key");
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .expect("private key");
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = serde_json::json!({
            "sub": "c", "streams": ["*"], "exp": now + 600, "iss": iss, "aud": "eventsync"
        });
        encode(&header, &claims, &key).expect("encodes")
    }

    #[test]
    fn rs256_and_es256_with_key_files_and_jwks() {
        let iss = "https://auth.example.com/";
        let es = keyed("ES256", Some("es256-public.pem"), false);
        let ok = es
            .resolve(Some(&signed(
                Algorithm::ES256,
                "es256-private.pem",
                None,
                iss,
            )))
            .expect("ES256 with a PEM key");
        assert_eq!(ok.client.as_deref(), Some("c"));
        assert!(ok.can_read("any.stream"));
        // Wrong issuer, or signed by another key: 401.
        let wrong_iss = signed(Algorithm::ES256, "es256-private.pem", None, "https://evil/");
        assert!(matches!(
            es.resolve(Some(&wrong_iss)),
            Err(Rejection::Unauthenticated(_))
        ));
        let rs = keyed("RS256", Some("rs256-public.pem"), false);
        assert!(rs
            .resolve(Some(&signed(
                Algorithm::RS256,
                "rs256-private.pem",
                None,
                iss
            )))
            .is_ok());
        assert!(matches!(
            rs.resolve(Some(&signed(
                Algorithm::ES256,
                "es256-private.pem",
                None,
                iss
            ))),
            Err(Rejection::Unauthenticated(_))
        ));
        // JWKS: the kid picks the key.
        let set = keyed("RS256", None, true);
        assert!(set
            .resolve(Some(&signed(
                Algorithm::RS256,
                "rs256-private.pem",
                Some("rsa-1"),
                iss
            )))
            .is_ok());
        assert!(matches!(
            set.resolve(Some(&signed(
                Algorithm::RS256,
                "rs256-private.pem",
                Some("nope"),
                iss
            ))),
            Err(Rejection::Unauthenticated(_))
        ));
        let ec_set = keyed("ES256", None, true);
        assert!(ec_set
            .resolve(Some(&signed(
                Algorithm::ES256,
                "es256-private.pem",
                Some("ec-1"),
                iss
            )))
            .is_ok());
    }

    #[test]
    fn bad_key_configuration_is_refused() {
        let bad = |c: JwtConfig| {
            Authenticator::new(
                &[],
                &AuthConfig {
                    jwt: Some(c),
                    ..AuthConfig::default()
                },
            )
            .is_err()
        };
        let base = JwtConfig {
            algorithm: "HS256".into(),
            secret: Some("short".into()),
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 0,
        };
        assert!(bad(base.clone()), "short HS256 secret");
        assert!(bad(JwtConfig {
            algorithm: "none".into(),
            ..base.clone()
        }));
        assert!(bad(JwtConfig {
            algorithm: "ES256".into(),
            secret: None,
            public_key_file: Some("/nonexistent.pem".into()),
            ..base.clone()
        }));
        assert!(bad(JwtConfig {
            algorithm: "RS256".into(),
            secret: None,
            public_key_file: Some(format!("{FIXTURES}/es256-public.pem").into()),
            ..base
        }));
    }

    #[test]
    fn open_when_nothing_is_configured() {
        let a = Authenticator::new(&[], &AuthConfig::default()).expect("valid");
        assert!(a.is_open());
        assert_eq!(a.resolve(None), Ok(Principal::full()));
    }
}
