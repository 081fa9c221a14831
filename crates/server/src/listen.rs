//! The accept loop: HTTP/1.1 connections served by hyper with a timer, so that a client must
//! send its request headers within the header timeout (which also closes idle keep-alive
//! connections: the wait for the next request's headers is the same wait); graceful shutdown
//! lets in-flight requests finish. axum::serve offers no such timeout, and its HTTP/2
//! detection reads the first bytes with no deadline at all, so cleartext HTTP/2 is not
//! offered (the OpenAI SDKs and curl speak HTTP/1.1 to an `http://` URL).

use axum::Router;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Serves `app` on `listener` until `shutdown` completes, then waits for open connections to
/// finish their requests.
pub async fn serve(listener: TcpListener, app: Router, header_timeout: Duration, shutdown: impl Future<Output = ()>) {
    let mut builder = Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone().map_request(|req: hyper::Request<hyper::body::Incoming>| req.map(axum::body::Body::new)),
        );
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
