//! The daemon's API client: HTTP/1.1 over the unix socket.

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A call that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon on the socket.
    #[error(
        "cannot reach the daemon at {path}: {reason} (is `vfmap serve` running? pass --socket or set VFMAP_SOCKET)"
    )]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The socket's server runs as another user: it could be anyone's impostor.
    #[error(
        "refusing to talk to {path}: the process listening there runs as uid {uid}, not root or you (uid {me}); check the socket path"
    )]
    Impostor {
        /// The socket.
        path: String,
        /// The server's user.
        uid: u32,
        /// Ours.
        me: u32,
    },
    /// The HTTP exchange failed.
    #[error("talking to the daemon failed: {0}")]
    Http(String),
    /// The daemon answered with something that is not JSON.
    #[error("the daemon answered with non-JSON ({0})")]
    NotJson(String),
}

/// Sends one request (`body`: a serialised request type of `vfmap-api`); returns the status
/// and the JSON body, for the caller to read as the API's response or error type.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Value), ClientError> {
    let stream =
        tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| ClientError::Connect {
                path: socket.display().to_string(),
                reason: e.to_string(),
            })?;
    // Only a daemon run by root or by this user may be trusted with the request (and its
    // answer): on a shared host anyone could listen on a path we were pointed at.
    let me = vfmap_daemon::paths::euid();
    let uid = stream
        .peer_cred()
        .map_err(|e| ClientError::Connect {
            path: socket.display().to_string(),
            reason: format!("cannot tell who listens there: {e}"),
        })?
        .uid();
    if uid != 0 && uid != me {
        return Err(ClientError::Impostor {
            path: socket.display().to_string(),
            uid,
            me,
        });
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(connection);
    let bytes = body.map(Bytes::from).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "vfmap")
        .header("content-type", "application/json")
        .body(Full::new(bytes))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    let value = serde_json::from_slice(&body)
        .map_err(|_| ClientError::NotJson(format!("HTTP {status}")))?;
    Ok((status, value))
}
