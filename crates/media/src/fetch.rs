//! Media references -> bytes: `data:` URIs, `http(s)://` (timeouts, byte cap while streaming,
//! at most a few redirects each re-checked, DNS resolved once and the connection pinned to the
//! checked addresses, private addresses refused unless allowed, optional domain allow-list),
//! and `file://` under an allow-listed directory.

use crate::addr::non_public_reason;
use crate::budget::{ByteBudget, OverBudget};
use crate::data_uri::{self, DataUriError};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What fetching may do; one per server.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Allow loopback, private, link-local and other non-public addresses.
    pub allow_private: bool,
    /// When non-empty, only these hosts (and their subdomains) may be fetched.
    pub allowed_domains: Vec<String>,
    /// `file://` URLs are served only from under this directory; `None` refuses them.
    pub allowed_local_path: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub max_redirects: usize,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            allow_private: false,
            allowed_domains: Vec::new(),
            allowed_local_path: None,
            connect_timeout: Duration::from_secs(5),
            max_redirects: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Data,
    Http,
    File,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Data => "data",
            SourceKind::Http => "http",
            SourceKind::File => "file",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    /// The media type the source declared (checked against the bytes later, never trusted).
    pub declared_type: Option<String>,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("unsupported URL scheme (use data:, http://, https:// or an allowed file:// path)")]
    Scheme,
    #[error("invalid URL: {0}")]
    BadUrl(String),
    #[error(transparent)]
    DataUri(#[from] DataUriError),
    #[error("refusing to fetch from {host}: it resolves to {addr}, a {reason} address")]
    Blocked { host: String, addr: IpAddr, reason: &'static str },
    #[error("the host {0} is not in the allowed media domains")]
    DomainNotAllowed(String),
    #[error("the media is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    #[error("fetching the media took longer than {0:?}")]
    Timeout(Duration),
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("the media server answered HTTP {0}")]
    Status(u16),
    #[error("cannot fetch the media: {0}")]
    Network(String),
    #[error("cannot resolve {0}")]
    Dns(String),
    #[error("local files are not allowed (start the server with --allowed-local-media-path)")]
    LocalNotAllowed,
    #[error("the file is outside the allowed local media directory")]
    LocalOutside,
    #[error("cannot read the file: {0}")]
    LocalRead(String),
}

/// Fetches `url` within `timeout`, reading at most `max_bytes`, every byte charged to `budget`
/// as it arrives.
pub async fn fetch(
    url: &str,
    policy: &FetchPolicy,
    max_bytes: usize,
    timeout: Duration,
    budget: &ByteBudget,
) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, fetch_inner(url, policy, max_bytes, budget)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(timeout)),
    };
    if let Ok(f) = &result {
        let kind = f.kind.as_str();
        metrics::histogram!("weft:media_fetch_seconds", "source" => kind).record(started.elapsed().as_secs_f64());
        metrics::counter!("weft:media_bytes_total", "source" => kind).increment(f.bytes.len() as u64);
    }
    result
}

async fn fetch_inner(
    url: &str,
    policy: &FetchPolicy,
    max_bytes: usize,
    budget: &ByteBudget,
) -> Result<Fetched, FetchError> {
    if url.starts_with("data:") {
        budget.take(data_uri::decoded_len(url))?;
        // Base64 of megabytes is CPU work: not on an async worker.
        let url = url.to_string();
        let d = tokio::task::spawn_blocking(move || data_uri::parse(&url, max_bytes))
            .await
            .map_err(|e| FetchError::Network(e.to_string()))??;
        return Ok(Fetched { bytes: d.bytes, declared_type: Some(d.media_type), kind: SourceKind::Data });
    }
    let parsed = url::Url::parse(url).map_err(|e| FetchError::BadUrl(e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => fetch_http(parsed, policy, max_bytes, budget).await,
        "file" => read_local(&parsed, policy, max_bytes, budget).await,
        _ => Err(FetchError::Scheme),
    }
}

/// Refuses hosts outside the allow-list (exact or subdomain match).
pub fn check_domain(host: &str, allowed: &[String]) -> Result<(), FetchError> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ok = allowed.is_empty()
        || allowed.iter().any(|d| {
            let d = d.trim_start_matches('.').to_ascii_lowercase();
            host == d || host.ends_with(&format!(".{d}"))
        });
    if ok {
        Ok(())
    } else {
        Err(FetchError::DomainNotAllowed(host))
    }
}

