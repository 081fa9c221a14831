//! Helpers shared by the end-to-end tests: the real binary on port 0 with the tiny fixture.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Starts the server and returns once it has printed that it is ready (no sleeping).
pub fn start(extra: &[&str]) -> Server {
    start_with_env(extra, &[])
}

pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["serve", "--model"])
        .arg(fixtures().join("tiny-v5"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(if extra.contains(&"--kv-cache-memory") { &[][..] } else { &["--kv-cache-memory", "64MiB"][..] })
        .args(extra)
        .env("WEFT_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start weft");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut base = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            base = Some(rest.split_whitespace().next().unwrap().to_string());
        }
        if line.contains("weft: ready") {
            break;
        }
        assert!(!line.starts_with("error"), "{line}");
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base: base.expect("the server printed its address") }
}

pub fn data_uri(name: &str) -> String {
    let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
    let mime = if name.ends_with(".gif") { "image/gif" } else { "image/png" };
    format!("data:{mime};base64,{}", base64_encode(&bytes))
}

/// A tiny base64 encoder, to keep the test free of extra crates.
pub fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client().post(format!("{}{path}", s.base)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub fn image_chat(max_tokens: u64) -> Value {
    json!({
        "model": "tiny-v5",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri("square.png")}},
            {"type": "text", "text": "What is in this image?"}
        ]}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true
    })
}

pub fn reference_case(name: &str) -> Value {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-v5/reference.json")).unwrap()).unwrap();
    r["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}
