//! The API server over a real Unix socket, with the fake action handler (no KVM): routing, bodies,
//! statuses and how the handler's replies are served. What a real VM answers is tests/api.rs's.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use vmm::action::fake::FakeHandler;
use vmm::action::{Action, ActionError, ErrorBody, RunState, VmInfo, VmList, VmState};
use vmm::api::{ApiError, ApiServer, MAX_BODY_BYTES};
use vmm::ctl::{ApiClient, HttpReply};

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    handler: Arc<FakeHandler>,
    server: Option<ApiServer>,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("api.sock");
    let handler = Arc::new(FakeHandler::new(&["vm0", "vm1"]));
    let server = ApiServer::start(&socket, handler.clone()).expect("server starts");
    Fixture {
        _dir: dir,
        socket,
        handler,
        server: Some(server),
    }
}

impl Fixture {
    fn request(&self, method: Method, path: &str, body: Option<&str>) -> HttpReply {
        ApiClient::new(&self.socket)
            .expect("client")
            .request(method, path, body.map(|b| b.as_bytes().to_vec()))
            .expect("request completes")
    }
}

fn error_of(reply: &HttpReply) -> String {
    serde_json::from_slice::<ErrorBody>(&reply.body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {reply:?}"))
        .error
}

/// Sends raw bytes and returns what the server answered until it closed or `timeout` passed.
fn raw_exchange(socket: &Path, bytes: &[u8], timeout: Duration) -> String {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough: stop once the (small) body has arrived.
                let text = String::from_utf8_lossy(&out);
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if out.len() >= head_end + 4 + len {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn get_vm_returns_config_state_and_memory() {
    let f = start();
    let reply = f.request(Method::GET, "/api/v1/vms/vm0", None);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let info: VmInfo = serde_json::from_slice(&reply.body).expect("VmInfo");
    assert_eq!(info.id, "vm0");
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.memory.boot_mib, 128);
    assert_eq!(info.config.cpus, 1);
}

#[test]
fn list_vms_returns_every_vm() {
    let f = start();
    let reply = f.request(Method::GET, "/api/v1/vms", None);
    assert_eq!(reply.status, StatusCode::OK);
    let list: VmList = serde_json::from_slice(&reply.body).expect("VmList");
    let ids: Vec<_> = list.vms.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["vm0", "vm1"]);
}

#[test]
fn a_state_change_reaches_the_vm_and_its_reply_is_served() {
    let f = start();
    let pause = Some(r#"{"state": "paused"}"#);
    let reply = f.request(Method::PUT, "/api/v1/vms/vm1/state", pause);
    assert_eq!(reply.status, StatusCode::OK);
    let info: VmInfo = serde_json::from_slice(&reply.body).expect("VmInfo");
    assert_eq!((info.id.as_str(), info.state), ("vm1", VmState::Paused));
    let resume = Some(r#"{"state": "running"}"#);
    let reply = f.request(Method::PUT, "/api/v1/vms/vm1/state", resume);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        f.handler.actions(),
        [
            (Some("vm1".into()), Action::SetState(RunState::Paused)),
            (Some("vm1".into()), Action::SetState(RunState::Running)),
        ]
    );
}

#[test]
fn a_refusal_is_served_with_its_status_and_its_words() {
    let f = start();
    f.handler
        .answer_next(Err(ActionError::Conflict("scripted conflict".into())));
    let pause = Some(r#"{"state": "paused"}"#);
    let reply = f.request(Method::PUT, "/api/v1/vms/vm1/state", pause);
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(error_of(&reply), "scripted conflict");
    f.handler
        .answer_next(Err(ActionError::Internal("scripted failure".into())));
    let reply = f.request(Method::GET, "/api/v1/vms/vm1", None);
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_of(&reply), "scripted failure");
}

#[test]
fn shutdown_is_accepted_with_no_content() {
    let f = start();
    let reply = f.request(Method::PUT, "/api/v1/vms/vm0/shutdown", None);
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
    assert_eq!(
        f.handler.actions(),
        [(Some("vm0".into()), Action::Shutdown)]
    );
}

#[test]
fn metrics_are_served_as_prometheus_text() {
    let f = start();
    let reply = f.request(Method::GET, "/metrics", None);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(reply.body).expect("utf-8");
    assert!(
        text.contains("memvisor_vm_exits_total{vm=\"vm1\",reason=\"io_out\"} 42"),
        "{text}"
    );
}

#[test]
fn unknown_vm_id_is_404_naming_the_id() {
    let f = start();
    let reply = f.request(Method::GET, "/api/v1/vms/vm7", None);
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&reply), "no VM named \"vm7\"");
    let reply = f.request(
        Method::PUT,
        "/api/v1/vms/vm7/state",
        Some(r#"{"state": "paused"}"#),
    );
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// Each bad input, the status it gets and a piece of the error text.
#[test]
fn bad_inputs_get_400_with_a_one_line_error() {
    let f = start();
    let big = format!(
        r#"{{"state": "paused", "pad": "{}"}}"#,
        "x".repeat(MAX_BODY_BYTES)
    );
    let cases: &[(&str, Method, &str, Option<&str>, &str)] = &[
        (
            "malformed JSON",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some(r#"{"state": "#),
            "invalid body: state: EOF while parsing",
        ),
        (
            "not JSON at all",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some("paused"),
            "invalid body: expected a JSON object",
        ),
        (
            "unknown field",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some(r#"{"state": "paused", "now": 1}"#),
            "unknown field `now`",
        ),
        (
            "wrong type",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some(r#"{"state": true}"#),
            "invalid body: state: invalid type: boolean `true`",
        ),
        (
            "unknown state",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some(r#"{"state": "frozen"}"#),
            "state: unknown variant `frozen`",
        ),
        (
            "missing field",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some("{}"),
            "missing field `state`",
        ),
        (
            "missing body",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            None,
            "missing body",
        ),
        (
            "array body",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some(r#"["paused"]"#),
            "invalid body: expected a JSON object",
        ),
        (
            "truncated JSON object",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some("{"),
            "invalid body: EOF while parsing",
        ),
        (
            "string body on shutdown",
            Method::PUT,
            "/api/v1/vms/vm0/shutdown",
            Some(r#""now""#),
            "expected a JSON object",
        ),
        (
            "shutdown with fields",
            Method::PUT,
            "/api/v1/vms/vm0/shutdown",
            Some(r#"{"force": true}"#),
            "unknown field `force`",
        ),
        (
            "body over 64 KiB",
            Method::PUT,
            "/api/v1/vms/vm0/state",
            Some(&big),
            "larger than 64 KiB",
        ),
        (
            "unknown path",
            Method::GET,
            "/api/v1/vm",
            None,
            "no route for /api/v1/vm",
        ),
        (
            "unknown version",
            Method::GET,
            "/api/v2/vms",
            None,
            "no route for /api/v2/vms",
        ),
        (
            "wrong method",
            Method::POST,
            "/api/v1/vms/vm0/state",
            Some(r#"{"state": "paused"}"#),
            "POST is not allowed on /api/v1/vms/vm0/state (allowed: PUT)",
        ),
        (
            "GET on an action",
            Method::GET,
            "/api/v1/vms/vm0/shutdown",
            None,
            "allowed: PUT",
        ),
        (
            "invalid VM id",
            Method::GET,
            "/api/v1/vms/vm!0",
            None,
            "invalid VM id",
        ),
        (
            "GET with a body",
            Method::GET,
            "/api/v1/vms/vm0",
            Some("{}"),
            "takes no body",
        ),
    ];
    for (name, method, path, body, expected) in cases {
        let reply = f.request(method.clone(), path, *body);
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{name}: {reply:?}");
        let e = error_of(&reply);
        assert!(e.contains(expected), "{name}: {e:?} lacks {expected:?}");
        assert!(!e.contains('\n'), "{name}: error is not one line: {e:?}");
    }
    // None of them reached the VM, and the server still answers.
    assert!(f.handler.actions().is_empty(), "{:?}", f.handler.actions());
    assert_eq!(
        f.request(Method::GET, "/api/v1/vms/vm0", None).status,
        StatusCode::OK
    );
}

#[test]
fn declared_body_over_64_kib_is_refused_before_it_is_sent() {
    let f = start();
    let head = format!(
        "PUT /api/v1/vms/vm0/state HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        u64::MAX / 2
    );
    let reply = raw_exchange(&f.socket, head.as_bytes(), Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("larger than 64 KiB"), "{reply}");
    assert_eq!(
        f.request(Method::GET, "/api/v1/vms/vm0", None).status,
        StatusCode::OK
    );
}

#[test]
fn chunked_body_over_64_kib_is_refused() {
    let f = start();
    let chunk = "x".repeat(40 * 1024);
    let mut req = String::from(
        "PUT /api/v1/vms/vm0/state HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for _ in 0..2 {
        req += &format!("{:x}\r\n{chunk}\r\n", chunk.len());
    }
    req += "0\r\n\r\n";
    let reply = raw_exchange(&f.socket, req.as_bytes(), Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("larger than 64 KiB"), "{reply}");
}

#[test]
fn malformed_http_is_a_400_and_the_server_keeps_serving() {
    let f = start();
    let reply = raw_exchange(
        &f.socket,
        b"NOT HTTP AT ALL\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(
        f.request(Method::GET, "/api/v1/vms/vm0", None).status,
        StatusCode::OK
    );
}

#[test]
fn silent_clients_do_not_block_others() {
    let f = start();
    // Several clients connect and send nothing; one sends half a request head; one sends a
    // head promising a body that never comes.
    let mut idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&f.socket).expect("connect"))
        .collect();
    let mut half = UnixStream::connect(&f.socket).expect("connect");
    half.write_all(b"GET /api/v1/vms HTTP/1.1\r\nHo")
        .expect("write");
    idle.push(half);
    let mut stalled = UnixStream::connect(&f.socket).expect("connect");
    stalled
        .write_all(b"PUT /api/v1/vms/vm0/state HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{")
        .expect("write");
    idle.push(stalled);

    let start = Instant::now();
    for _ in 0..20 {
        let reply = f.request(Method::GET, "/api/v1/vms/vm0", None);
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "20 requests took {:?} while clients sat idle",
        start.elapsed()
    );
    drop(idle);
}

#[test]
fn keep_alive_connection_serves_many_requests() {
    let f = start();
    let mut client = ApiClient::new(&f.socket).expect("client");
    for _ in 0..50 {
        let reply = client
            .request(Method::GET, "/api/v1/vms/vm0", None)
            .expect("request");
        assert_eq!(reply.status, StatusCode::OK);
    }
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    // A socket file whose listener is gone, as a crashed VMM leaves it.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let server = ApiServer::start(&path, Arc::new(FakeHandler::new(&["vm0"])))
        .expect("stale socket is replaced");
    let reply = ApiClient::new(&path)
        .expect("client")
        .request(Method::GET, "/api/v1/vms", None)
        .expect("request");
    assert_eq!(reply.status, StatusCode::OK);
    server.stop();
}

#[test]
fn live_socket_is_refused_and_left_working() {
    let f = start();
    let err = ApiServer::start(&f.socket, Arc::new(FakeHandler::new(&["vm0"])))
        .expect_err("a live socket must not be taken over");
    assert!(matches!(err, ApiError::InUse(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "API socket {} is in use by a running process",
            f.socket.display()
        )
    );
    assert_eq!(
        f.request(Method::GET, "/api/v1/vms", None).status,
        StatusCode::OK
    );
}

#[test]
fn a_regular_file_at_the_socket_path_is_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    std::fs::write(&path, b"not a socket").expect("write");
    let err = ApiServer::start(&path, Arc::new(FakeHandler::new(&["vm0"])))
        .expect_err("refuse to replace a regular file");
    assert!(matches!(err, ApiError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"not a socket");
}

#[test]
fn missing_directory_is_a_bind_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("no-such-dir/api.sock");
    let err =
        ApiServer::start(&path, Arc::new(FakeHandler::new(&["vm0"]))).expect_err("cannot bind");
    assert!(matches!(err, ApiError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-dir/api.sock"), "{err}");
}

#[test]
fn socket_is_owner_only_and_removed_on_stop() {
    let mut f = start();
    let mode = std::fs::metadata(&f.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // An open, idle connection must not keep stop() from returning.
    let _idle = UnixStream::connect(&f.socket).expect("connect");
    let server = f.server.take().expect("running");
    let start = Instant::now();
    server.stop();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        start.elapsed()
    );
    assert!(!f.socket.exists(), "socket file left behind");
    let err = UnixStream::connect(&f.socket).expect_err("nobody listens");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn socket_is_removed_when_the_server_is_dropped() {
    let mut f = start();
    drop(f.server.take());
    assert!(!f.socket.exists());
}

#[test]
fn stopping_does_not_remove_a_socket_that_replaced_ours() {
    let mut f = start();
    let server = f.server.take().expect("running");
    // Someone else's socket now sits at the path.
    std::fs::remove_file(&f.socket).expect("remove");
    let _other = UnixListener::bind(&f.socket).expect("bind");
    server.stop();
    assert!(
        f.socket.exists(),
        "removed a socket the server did not create"
    );
}

#[test]
fn the_socket_is_never_seen_with_more_than_owner_permissions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("api.sock");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(meta) = std::fs::symlink_metadata(&path) {
                    seen.insert(meta.permissions().mode() & 0o777);
                }
            }
            seen
        })
    };
    for _ in 0..300 {
        let server = ApiServer::start(&path, Arc::new(FakeHandler::new(&["vm0"]))).expect("start");
        server.stop();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    assert!(
        seen.contains(&0o600),
        "the watcher saw the socket: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        1,
        "modes seen (octal): {:?}",
        seen.iter().map(|m| format!("{m:o}")).collect::<Vec<_>>()
    );
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fd dir").count()
}

#[test]
fn thousands_of_connections_cost_the_server_at_most_its_cap() {
    let f = start();
    let before = open_fds();
    let clients: Vec<UnixStream> = (0..2000)
        .map(|_| UnixStream::connect(&f.socket).expect("connect"))
        .collect();
    // Let the server accept (and refuse) them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    for c in &clients {
        c.set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
    }
    while Instant::now() < deadline {
        refused = 0;
        for mut c in &clients {
            let mut buf = [0u8; 256];
            match c.read(&mut buf) {
                Ok(n) if n > 0 => {
                    assert!(buf.starts_with(b"HTTP/1.1 503"), "{:?}", &buf[..n]);
                    refused += 1;
                }
                Ok(_) => refused += 1,
                Err(_) => {}
            }
        }
        if refused >= 2000 - vmm::api::MAX_CONNECTIONS {
            break;
        }
    }
    let server_fds = open_fds() - before - clients.len();
    assert!(
        server_fds <= vmm::api::MAX_CONNECTIONS + 8,
        "the server holds {server_fds} descriptors for 2000 connections"
    );
    assert!(
        refused >= 2000 - vmm::api::MAX_CONNECTIONS,
        "{refused} refused"
    );
    drop(clients);
    // Once they are gone, the server answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = f.request(Method::GET, "/api/v1/vms", None);
        if reply.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", reply.status);
        std::thread::sleep(Duration::from_millis(20));
    }
}
