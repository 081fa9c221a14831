//! Models by Hub name: `--model` as a repository id resolves to a snapshot folder of the shared
//! Hugging Face cache, downloading only the files the model reads (resuming cut downloads).
//!
//! The environment means what it means to transformers and vLLM: `HF_ENDPOINT`, `HF_HUB_CACHE`
//! (else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), `HF_TOKEN` (else the token file that
//! `huggingface-cli login` writes) and `HF_HUB_OFFLINE=1` (the cache only, no network).

use crate::progress::DownloadProgress;
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::tokio::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where `--model` points.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// A folder that exists is a checkpoint folder; anything else shaped like `org/name` is a
    /// Hub repository id.
    pub fn parse(model: &Path, revision: Option<&str>) -> Result<ModelSource> {
        if model.is_dir() {
            if !model.join("config.json").exists() {
                bail!("--model {}: no config.json there", model.display());
            }
            if revision.is_some() {
                bail!("--revision applies to Hub repository ids, and --model {} is a folder", model.display());
            }
            return Ok(ModelSource::Dir(model.to_path_buf()));
        }
        let id = model.to_str().filter(|id| is_repo_id(id)).ok_or_else(|| {
            anyhow!(
                "--model {}: not a folder, nor a Hub repository id such as llava-hf/llava-interleave-qwen-0.5b-hf",
                model.display()
            )
        })?;
        Ok(ModelSource::Hub { repo: id.to_string(), revision: revision.unwrap_or("main").to_string() })
    }

    /// What clients call the model unless `--served-model-name` says: the repository id, or the
    /// folder's name.
    pub fn default_name(&self) -> String {
        match self {
            ModelSource::Hub { repo, .. } => repo.clone(),
            ModelSource::Dir(dir) => {
                let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "weft".into())
            }
        }
    }
}

/// `name` or `org/name`, in the Hub's alphabet.
fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The Hub settings the environment gives.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
}

impl HubEnv {
    pub fn from_env() -> HubEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(var("HOME").unwrap_or_else(|| "/".into())).join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let saved = std::fs::read_to_string(home.join("token")).ok()?;
            Some(saved.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        HubEnv { endpoint: endpoint.trim_end_matches('/').to_string(), cache_dir, token, offline }
    }
}

/// The checkpoint folder for `source`: the folder itself, or the cached snapshot of the Hub
/// repository after fetching what it lacks.
pub async fn resolve(source: &ModelSource, env: &HubEnv) -> Result<PathBuf> {
    let (repo, revision) = match source {
        ModelSource::Dir(dir) => return Ok(dir.clone()),
        ModelSource::Hub { repo, revision } => (repo.as_str(), revision.as_str()),
    };
    let cached = cached_snapshot(&env.cache_dir, repo, revision);
    if env.offline {
        return cached.ok_or_else(|| {
            anyhow!(
                "{repo}: not in the Hugging Face cache at {} (revision {revision}), and HF_HUB_OFFLINE forbids \
                 downloading it",
                env.cache_dir.display()
            )
        });
    }
    let listing = match list_files(env, repo, revision).await {
        Ok(listing) => listing,
        // The Hub cannot be reached: a model already in the cache still starts, as in transformers.
        Err(Listing::Unreachable(why)) if cached.is_some() => {
            let dir = cached.expect("checked");
            eprintln!(
                "weft: warning: {repo}: the Hub cannot be reached ({why}); using the cached snapshot {}",
                dir.display()
            );
            return Ok(dir);
        }
        Err(failure) => return Err(failure.into_error(repo, revision, env)),
    };
    download(env, repo, revision, &listing).await
}

/// A repository's commit and file names at a revision.
struct RepoListing {
    commit: String,
    files: Vec<String>,
    /// Bytes of each file, where the Hub says (it does when asked for blobs).
    sizes: HashMap<String, u64>,
}

/// The Hub's answer to a revision listing with `blobs=true`.
#[derive(serde::Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
}

enum Listing {
    Unreachable(String),
    Refused(u16),
    Other(String),
}

impl Listing {
    fn into_error(self, repo: &str, revision: &str, env: &HubEnv) -> anyhow::Error {
        match self {
            Listing::Unreachable(why) => anyhow!("{repo}: cannot reach the Hub at {} ({why})", env.endpoint),
            Listing::Refused(404) => anyhow!(
                "{repo}: no such repository or revision `{revision}` on {} (a private or gated one needs HF_TOKEN), \
                 and no folder of that name here",
                env.endpoint
            ),
            Listing::Refused(status @ (401 | 403)) => anyhow!(
                "{repo}: the Hub refused access (HTTP {status}): {}",
                if env.token.is_some() { "HF_TOKEN is not valid for it" } else { "set HF_TOKEN" }
            ),
            Listing::Refused(status) => anyhow!("{repo}: the Hub answered HTTP {status} listing revision `{revision}`"),
            Listing::Other(why) => anyhow!("{repo}: listing revision `{revision}` failed: {why}"),
        }
    }
}

