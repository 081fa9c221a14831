//! End-to-end: the server under faults and hostile clients. An engine fault fails only its
//! own request and the server goes on; an unrecoverable one turns the probes 503 and ends the
//! process; places are taken before any work; every stage has a timeout; text completions
//! stream through the same state machine as chat. The injected faults need a build with
//! `--features fault-injection` (as `./scripts/test` builds).

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn faulty(user: &str, stream: bool) -> Value {
    let mut r = image_chat(4);
    r["user"] = json!(user);
    r["stream"] = json!(stream);
    r
}

async fn sse_lines(s: &Server, path: &str, body: &Value) -> Vec<String> {
    let text = client().post(format!("{}{path}", s.base)).json(body).send().await.unwrap().text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

async fn status_of(s: &Server, path: &str) -> u16 {
    client().get(format!("{}{path}", s.base)).send().await.unwrap().status().as_u16()
}

#[tokio::test]
#[cfg_attr(not(feature = "fault-injection"), ignore = "injects faults: needs --features fault-injection")]
async fn an_engine_fault_fails_only_its_request_and_the_server_goes_on() {
    let s = start_with_env(&[], &[("WEFT_FAULT_INJECTION", "1")]);
    let (status, body) = post(&s, "/v1/chat/completions", faulty("weft-fault:panic", false)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "internal_error");
    // Streaming: an error event in the OpenAI shape, then [DONE] exactly once.
    let data = sse_lines(&s, "/v1/chat/completions", &faulty("weft-fault:panic", true)).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "internal_error", "{data:?}");
    // Everyone else is served, and the probes say so.
    let (status, body) = post(&s, "/v1/chat/completions", image_chat(3)).await;
    assert_eq!((status, body["usage"]["completion_tokens"].as_u64()), (200, Some(3)), "{body}");
    assert_eq!((status_of(&s, "/health").await, status_of(&s, "/ready").await), (200, 200));
    let metrics = client().get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("weft:engine_faults_total") && l.ends_with(" 2")), "{metrics}");
}

#[tokio::test]
#[cfg_attr(not(feature = "fault-injection"), ignore = "injects faults: needs --features fault-injection")]
async fn an_unrecoverable_engine_turns_unready_and_exits_nonzero() {
    let mut s = start_with_env(&[], &[("WEFT_FAULT_INJECTION", "1")]);
    let data = sse_lines(&s, "/v1/chat/completions", &faulty("weft-fault:fatal", true)).await;
    assert!(data.iter().any(|d| d.contains("\"error\"")), "{data:?}");
    // Readiness is 503 from the moment the error is out; then the process exits non-zero.
    assert_eq!(status_of(&s, "/ready").await, 503);
    assert_eq!(status_of(&s, "/health").await, 503);
    let (status, body) = post(&s, "/v1/chat/completions", image_chat(2)).await;
    assert_eq!(status, 503, "{body}");
    let exit = s.child.wait().unwrap();
    assert!(!exit.success(), "{exit:?}");
}

#[tokio::test]
async fn places_are_taken_before_any_work() {
    use futures_util::StreamExt;
    // One place in all: a streaming request holds it for as long as it streams.
    let s = start(&["--max-num-seqs", "1", "--max-waiting", "0", "--max-tokens", "7000"]);
    let mut long = image_chat(7000);
    long["stream"] = json!(true);
    let response = client().post(format!("{}/v1/chat/completions", s.base)).json(&long).send().await.unwrap();
    let mut stream = response.bytes_stream();
    assert!(stream.next().await.is_some());
    // The next request is refused before its body is read: it declares a body it never sends.
    let mut tcp = TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(tcp, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n").unwrap();
    let mut head = [0u8; 512];
    let n = tcp.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("retry-after:"), "{head}");
    drop(stream);
    // The place comes back once the server notices the stream is gone (at its next write):
    // a client retrying after its 429 gets in.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post(&s, "/v1/chat/completions", image_chat(2)).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(std::time::Instant::now() < deadline, "the place never came back");
    }
}

#[tokio::test]
async fn bodies_take_their_bytes_before_they_are_read() {
    // 1 MiB for bodies and their media in flight: a declared 400 kB body (charged 1.2 MB) can
    // never fit, and is refused before a byte of it is sent.
    let s = start(&["--max-inflight-media-bytes", "1MiB"]);
    let mut tcp = TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(tcp, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 400000\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 1024];
    let n = tcp.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 413") && head.contains("max_inflight_media_bytes"), "{head}");
    // A smaller one (a 120 kB image: charged about 0.5 MB) fits, and gives its bytes back once
    // answered.
    let (status, body) = post(&s, "/v1/chat/completions", image_chat(2)).await;
    assert_eq!(status, 200, "{body}");
    let metrics = client().get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "weft:inflight_media_bytes 0"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "weft:inflight_media_budget_bytes 1048576"), "{metrics}");
}

