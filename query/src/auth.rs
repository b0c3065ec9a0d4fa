//! Bearer tokens (`query.auth.tokens_file`): when set, the API, its
//! OpenAPI document and the dashboard answer only a request carrying
//! `Authorization: Bearer <token>` with a token from the file; the probes
//! and /metrics stay open for the platform. The file is re-read when it
//! changes, so tokens rotate without a restart.
//!
//! Only SHA-256 digests are kept and compared: a presented token is hashed
//! first, so the comparison takes the same time whatever the token's
//! length or where it differs, and the file may hold digests instead of
//! the tokens themselves.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::App;

/// How a line of the tokens file names a digest rather than a token.
const DIGEST_PREFIX: &str = "sha256:";

/// How often the tokens file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

type Sha = [u8; 32];

/// The accepted tokens, as read from the file last.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    digests: RwLock<Arc<Vec<Sha>>>,
    /// The file's modification time and length when last read.
    seen: RwLock<Option<(SystemTime, u64)>>,
}

/// The tokens file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("query.auth.tokens_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("query.auth.tokens_file {path}, line {line}: {DIGEST_PREFIX} must be followed by 64 hex digits (a SHA-256)")]
    BadDigest { path: String, line: usize },
    #[error("query.auth.tokens_file {path} holds no token: every request would be refused (one token per line, or {DIGEST_PREFIX} and its SHA-256 in hex; # starts a comment)")]
    Empty { path: String },
}

impl Tokens {
    /// Reads the file now: a missing, unreadable, malformed or empty file
    /// stops the service at start.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let tokens = Self {
            path: path.to_owned(),
            digests: RwLock::new(Arc::new(Vec::new())),
            seen: RwLock::new(None),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Re-reads the file if it changed since the last read. On an error the
    /// tokens read before stay in force.
    pub fn reload(&self) -> Result<bool, TokensError> {
        let display = self.path.display().to_string();
        let read_error = |source| TokensError::Read {
            path: display.clone(),
            source,
        };
        let meta = std::fs::metadata(&self.path).map_err(read_error)?;
        let stamp = (meta.modified().map_err(read_error)?, meta.len());
        if *self.seen.read().expect("tokens lock") == Some(stamp) {
            return Ok(false);
        }
        // Taken as seen even if it fails below: one error per change.
        *self.seen.write().expect("tokens lock") = Some(stamp);
        let text = std::fs::read_to_string(&self.path).map_err(read_error)?;
        let digests = parse(&text, &display)?;
        *self.digests.write().expect("tokens lock") = Arc::new(digests);
        Ok(true)
    }

    /// Whether `token` is one of the accepted ones. Every digest is
    /// compared, in constant time each.
    pub fn accepts(&self, token: &str) -> bool {
        let presented: Sha = Sha256::digest(token.as_bytes()).into();
        let digests = self.digests.read().expect("tokens lock").clone();
        digests
            .iter()
            .fold(subtle::Choice::from(0), |found, digest| {
                found | digest.ct_eq(&presented)
            })
            .into()
    }

    /// Re-reads the file whenever it changes, until the process ends.
    pub fn watch(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                match self.reload() {
                    Ok(true) => {
                        let count = self.digests.read().expect("tokens lock").len();
                        tracing::info!(path = %self.path.display(), tokens = count, "Tokens file changed: reloaded.");
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::error!(%error, "Tokens file not reloaded; the tokens read before stay in force.")
                    }
                }
            }
        });
    }
}

/// The digests a tokens file names.
fn parse(text: &str, path: &str) -> Result<Vec<Sha>, TokensError> {
    let mut digests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let digest = match line.strip_prefix(DIGEST_PREFIX) {
            Some(hex) => from_hex(hex.trim()).ok_or(TokensError::BadDigest {
                path: path.to_owned(),
                line: n + 1,
            })?,
            None => Sha256::digest(line.as_bytes()).into(),
        };
        digests.push(digest);
    }
    if digests.is_empty() {
        return Err(TokensError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(digests)
}

fn from_hex(hex: &str) -> Option<Sha> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Lets a request through when no tokens are configured or it carries an
/// accepted one; else 401 with `WWW-Authenticate: Bearer`. The dashboard's
/// 401 is its page all the same: it holds no data, and asks for the token
/// (kept in the browser's session) to load the read models with.
pub async fn require_token(State(app): State<App>, request: Request, next: Next) -> Response {
    match refusal(&app, &request) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

/// The 401 for `request`, or `None` when it may go on.
pub fn refusal(app: &App, request: &Request) -> Option<Response> {
    let tokens = app.tokens.as_ref()?;
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let refusal = match presented {
        Some(token) if tokens.accepts(token) => return None,
        Some(_) => (
            "invalid_token",
            "the bearer token is not one of query.auth.tokens_file's",
        ),
        None => (
            "missing_token",
            "this endpoint needs Authorization: Bearer <token>",
        ),
    };
    let mut response = if request.uri().path() == "/" {
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            crate::http::dashboard_page(&app.settings),
        )
            .into_response()
    } else {
        crate::error::ApiError::unauthorized(refusal.1).into_response()
    };
    let challenge = format!("Bearer realm=\"shopstream\", error=\"{}\"", refusal.0);
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cret-token";

    #[test]
    fn tokens_and_digests_are_accepted_and_nothing_else() {
        let digest = hex_of(&Sha256::digest(b"other-token").into());
        let text = format!("# ops team\n\n  {SECRET}  \n{DIGEST_PREFIX}{digest}\n");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).expect("write");
        let tokens = Tokens::load(&path).expect("loads");
        assert!(tokens.accepts(SECRET));
        assert!(tokens.accepts("other-token"));
        for refused in ["", "s3cret", "s3cret-token ", "# ops team", &digest] {
            assert!(!tokens.accepts(refused), "{refused:?}");
        }
    }

    #[test]
    fn a_bad_digest_or_an_empty_file_is_refused_by_name() {
        let error = parse("ok\nsha256:abc\n", "t").expect_err("bad digest");
        assert_eq!(
            error.to_string(),
            "query.auth.tokens_file t, line 2: sha256: must be followed by 64 hex digits (a SHA-256)"
        );
        let error = parse("# nothing\n\n", "t").expect_err("empty");
        assert!(error.to_string().contains("holds no token"), "{error}");
    }

    fn hex_of(sha: &Sha) -> String {
        sha.iter().map(|b| format!("{b:02x}")).collect()
    }
}