fn api(env: &HubEnv, chunk_size: usize) -> Result<hf_hub::api::tokio::Api> {
    ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(false)
        .with_max_files(PARALLEL_CHUNKS)
        .with_chunk_size(Some(chunk_size))
        .with_user_agent("weft", env!("CARGO_PKG_VERSION"))
        .build()
        .context("cannot set up the Hub client")
}

/// Parts of one file fetched at once (ranges of `chunk_size`, kept on disk in order so that a
/// cut download resumes after the last complete one).
const PARALLEL_CHUNKS: usize = 4;

/// Range size for a file: a few ranges per file, at least 1 MiB and at most 16 MiB.
fn chunk_size(file_size: u64) -> usize {
    (file_size / 8).clamp(1 << 20, 16 << 20) as usize
}

async fn list_files(env: &HubEnv, repo: &str, revision: &str) -> Result<RepoListing, Listing> {
    let api = api(env, 1 << 20).map_err(|e| Listing::Other(format!("{e:#}")))?;
    let handle = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    // With blobs, each file comes with its size: the range size of a download, no extra request.
    let request = handle.info_request().query(&[("blobs", "true")]);
    let response = request.send().await.map_err(|e| Listing::Unreachable(root_cause(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(Listing::Refused(status.as_u16()));
    }
    let info: RepoInfo = response.json().await.map_err(|e| Listing::Other(e.to_string()))?;
    let sizes = info.siblings.iter().filter_map(|s| Some((s.rfilename.clone(), s.size?))).collect();
    Ok(RepoListing { commit: info.sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect(), sizes })
}

/// The innermost cause of an error (reqwest's own message is only "error sending request").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The small files the model reads: configuration, tokenizer, chat template (not the weights,
/// not other frameworks' indexes).
fn wanted_small_files(files: &[String]) -> Vec<String> {
    let other_formats = [".bin.index.json", ".msgpack.index.json", ".h5.index.json", ".pt.index.json"];
    let mut wanted: Vec<String> = files
        .iter()
        .filter(|f| !f.contains('/') && (f.ends_with(".json") || f.ends_with(".jinja")))
        .filter(|f| !other_formats.iter().any(|ext| f.ends_with(ext)))
        .cloned()
        .collect();
    wanted.sort();
    wanted
}

async fn download(env: &HubEnv, repo: &str, revision: &str, listing: &RepoListing) -> Result<PathBuf> {
    let snapshot = env.cache_dir.join(folder_name(repo)).join("snapshots").join(&listing.commit);
    if !listing.files.iter().any(|f| f == "config.json") {
        bail!("{repo}: config.json: not in the repository at revision `{revision}`; is it a llava checkpoint?");
    }
    for file in wanted_small_files(&listing.files) {
        fetch(env, repo, revision, &snapshot, &file, None).await?;
    }
    let index = "model.safetensors.index.json";
    let weights = if snapshot.join(index).exists() {
        let text = std::fs::read_to_string(snapshot.join(index)).with_context(|| format!("{repo}: {index}"))?;
        shards(&text).with_context(|| format!("{repo}: {index} is not a safetensors index"))?
    } else if listing.files.iter().any(|f| f == "model.safetensors") {
        vec!["model.safetensors".to_string()]
    } else {
        bail!("{repo}: model.safetensors: not in the repository at revision `{revision}` (Weft reads safetensors weights only)");
    };
    for file in &weights {
        if !listing.files.contains(file) {
            bail!("{repo}: {file}: named by the weight index but not in the repository at revision `{revision}`");
        }
        fetch(env, repo, revision, &snapshot, file, Some(listing.sizes.get(file).copied().unwrap_or(0))).await?;
    }
    // The branch or tag now names this commit, also when every file was cached already, so
    // that an offline start finds it.
    if revision != listing.commit {
        let refs = env.cache_dir.join(folder_name(repo)).join("refs");
        let written = std::fs::create_dir_all(refs.join(revision).parent().unwrap_or(&refs))
            .and_then(|()| std::fs::write(refs.join(revision), &listing.commit));
        written.with_context(|| format!("{repo}: cannot record revision `{revision}` in {}", refs.display()))?;
    }
    Ok(snapshot)
}

/// The shard files of a safetensors index, in order.
fn shards(index_json: &str) -> Result<Vec<String>> {
    let index: serde_json::Value = serde_json::from_str(index_json)?;
    let map = index.get("weight_map").and_then(|m| m.as_object()).context("no weight_map")?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
        bail!("a shard name leaves the repository");
    }
    Ok(files)
}

/// Downloads `file` into the snapshot unless it is there. A weights file (`weights`: its size
/// in bytes) is fetched in ranges sized to it, and a cut transfer is retried twice (each retry
/// resumes where the last complete range ended).
async fn fetch(
    env: &HubEnv,
    repo: &str,
    revision: &str,
    snapshot: &Path,
    file: &str,
    weights: Option<u64>,
) -> Result<()> {
    if snapshot.join(file).exists() {
        return Ok(());
    }
    let retries = if weights.is_some() { 2 } else { 0 };
    let api = api(env, chunk_size(weights.unwrap_or(0)))?;
    let handle = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    for attempt in 0..=retries {
        match handle.download_with_progress(file, DownloadProgress::new(file)).await {
            Ok(_) => return Ok(()),
            Err(error) => {
                let status = http_status(&error);
                let message = match status {
                    Some(404) => format!("{repo}: {file}: not found at revision `{revision}`"),
                    Some(code @ (401 | 403)) => format!("{repo}: {file}: the Hub refused access (HTTP {code})"),
                    Some(code) => format!("{repo}: {file}: HTTP {code}"),
                    None => format!("{repo}: {file}: download failed: {}", root_cause(&error)),
                };
                let transient = status.is_none_or(|code| code >= 500);
                if !transient || attempt == retries {
                    bail!("{message}");
                }
                eprintln!("weft: warning: {message}; resuming");
            }
        }
    }
    unreachable!("the loop returns")
}

fn http_status(error: &ApiError) -> Option<u16> {
    match error {
        ApiError::RequestError(e) => e.status().map(|s| s.as_u16()),
        ApiError::TooManyRetries(inner) => http_status(inner),
        _ => None,
    }
}

/// The cache folder of a model repository: `models--org--name`.
fn folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The cached snapshot of `revision` (a branch or tag the cache has a ref for, or a commit),
/// if its configuration and weights are all there.
fn cached_snapshot(cache_dir: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let root = cache_dir.join(folder_name(repo));
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(commit) => commit.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = root.join("snapshots").join(commit);
    let complete = |dir: &Path| -> Option<()> {
        dir.join("config.json").exists().then_some(())?;
        let index = dir.join("model.safetensors.index.json");
        let weights = match std::fs::read_to_string(&index) {
            Ok(text) => shards(&text).ok()?,
            Err(_) => vec!["model.safetensors".to_string()],
        };
        weights.iter().all(|f| dir.join(f).exists()).then_some(())
    };
    complete(&snapshot).map(|()| snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_a_folder_and_an_id_is_an_id() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-v5");
        assert_eq!(ModelSource::parse(&fixture, None).unwrap(), ModelSource::Dir(fixture.clone()));
        assert!(ModelSource::parse(&fixture, Some("main")).is_err(), "--revision with a folder");
        let hub = ModelSource::parse(Path::new("llava-hf/llava-interleave-qwen-0.5b-hf"), Some("v1")).unwrap();
        assert_eq!(
            hub,
            ModelSource::Hub { repo: "llava-hf/llava-interleave-qwen-0.5b-hf".into(), revision: "v1".into() }
        );
        assert_eq!(hub.default_name(), "llava-hf/llava-interleave-qwen-0.5b-hf");
        for bad in ["/no/such/folder", "a/b/c", "../x", "org/..", "org/", "org/na me"] {
            assert!(ModelSource::parse(Path::new(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_files_the_model_reads_are_wanted() {
        let files: Vec<String> = [
            "config.json",
            "tokenizer.json",
            "chat_template.jinja",
            "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin",
            "flax_model.msgpack",
            "onnx/config.json",
            "model.safetensors.index.json",
            "README.md",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            wanted_small_files(&files),
            ["chat_template.jinja", "config.json", "model.safetensors.index.json", "tokenizer.json"]
        );
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
        assert_eq!(shards(index).unwrap(), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        assert!(shards(r#"{"weight_map": {"a": "../../etc/passwd"}}"#).is_err());
    }

    #[test]
    fn range_sizes_stay_between_one_and_sixteen_mib() {
        assert_eq!(chunk_size(0), 1 << 20);
        assert_eq!(chunk_size(40 << 20), 5 << 20);
        assert_eq!(chunk_size(15 << 30), 16 << 20);
    }
}
