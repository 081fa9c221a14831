//! End-to-end: the real `weft serve` binary on port 0 with the tiny fixture, driven over HTTP.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

#[tokio::test]
async fn chat_completion_matches_the_reference() {
    let s = start(&[]);
    let (status, body) = post(&s, "/v1/chat/completions", image_chat(6)).await;
    assert_eq!(status, 200, "{body}");
    let case = reference_case("one_image");
    assert_eq!(body["usage"]["prompt_tokens"], case["prompt_ids"].as_array().unwrap().len());
    assert_eq!(body["usage"]["prompt_tokens_details"]["image_tokens"], 729);
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["object"], "chat.completion");
    // The same request again: the image and the prefix come from the caches.
    let (_, again) = post(&s, "/v1/chat/completions", image_chat(6)).await;
    assert_eq!(again["choices"][0]["message"]["content"], body["choices"][0]["message"]["content"]);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 700 && cached % 16 == 0, "whole 16-token blocks of the prompt: {cached}");
    // Counted as vLLM counts them, and the pool's shape as vLLM's cache_config_info gives it.
    let metrics = client().get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}: {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let prompt = body["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(value("weft:prefix_cache_hits_total"), cached as f64);
    assert!(value("weft:prefix_cache_queries_total") >= 2.0 * prompt);
    let info = metrics.lines().find(|l| l.starts_with("weft:cache_config_info{")).expect("cache_config_info");
    let blocks: f64 = info.split("num_gpu_blocks=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    assert!(info.contains("block_size=\"16\""), "{info}");
    // tiny-v5 keeps 2 layers x (k, v) x 2 heads x 16 values of f32 a token: 8 KiB a block.
    assert_eq!(blocks * 8192.0, value("weft:kv_cache_budget_bytes"), "{info}");
}

#[tokio::test]
async fn streaming_sends_role_content_finish_usage_and_one_done() {
    let s = start(&[]);
    let mut req = image_chat(5);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let text =
        client().post(format!("{}/v1/chat/completions", s.base)).json(&req).send().await.unwrap().text().await.unwrap();
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    assert_eq!(data.iter().filter(|d| **d == "[DONE]").count(), 1);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let (_, whole) = post(&s, "/v1/chat/completions", image_chat(5)).await;
    assert_eq!(streamed, whole["choices"][0]["message"]["content"].as_str().unwrap());
}

#[tokio::test]
async fn client_errors_have_the_openai_shape_and_name_the_field() {
    let s = start(&[]);
    let check = |status: u16, body: &Value, want_status: u16, param: Option<&str>| {
        assert_eq!(status, want_status, "{body}");
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string(), "{body}");
        if let Some(p) = param {
            assert_eq!(body["error"]["param"], p, "{body}");
        }
    };
    let r = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    check(st, &r.json().await.unwrap(), 400, None);
    let r = client().post(format!("{}/v1/chat/completions", s.base)).body("{}").send().await.unwrap();
    let st = r.status().as_u16();
    check(st, &r.json().await.unwrap(), 415, None);
    let mut req = image_chat(2);
    req["model"] = json!("gpt-4");
    let (st, b) = post(&s, "/v1/chat/completions", req).await;
    check(st, &b, 404, Some("model"));
    let mut req = image_chat(2);
    req["temperature"] = json!(7);
    let (st, b) = post(&s, "/v1/chat/completions", req).await;
    check(st, &b, 400, Some("temperature"));
    let mut req = image_chat(2);
    req["messages"][0]["content"][0]["image_url"]["url"] = json!("data:image/png;base64,bm90IGFuIGltYWdl");
    let (st, b) = post(&s, "/v1/chat/completions", req).await;
    check(st, &b, 415, Some("messages[0].content[0].image_url.url"));
    let mut req = image_chat(2);
    req["max_tokens"] = json!("many");
    let (st, b) = post(&s, "/v1/chat/completions", req).await;
    check(st, &b, 400, Some("max_tokens"));
    let (st, b) = post(&s, "/v1/nothing", json!({})).await;
    check(st, &b, 404, None);
    // The server still answers normally afterwards.
    assert_eq!(post(&s, "/v1/chat/completions", image_chat(1)).await.0, 200);
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let s = start(&["--api-key", "sekrit"]);
    let (st, b) = post(&s, "/v1/chat/completions", image_chat(1)).await;
    assert_eq!((st, b["error"]["type"].as_str()), (401, Some("authentication_error")));
    assert_eq!(client().get(format!("{}/health", s.base)).send().await.unwrap().status(), 200);
    assert_eq!(client().get(format!("{}/ready", s.base)).send().await.unwrap().status(), 200);
    let r = client().get(format!("{}/v1/models", s.base)).bearer_auth("sekrit").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-v5");
    assert!(r_has_request_id(&s).await);
    // The playground page loads without the key (its own requests carry the key typed in it).
    for path in ["/", "/playground"] {
        let r = client().get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(r.text().await.unwrap().contains("/v1/chat/completions"));
    }
}