/// Reads until the server closes the connection; the read timeout only stops a failing test.
fn read_to_close(tcp: &mut TcpStream) -> String {
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn every_stage_has_a_timeout() {
    let s = start(&["--header-timeout", "1", "--body-timeout", "1", "--max-body", "1MiB"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    // Headers that never come: closed without an answer.
    let mut silent = TcpStream::connect(&addr).unwrap();
    assert_eq!(read_to_close(&mut silent), "");
    // An idle keep-alive connection after a request is closed too.
    let mut idle = TcpStream::connect(&addr).unwrap();
    write!(idle, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert!(read_to_close(&mut idle).starts_with("HTTP/1.1 200"));
    // A declared body over the limit: 413 at once, before any of it is sent.
    let mut huge = TcpStream::connect(&addr).unwrap();
    write!(huge, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 300000000\r\n\r\n").unwrap();
    assert!(read_to_close(&mut huge).starts_with("HTTP/1.1 413"));
    // A body that never arrives: 408.
    let mut slow = TcpStream::connect(&addr).unwrap();
    write!(slow, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{").unwrap();
    let answer = read_to_close(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Generation past the request timeout: 504, for both endpoints.
    let s = start(&["--request-timeout", "0"]);
    let (status, body) = post(&s, "/v1/chat/completions", image_chat(50)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (504, Some("timeout")), "{body}");
    let text = json!({"model": "tiny-v5", "prompt": "Hello", "max_tokens": 50, "ignore_eos": true});
    let (status, body) = post(&s, "/v1/completions", text).await;
    assert_eq!((status, body["error"]["code"].as_str()), (504, Some("timeout")), "{body}");
}

#[tokio::test]
async fn text_completions_stream_like_chat() {
    let s = start(&[]);
    let req = json!({"model": "tiny-v5", "prompt": ["Hello", "Bye"], "max_tokens": 4, "n": 2, "logprobs": 2,
        "ignore_eos": true, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let data = sse_lines(&s, "/v1/completions", &req).await;
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let finishes = chunks.iter().filter(|c| c["choices"].get(0).is_some_and(|c| !c["finish_reason"].is_null())).count();
    assert_eq!(finishes, 4, "two prompts, two choices each");
    let usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
    assert_eq!(usage.len(), 1, "one usage chunk, at the end");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 16);
    assert!(chunks.last().unwrap()["usage"].is_object());
    let with_logprobs =
        chunks.iter().filter(|c| c["choices"].get(0).is_some_and(|c| c["logprobs"]["tokens"].is_array()));
    assert!(with_logprobs.count() >= 4, "logprobs stream with the tokens");
}

#[tokio::test]
#[cfg_attr(not(feature = "fault-injection"), ignore = "injects faults: needs --features fault-injection")]
async fn a_text_completion_fault_streams_as_an_error_event() {
    let s = start_with_env(&[], &[("WEFT_FAULT_INJECTION", "1")]);
    // An engine error reaches the client as an error event, not as silence.
    let mut bad = json!({"model": "tiny-v5", "prompt": "Hello", "max_tokens": 4, "stream": true});
    bad["user"] = json!("weft-fault:panic");
    let data = sse_lines(&s, "/v1/completions", &bad).await;
    assert!(data[data.len() - 2].contains("internal_error"), "{data:?}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn client_faults_found_by_the_engine_name_their_field() {
    let s = start(&["--kv-cache-memory", "1MiB"]);
    // 1 MiB of KV holds 2,048 tokens of the tiny model (128 blocks): eight choices of a
    // 749-token image prompt share its 47 blocks and fit...
    let mut r = image_chat(2);
    r["n"] = json!(8);
    let (status, body) = post(&s, "/v1/chat/completions", r.clone()).await;
    assert_eq!((status, body["choices"].as_array().map(Vec::len)), (200, Some(8)), "{body}");
    // ...three images' prompt (2,207 tokens) does not, even once.
    let image = r["messages"][0]["content"][0].clone();
    r["messages"][0]["content"] = json!([image.clone(), image.clone(), image, {"type": "text", "text": "Compare."}]);
    r["n"] = json!(1);
    let (status, body) = post(&s, "/v1/chat/completions", r).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let long = json!({"model": "tiny-v5", "prompt": [vec![1; 3000]], "max_tokens": 2});
    let (status, body) = post(&s, "/v1/completions", long).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("prompt")), "{body}");
}