/// The resolved-address check: every address must be public unless private ones are allowed.
pub fn check_addresses(host: &str, addrs: &[SocketAddr], allow_private: bool) -> Result<(), FetchError> {
    if addrs.is_empty() {
        return Err(FetchError::Dns(host.to_string()));
    }
    if allow_private {
        return Ok(());
    }
    for a in addrs {
        if let Some(reason) = non_public_reason(a.ip()) {
            return Err(FetchError::Blocked { host: host.to_string(), addr: a.ip(), reason });
        }
    }
    Ok(())
}

async fn resolve(url: &url::Url, policy: &FetchPolicy) -> Result<(String, Vec<SocketAddr>), FetchError> {
    let host = url.host_str().ok_or_else(|| FetchError::BadUrl("no host".into()))?.to_string();
    check_domain(&host, &policy.allowed_domains)?;
    let port = url.port_or_known_default().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port)).await.map_err(|_| FetchError::Dns(host.clone()))?.collect(),
    };
    check_addresses(&host, &addrs, policy.allow_private)?;
    Ok((host, addrs))
}

async fn fetch_http(
    mut url: url::Url,
    policy: &FetchPolicy,
    max_bytes: usize,
    budget: &ByteBudget,
) -> Result<Fetched, FetchError> {
    for _ in 0..=policy.max_redirects {
        let (host, addrs) = resolve(&url, policy).await?;
        // The connection goes to the addresses just checked, never to a second DNS answer.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(policy.connect_timeout)
            .no_proxy()
            .resolve_to_addrs(host.trim_start_matches('[').trim_end_matches(']'), &addrs)
            .build()
            .map_err(|e| FetchError::Network(e.to_string()))?;
        let mut response = client.get(url.clone()).send().await.map_err(|e| FetchError::Network(e.to_string()))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or(FetchError::Status(status.as_u16()))?;
            url = url.join(location).map_err(|e| FetchError::BadUrl(e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(FetchError::Scheme);
            }
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        if response.content_length().is_some_and(|n| n as usize > max_bytes) {
            return Err(FetchError::TooLarge { limit: max_bytes });
        }
        let declared_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
        let mut bytes = Vec::new();
        // The cap holds while streaming, whatever Content-Length said (or did not say).
        while let Some(chunk) = response.chunk().await.map_err(|e| FetchError::Network(e.to_string()))? {
            if bytes.len() + chunk.len() > max_bytes {
                return Err(FetchError::TooLarge { limit: max_bytes });
            }
            budget.take(chunk.len())?;
            bytes.extend_from_slice(&chunk);
        }
        return Ok(Fetched { bytes, declared_type, kind: SourceKind::Http });
    }
    Err(FetchError::TooManyRedirects(policy.max_redirects))
}

async fn read_local(
    url: &url::Url,
    policy: &FetchPolicy,
    max_bytes: usize,
    budget: &ByteBudget,
) -> Result<Fetched, FetchError> {
    let root = policy.allowed_local_path.as_ref().ok_or(FetchError::LocalNotAllowed)?;
    let root = tokio::fs::canonicalize(root).await.map_err(|e| FetchError::LocalRead(e.to_string()))?;
    let path = url.to_file_path().map_err(|_| FetchError::BadUrl("not a local path".into()))?;
    let canonical = tokio::fs::canonicalize(&path).await.map_err(|_| FetchError::LocalRead("no such file".into()))?;
    if !canonical.starts_with(&root) {
        return Err(FetchError::LocalOutside);
    }
    let meta = tokio::fs::metadata(&canonical).await.map_err(|e| FetchError::LocalRead(e.to_string()))?;
    if !meta.is_file() {
        return Err(FetchError::LocalRead("not a regular file".into()));
    }
    if meta.len() as usize > max_bytes {
        return Err(FetchError::TooLarge { limit: max_bytes });
    }
    budget.take(meta.len() as usize)?;
    let bytes = tokio::fs::read(&canonical).await.map_err(|e| FetchError::LocalRead(e.to_string()))?;
    if bytes.len() > max_bytes {
        return Err(FetchError::TooLarge { limit: max_bytes }); // it grew after the check
    }
    Ok(Fetched { bytes, declared_type: None, kind: SourceKind::File })
}
