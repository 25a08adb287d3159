//! The worker's own liveness endpoint: gRPC health, SERVING while this process runs,
//! whatever the coordinator's state, so a liveness probe never kills a worker that is
//! waiting for a restarting coordinator.

use super::AbortOnDrop;
use crate::error::{Error, Result};

/// Serve gRPC health on `addr` until the returned guard is dropped.
pub async fn serve(addr: std::net::SocketAddr) -> Result<AbortOnDrop<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: format!("--health-listen {addr}"),
            source,
        })?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    Ok(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!("the health endpoint stopped: {e}");
        }
    })))
}