async fn r_has_request_id(s: &Server) -> bool {
    let r = client().get(format!("{}/health", s.base)).header("x-request-id", "abc-123").send().await.unwrap();
    r.headers().get("x-request-id").map(|v| v == "abc-123").unwrap_or(false)
}

#[tokio::test]
async fn completions_tokenize_and_metrics() {
    let s = start(&[]);
    let (st, b) = post(&s, "/v1/completions", json!({"model": "tiny-v5", "prompt": ["Once upon", "a time"], "max_tokens": 3, "n": 2, "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"].as_array().unwrap().len(), 4);
    assert_eq!(b["usage"]["completion_tokens"], 12);
    let (st, t) = post(&s, "/tokenize", json!({"messages": image_chat(1)["messages"]})).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["count"], reference_case("one_image")["prompt_ids"].as_array().unwrap().len());
    assert_eq!(t["image_tokens"], 729);
    let metrics = client().get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("weft:num_requests_running"), "{metrics}");
    assert!(metrics.contains("weft:time_to_first_token_seconds"), "{metrics}");
    // The inference gateway's endpoint picker reads these series (deploy/gateway).
    let specs = gateway_metric_specs();
    assert!(specs.len() >= 3, "queue, running and KV usage at least: {specs:?}");
    for name in specs {
        let exported =
            metrics.lines().any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")));
        assert!(exported, "deploy/gateway/epp-config.yaml reads {name}, which /metrics does not export");
    }
}

/// The metric names (without label matchers) of every non-empty `...Spec` in the endpoint
/// picker's configuration of deploy/gateway.
fn gateway_metric_specs() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/gateway/epp-config.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| l.trim().split_once("Spec: "))
        .map(|(_, value)| value.trim().trim_matches('"').split('{').next().unwrap().to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn committed_openapi_spec_matches_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).arg("openapi").output().unwrap();
    let committed =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi.yaml")).unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed, "regenerate with `weft openapi > openapi.yaml`");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request() {
    use futures_util::StreamExt;
    let s = start(&["--max-tokens", "7000"]);
    let mut req = image_chat(7000);
    req["stream"] = json!(true);
    let response = client().post(format!("{}/v1/chat/completions", s.base)).json(&req).send().await.unwrap();
    // (It used to ask for 100,000 tokens, which is refused with a 400: nothing was cancelled.)
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    assert!(body.next().await.is_some(), "the stream started");
    drop(body);
    // The server notices at its next write and the engine drops the request: nothing runs any
    // more, long before 7,000 tokens could have been generated.
    let gauge = |metrics: &str, name: &str| -> f64 {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let metrics = client().get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
        if gauge(&metrics, "weft:num_requests_running") == 0.0 {
            assert!(gauge(&metrics, "weft:generation_tokens_total") < 6000.0, "the request ran to its end");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the request is still running");
    }
    assert_eq!(post(&s, "/v1/chat/completions", image_chat(2)).await.0, 200);
}

