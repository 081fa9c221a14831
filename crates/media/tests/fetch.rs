//! Fetching against a local HTTP server on 127.0.0.1 (private media allowed in these tests
//! only), plus refusals that need no connection at all.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_media::budget::ByteBudget;
use weft_media::fetch::{check_addresses, check_domain, fetch, FetchError, FetchPolicy, SourceKind};

/// A canned HTTP/1.1 server: answers by path, then closes the connection.
async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let png = tiny_png();
                let response: Vec<u8> = match path.as_str() {
                    "/img.png" => [format!("HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", png.len()).into_bytes(), png].concat(),
                    "/big-no-length" => [b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec(), vec![7u8; 10_000]].concat(),
                    "/redirect" => b"HTTP/1.1 302 Found\r\nlocation: /img.png\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                    "/loop" => b"HTTP/1.1 302 Found\r\nlocation: /loop\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                    "/to-localhost" => format!("HTTP/1.1 302 Found\r\nlocation: http://localhost:{}/img.png\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", addr.port()).into_bytes(),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Vec::new()
                    }
                    _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                };
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

fn tiny_png() -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::new(3, 2).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn local_policy() -> FetchPolicy {
    FetchPolicy { allow_private: true, ..Default::default() }
}

const T: Duration = Duration::from_secs(5);

fn unlimited() -> ByteBudget {
    ByteBudget::new(usize::MAX)
}

#[tokio::test]
async fn fetches_and_follows_redirects() {
    let addr = serve().await;
    let f = fetch(&format!("http://{addr}/img.png"), &local_policy(), 1 << 20, T, &unlimited()).await.unwrap();
    assert_eq!((f.bytes, f.declared_type.as_deref(), f.kind), (tiny_png(), Some("image/png"), SourceKind::Http));
    let f = fetch(&format!("http://{addr}/redirect"), &local_policy(), 1 << 20, T, &unlimited()).await.unwrap();
    assert_eq!(f.bytes, tiny_png());
    let err = fetch(&format!("http://{addr}/loop"), &local_policy(), 1 << 20, T, &unlimited()).await.unwrap_err();
    assert_eq!(err, FetchError::TooManyRedirects(3));
    let err = fetch(&format!("http://{addr}/missing"), &local_policy(), 1 << 20, T, &unlimited()).await.unwrap_err();
    assert_eq!(err, FetchError::Status(404));
}

#[tokio::test]
async fn byte_cap_holds_without_content_length() {
    let addr = serve().await;
    let err = fetch(&format!("http://{addr}/big-no-length"), &local_policy(), 1000, T, &unlimited()).await.unwrap_err();
    assert_eq!(err, FetchError::TooLarge { limit: 1000 });
}

/// One request's budget is shared by its fetches and charged while reading: the second fetch
/// stops at the byte that crosses it, whatever each fetch's own cap allows.
#[tokio::test]
async fn the_request_budget_holds_across_fetches_while_reading() {
    let addr = serve().await;
    let budget = ByteBudget::new(15_000);
    fetch(&format!("http://{addr}/big-no-length"), &local_policy(), 1 << 20, T, &budget).await.unwrap();
    let err = fetch(&format!("http://{addr}/big-no-length"), &local_policy(), 1 << 20, T, &budget).await.unwrap_err();
    assert!(matches!(err, FetchError::OverBudget(_)), "{err}");
    let data = format!("data:image/png;base64,{}", "AAAA".repeat(2000));
    let err = fetch(&data, &local_policy(), 1 << 20, T, &ByteBudget::new(5999)).await.unwrap_err();
    assert!(matches!(err, FetchError::OverBudget(_)), "decoded size is charged before decoding: {err}");
}

#[tokio::test]
async fn slow_servers_time_out() {
    let addr = serve().await;
    let err = fetch(&format!("http://{addr}/slow"), &local_policy(), 1000, Duration::from_millis(300), &unlimited())
        .await
        .unwrap_err();
    assert_eq!(err, FetchError::Timeout(Duration::from_millis(300)));
}

