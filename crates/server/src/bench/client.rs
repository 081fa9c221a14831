//! One benchmark request: sends it, times every streamed token, and reads the usage counts.

use futures_util::StreamExt;
use std::time::Instant;

/// What one request measured. Times are in seconds from the moment it was sent.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub error: Option<String>,
    pub ttft: Option<f64>,
    /// Gaps between consecutive streamed chunks that carried text.
    pub inter_token: Vec<f64>,
    pub latency: f64,
    pub prompt_tokens: usize,
    /// Prompt tokens the server reported as served from its prefix cache.
    pub cached_tokens: usize,
    pub output_tokens: usize,
}

impl Sample {
    pub fn failed(error: String) -> Self {
        Sample { error: Some(error), ..Sample::default() }
    }
}

/// The first model `GET /v1/models` lists.
pub async fn first_model(http: &reqwest::Client, base: &str, key: Option<&str>) -> anyhow::Result<String> {
    let response = authorize(http.get(format!("{base}/v1/models")), key)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {base}/v1/models: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.map_err(|e| anyhow::anyhow!("GET /v1/models: {e}"))?;
    body["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("GET /v1/models answered {status} without a model; pass --model"))
}

fn authorize(request: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
}

/// Sends one chat completion and measures it; never fails, errors are recorded in the sample.
pub async fn send(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: serde_json::Value,
    stream: bool,
) -> Sample {
    let sent = Instant::now();
    let mut sample = match exchange(http, url, key, body, stream, sent).await {
        Ok(sample) => sample,
        Err(e) => Sample::failed(e),
    };
    sample.latency = sent.elapsed().as_secs_f64();
    sample
}

async fn exchange(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: serde_json::Value,
    stream: bool,
    sent: Instant,
) -> Result<Sample, String> {
    let response = authorize(http.post(url), key).json(&body).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
    }
    if !stream {
        let value: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        let mut sample = Sample::default();
        read_usage(&value, &mut sample);
        return Ok(sample);
    }
    let mut sample = Sample::default();
    let mut text_chunks = 0;
    let mut last_token: Option<f64> = None;
    let mut pending = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(piece) = bytes.next().await {
        let piece = piece.map_err(|e| e.to_string())?;
        pending.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value =
                serde_json::from_str(data).map_err(|e| format!("bad stream chunk ({e}): {data}"))?;
            if let Some(error) = chunk.get("error") {
                return Err(format!("error in stream: {error}"));
            }
            read_usage(&chunk, &mut sample);
            if carries_token(&chunk) {
                let now = sent.elapsed().as_secs_f64();
                match last_token {
                    None => sample.ttft = Some(now),
                    Some(previous) => sample.inter_token.push(now - previous),
                }
                last_token = Some(now);
                text_chunks += 1;
            }
        }
    }
    if sample.output_tokens == 0 {
        // Servers that do not send usage: one chunk per token is the usual shape.
        sample.output_tokens = text_chunks;
    }
    Ok(sample)
}

/// Whether a stream chunk delivers a token: text, or a logprobs entry (a token with empty text).
fn carries_token(chunk: &serde_json::Value) -> bool {
    chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            c["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())
                || c["logprobs"]["content"].as_array().is_some_and(|l| !l.is_empty())
        })
    })
}

fn read_usage(value: &serde_json::Value, sample: &mut Sample) {
    let usage = &value["usage"];
    if let Some(p) = usage["prompt_tokens"].as_u64() {
        sample.prompt_tokens = p as usize;
    }
    if let Some(c) = usage["prompt_tokens_details"]["cached_tokens"].as_u64() {
        sample.cached_tokens = c as usize;
    }
    if let Some(c) = usage["completion_tokens"].as_u64() {
        sample.output_tokens = c as usize;
    }
}
