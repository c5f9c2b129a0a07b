//! The API server: owns the Unix socket and serves HTTP/1.1 on it from its own thread.
//!
//! # Why hyper
//!
//! The two candidates named for this job were `tiny_http` and Firecracker's `micro_http`:
//!
//! - `micro_http` is not on crates.io (Firecracker and Cloud Hypervisor take it as a git
//!   dependency; the crate of that name on crates.io is an unrelated async server). We build
//!   from crates.io only.
//! - `tiny_http` 0.12 (its latest release, 2022) serves on a `UnixListener`, but when a request
//!   whose body was not read to the end is dropped, it drains the body into a buffer allocated
//!   at the size the client *declared*: `Content-Length: 9223372036854775807` panics with
//!   "capacity overflow" (an abort under `panic = "abort"`), and a few concurrent 1 GB
//!   declarations cost gigabytes (tiny-http issues #252 and #290, unfixed). It also has no limit
//!   on header size and no read timeouts. A bad client must not take the VMM down, so it is out.
//!
//! `hyper` (with `tokio`'s Unix listener) is the maintained HTTP implementation of the Rust
//! ecosystem: bounded header buffer ([`MAX_HEADER_BYTES`]), a header read timeout, bodies that
//! are streamed (so [`MAX_BODY_BYTES`] is enforced as the bytes arrive, and a declared length
//! above it is refused before any is read), and one task per connection, so a client that
//! connects and sends nothing blocks nobody. It runs on a single-threaded runtime in one
//! thread (`api-server`); actions run on a small pool of blocking threads (`api-action`), so a
//! slow action does not stall the other connections either. The same crate is the client in
//! `memvisor ctl` ([`crate::ctl`]).
//!
//! # Limits against a careless client
//!
//! At most [`MAX_CONNECTIONS`] connections are served at once; one more is answered `503` and
//! closed at once, so a client opening thousands costs the VMM no more file descriptors than
//! that. The socket is created owner-only: the process's umask is narrowed to `0177` around
//! `bind` (the mode is right from the first instant the path exists, which a `chmod` after
//! `bind` is not).

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::routes::{self, ApiResponse};
use crate::action::ActionHandler;

/// The largest request body accepted; a larger one is a 400.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The largest request head (request line and headers); hyper answers 431 above it.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long a client may take to send a request head once it has started one.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads that run actions; more concurrent requests wait for one.
const ACTION_THREADS: usize = 4;
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// The answer to a connection over [`MAX_CONNECTIONS`].
const BUSY_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 45\r\nconnection: close\r\n\r\n{\"error\": \"too many API connections, retry\"}\n";

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process is listening on the socket path.
    #[error("API socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is left alone.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The path could not be inspected or a stale socket file could not be removed.
    #[error("cannot replace the stale API socket {path}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding or configuring the socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server's runtime or thread could not be created.
    #[error("cannot start the API server thread")]
    Thread(#[source] io::Error),
}

/// A running API server. Stopping it (with [`ApiServer::stop`] or by dropping it) closes the
/// connections, joins the server thread and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file we created, to remove only that one.
    socket_id: (u64, u64),
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` and serves requests with `handler` until stopped.
    ///
    /// A socket file nobody listens on (left by a crashed process) is replaced; a socket with a
    /// live listener is refused with [`ApiError::InUse`]; a non-socket file is never removed.
    /// The socket is created readable and writable by its owner only.
    pub fn start(
        path: impl AsRef<Path>,
        handler: Arc<dyn ActionHandler>,
    ) -> Result<ApiServer, ApiError> {
        let path = path.as_ref().to_path_buf();
        remove_stale_socket(&path)?;
        let bind_err = |source| ApiError::Bind {
            path: path.clone(),
            source,
        };
        let std_listener = bind_owner_only(&path).map_err(bind_err)?;
        // From here on, the socket file is ours: remove it on any error.
        let cleanup = |e: ApiError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        let meta = std::fs::metadata(&path)
            .map_err(bind_err)
            .map_err(cleanup)?;
        let socket_id = (meta.dev(), meta.ino());
        std_listener
            .set_nonblocking(true)
            .map_err(bind_err)
            .map_err(cleanup)?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(ACTION_THREADS)
            .thread_name("api-action")
            .build()
            .map_err(ApiError::Thread)
            .map_err(cleanup)?;
        let listener = {
            let _guard = runtime.enter();
            UnixListener::from_std(std_listener)
                .map_err(bind_err)
                .map_err(cleanup)?
        };
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("api-server".into())
            .spawn(move || {
                runtime.block_on(serve(listener, handler, shutdown_rx));
                // Connections still open are cancelled; an action still running is left to
                // finish on its own thread rather than hold up the VMM's exit.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(ApiError::Thread)
            .map_err(cleanup)?;
        tracing::info!("API listening on {}", path.display());
        Ok(ApiServer {
            path,
            socket_id,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving, joins the server thread and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The receiver is gone only if the server thread already ended.
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the API server thread panicked");
            }
        }
        // Remove the file only if it is still the socket we created.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.socket_id {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove the API socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// Binds `path` with the umask narrowed to `0177`, so the socket is `0600` from the start.
///
/// The umask belongs to the process: a file another thread creates during the `bind` gets no
/// group or other bits either (never more than it asked for), and two servers starting at once
/// take turns here.
fn bind_owner_only(path: &Path) -> io::Result<StdUnixListener> {
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = UMASK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: umask only swaps the process's file-mode creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = StdUnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound
}

/// Makes `path` free to bind: removes a socket file nobody listens on, refuses a live one.
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    let stale = |source| ApiError::Stale {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_path_buf()));
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("replacing the stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(stale)
        }
        Err(e) => Err(stale(e)),
    }
}

async fn serve(
    listener: UnixListener,
    handler: Arc<dyn ActionHandler>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            // A stop request, or the ApiServer dropped without one.
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let handler = handler.clone();
                        tokio::spawn(async move {
                            serve_connection(stream, handler).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        // A fresh socket's send buffer takes the whole answer without
                        // waiting; whatever happens, the connection is closed right here.
                        let _ = stream.try_write(BUSY_RESPONSE);
                        tracing::debug!("API: {MAX_CONNECTIONS} connections open, refused one");
                    }
                },
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("API: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(stream: UnixStream, handler: Arc<dyn ActionHandler>) {
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(respond(req, handler).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!("API connection ended: {e}");
    }
}

fn too_large() -> ApiResponse {
    ApiResponse::bad_request(format!(
        "request body is larger than {} KiB",
        MAX_BODY_BYTES / 1024
    ))
}

/// Reads the whole body (bounded in size and time), then runs the route on a blocking thread.
async fn respond(req: Request<Incoming>, handler: Arc<dyn ActionHandler>) -> Response<Full<Bytes>> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return to_http(too_large());
    }
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return to_http(too_large()),
        Ok(Err(e)) => {
            return to_http(ApiResponse::bad_request(format!(
                "cannot read the request body: {e}"
            )))
        }
        Err(_) => {
            return to_http(ApiResponse::bad_request(
                "timed out reading the request body",
            ))
        }
    };
    let response = tokio::task::spawn_blocking(move || {
        routes::dispatch(&method, &path, &body, handler.as_ref())
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!("API: the action handler failed: {e}");
        ApiResponse::error(500, "the action handler failed")
    });
    to_http(response)
}

fn to_http(r: ApiResponse) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(r.body)));
    *response.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = r.content_type {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    response
}