#[tokio::test]
async fn every_redirect_hop_is_checked_again() {
    let addr = serve().await;
    let policy = FetchPolicy { allowed_domains: vec!["127.0.0.1".into()], ..local_policy() };
    assert!(fetch(&format!("http://{addr}/img.png"), &policy, 1 << 20, T, &unlimited()).await.is_ok());
    let err = fetch(&format!("http://{addr}/to-localhost"), &policy, 1 << 20, T, &unlimited()).await.unwrap_err();
    assert_eq!(err, FetchError::DomainNotAllowed("localhost".into()));
}

#[tokio::test]
async fn private_addresses_are_refused_by_default_before_connecting() {
    let addr = serve().await;
    let err =
        fetch(&format!("http://{addr}/img.png"), &FetchPolicy::default(), 1 << 20, T, &unlimited()).await.unwrap_err();
    assert!(matches!(err, FetchError::Blocked { reason: "loopback", .. }), "{err}");
    let err = fetch("http://[::ffff:127.0.0.1]:9/x.png", &FetchPolicy::default(), 1 << 20, T, &unlimited())
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Blocked { .. }), "{err}");
    // Host names are resolved and their addresses checked, not just literal IPs.
    let err = fetch("http://localhost:9/x.png", &FetchPolicy::default(), 1 << 20, T, &unlimited()).await.unwrap_err();
    assert!(matches!(err, FetchError::Blocked { reason: "loopback", .. }), "{err}");
}

#[test]
fn resolved_addresses_are_all_checked() {
    let public: SocketAddr = "93.184.216.34:80".parse().unwrap();
    let metadata: SocketAddr = "169.254.169.254:80".parse().unwrap();
    assert!(check_addresses("example.org", &[public], false).is_ok());
    // One private answer among public ones is enough to refuse (DNS rebinding).
    let err = check_addresses("evil.example", &[public, metadata], false).unwrap_err();
    assert!(matches!(err, FetchError::Blocked { reason: "link-local", .. }));
    let cgnat: SocketAddr = "100.100.1.1:443".parse().unwrap();
    assert!(check_addresses("x", &[cgnat], false).is_err());
    assert!(check_addresses("x", &[cgnat], true).is_ok());
    assert_eq!(check_addresses("x", &[], true).unwrap_err(), FetchError::Dns("x".into()));
}

#[test]
fn domain_allow_list_matches_hosts_and_subdomains() {
    let allowed = vec!["example.com".to_string()];
    assert!(check_domain("example.com", &allowed).is_ok());
    assert!(check_domain("img.Example.com", &allowed).is_ok());
    assert!(check_domain("example.com.evil.net", &allowed).is_err());
    assert!(check_domain("notexample.com", &allowed).is_err());
    assert!(check_domain("anything", &[]).is_ok());
}

#[tokio::test]
async fn local_files_only_under_the_allowed_directory() {
    let root = std::env::temp_dir().join(format!("weft-media-local-{}", std::process::id()));
    let inside = root.join("allowed");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::write(inside.join("a.png"), tiny_png()).unwrap();
    std::fs::write(root.join("secret.png"), tiny_png()).unwrap();
    let policy = FetchPolicy { allowed_local_path: Some(inside.clone()), ..Default::default() };
    let url = |p: &std::path::Path| format!("file://{}", p.display());
    assert_eq!(fetch(&url(&inside.join("a.png")), &policy, 1 << 20, T, &unlimited()).await.unwrap().bytes, tiny_png());
    let escape = format!("file://{}/../secret.png", inside.display());
    assert_eq!(fetch(&escape, &policy, 1 << 20, T, &unlimited()).await.unwrap_err(), FetchError::LocalOutside);
    assert_eq!(
        fetch(&url(&inside.join("a.png")), &FetchPolicy::default(), 1 << 20, T, &unlimited()).await.unwrap_err(),
        FetchError::LocalNotAllowed
    );
    assert_eq!(
        fetch(&url(&inside.join("a.png")), &policy, 10, T, &unlimited()).await.unwrap_err(),
        FetchError::TooLarge { limit: 10 }
    );
    assert_eq!(fetch("ftp://x/y", &policy, 10, T, &unlimited()).await.unwrap_err(), FetchError::Scheme);
    let _ = std::fs::remove_dir_all(&root);
}