#[tokio::test]
async fn sigterm_lets_the_stream_finish_then_exits_cleanly() {
    use futures_util::StreamExt;
    let mut s = start(&["--shutdown-timeout", "60"]);
    let mut req = image_chat(200);
    req["stream"] = json!(true);
    let response = client().post(format!("{}/v1/chat/completions", s.base)).json(&req).send().await.unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let killed = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("\"finish_reason\":\"length\""), "the in-flight stream completed: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn settings_come_from_flags_then_environment_then_the_toml_file() {
    let dir = std::env::temp_dir().join(format!("weft-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("weft.toml");
    std::fs::write(&file, "served_model_name = \"from-toml\"\nmax_n = 2\n").unwrap();
    let names = |s: &Server| {
        let url = format!("{}/v1/models", s.base);
        async move { client().get(url).send().await.unwrap().json::<Value>().await.unwrap()["data"][0]["id"].clone() }
    };
    let s = start(&["--config", file.to_str().unwrap()]);
    assert_eq!(names(&s).await, "from-toml");
    let mut req = image_chat(1);
    req["model"] = json!("from-toml");
    req["n"] = json!(3);
    let (st, b) = post(&s, "/v1/chat/completions", req).await;
    assert_eq!((st, b["error"]["param"].as_str()), (400, Some("n")), "max_n from the file: {b}");
    drop(s);
    let s = start_with_env(&["--config", file.to_str().unwrap()], &[("WEFT_SERVED_MODEL_NAME", "from-env")]);
    assert_eq!(names(&s).await, "from-env");
    drop(s);
    let s = start_with_env(
        &["--config", file.to_str().unwrap(), "--served-model-name", "from-flag"],
        &[("WEFT_SERVED_MODEL_NAME", "from-env")],
    );
    assert_eq!(names(&s).await, "from-flag");
    std::fs::write(&file, "no_such_setting = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["serve", "--model", "x", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting `no_such_setting`"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn user_parts(parts: Value, max_tokens: u64) -> Value {
    json!({"model": "tiny-v5", "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
           "temperature": 0, "ignore_eos": true})
}

#[tokio::test]
async fn video_parts_and_eight_view_scenes() {
    let s = start(&[]);
    let req = user_parts(
        json!([{"type": "video_url", "video_url": {"url": data_uri("clip.gif"), "num_frames": 4}},
               {"type": "text", "text": "What changed between the frames of this video?"}]),
        2,
    );
    let (st, b) = post(&s, "/v1/chat/completions", req).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["video_frames"], json!([[0, 3, 6, 9]]));
    assert_eq!(b["usage"]["prompt_tokens"], reference_case("video_gif")["prompt_ids"].as_array().unwrap().len());
    // A 3D scene: eight views of it as eight images.
    let mut parts: Vec<Value> = (0..8)
        .map(|i| json!({"type": "image_url", "image_url": {"url": data_uri(["square.png", "wide.png"][i % 2])}}))
        .collect();
    parts.push(json!({"type": "text", "text": "Where is the chair in this room?"}));
    let (st, b) = post(&s, "/v1/chat/completions", user_parts(json!(parts), 2)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["usage"]["prompt_tokens_details"]["image_tokens"], 8 * 729);
    let too_many =
        user_parts(json!([{"type": "video_url", "video_url": {"url": data_uri("clip.gif"), "num_frames": 500}}]), 1);
    let (st, b) = post(&s, "/v1/chat/completions", too_many).await;
    assert_eq!((st, b["error"]["param"].as_str()), (400, Some("messages[0].content[0].video_url.num_frames")), "{b}");
}

/// Serves one PNG over HTTP on 127.0.0.1 (loopback only, as every test here).
async fn png_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let png = std::fs::read(fixtures().join("images/square.png")).unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let png = png.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    png.len()
                );
                let _ = sock.write_all(&[head.into_bytes(), png].concat()).await;
            });
        }
    });
    format!("http://{addr}/square.png")
}

#[tokio::test]
async fn remote_and_local_media_follow_the_policy() {
    let url = png_server().await;
    let image = |u: &str| {
        user_parts(json!([{"type": "image_url", "image_url": {"url": u}}, {"type": "text", "text": "Hi"}]), 1)
    };
    let strict = start(&[]);
    let (st, b) = post(&strict, "/v1/chat/completions", image(&url)).await;
    assert_eq!((st, b["error"]["param"].as_str()), (400, Some("messages[0].content[0].image_url.url")), "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("loopback"), "{b}");
    let file_url = format!("file://{}", fixtures().join("images/square.png").display());
    let (st, b) = post(&strict, "/v1/chat/completions", image(&file_url)).await;
    assert_eq!(st, 400, "file:// is refused without an allowed directory: {b}");
    drop(strict);

    let images = fixtures().join("images");
    let open = start(&["--allow-private-media", "--allowed-local-media-path", images.to_str().unwrap()]);
    let (st, b) = post(&open, "/v1/chat/completions", image(&url)).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = post(&open, "/v1/chat/completions", image(&file_url)).await;
    assert_eq!(st, 200, "{b}");
    let escape = format!("file://{}/../tiny-v5/config.json", images.display());
    let (st, b) = post(&open, "/v1/chat/completions", image(&escape)).await;
    assert_eq!(st, 400, "{b}");
}

#[test]
fn weft_bench_measures_a_running_server() {
    let s = start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["bench", "--url", &s.base, "--num-requests", "3", "--concurrency", "1,2", "--images", "1"])
        .args(["--image-size", "64", "--prompt-tokens", "12", "--max-tokens", "4", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["config"]["model"], "tiny-v5");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["completed"], 3, "{run}");
        assert_eq!(run["failed"], 0);
        // ignore_eos: every request generates exactly max_tokens.
        assert_eq!(run["output_tokens"], 12);
        assert!(run["prompt_tokens"].as_u64().unwrap() > 3 * 729, "{run}");
        assert!(run["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert!(run["itl_ms"]["mean"].as_f64().unwrap() >= 0.0);
    }
}

#[tokio::test]
async fn weft_generate_answers_as_the_server_does() {
    let s = start(&[]);
    let (status, body) = post(&s, "/v1/chat/completions", image_chat(12)).await;
    assert_eq!(status, 200, "{body}");
    let output = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-v5"))
        .arg("--image")
        .arg(fixtures().join("images/square.png"))
        .args(["--prompt", "What is in this image?", "--max-tokens", "12", "--ignore-eos"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed.strip_suffix('\n'), body["choices"][0]["message"]["content"].as_str());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("prompt tokens: 749 (20 text, 729 image in 1 images)"), "{stderr}");
    assert!(stderr.contains("12 tokens"), "{stderr}");
}
