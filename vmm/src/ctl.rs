//! `memvisor ctl --api-socket PATH <command>`: the client for every API call.
//!
//! The HTTP client is hyper's (`hyper::client::conn::http1`) over a tokio `UnixStream`: the same
//! crate that serves the API parses its responses, so there is no hand-written HTTP here. The
//! blocking crates that could do this (`ureq`, `attohttpc`) do not speak over Unix sockets.
//! [`ApiClient`] keeps its connection open between requests (the benchmark relies on that).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::action::{
    BalloonInfo, BalloonRequest, BalloonStatsInfo, ErrorBody, MemoryRequest, RunState,
    StateRequest, SwapRequest, VmInfo, VmList,
};

/// `memvisor ctl` arguments; the CLI embeds them as `Command::Ctl(CtlArgs)`.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// The API socket of the running memvisor (its --api-socket).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the response body as the server sent it.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// One API call.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// List the VMs with their state and memory.
    Vms,
    /// Show one VM: state, memory and configuration.
    Info {
        /// The VM's id.
        #[arg(default_value = "vm0")]
        id: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// The VM's id.
        #[arg(default_value = "vm0")]
        id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's id.
        #[arg(default_value = "vm0")]
        id: String,
    },
    /// Stop a VM; `memvisor run` then exits.
    Shutdown {
        /// The VM's id.
        #[arg(default_value = "vm0")]
        id: String,
    },
    /// Print the Prometheus metrics.
    Metrics,
    /// Set the balloon target (e.g. `balloon 64M`), or show target and actual size.
    Balloon {
        /// New target: how much memory the guest gives back (K/M/G suffix).
        size: Option<memory::ByteSize>,
        /// The VM's id.
        #[arg(long, default_value = "vm0")]
        id: String,
    },
    /// Show the guest's latest memory statistics from the balloon.
    BalloonStats {
        /// The VM's id.
        #[arg(default_value = "vm0")]
        id: String,
    },
    /// Sample the VM's page-sharing counts (KSM) now.
    Sharing {
        /// The VM's id.
        #[arg(default_value = "vm0")]
        id: String,
    },
    /// Show host-wide state: KSM settings and counters.
    Host,
    /// Ask the guest to have SIZE of virtio-mem memory plugged (e.g. `resize 256M`), or show
    /// the hotplug region with plugged and requested sizes.
    Resize {
        /// Requested plugged size (K/M/G suffix; 0 unplugs everything the guest can).
        size: Option<memory::ByteSize>,
        /// The VM's id.
        #[arg(long, default_value = "vm0")]
        id: String,
    },
    /// Swap the VM's RAM out until SIZE is in its swap file (`swap 0` brings everything back),
    /// waiting until done; without SIZE, show the swapper's state and counters.
    Swap {
        /// Target swapped size (K/M/G suffix).
        size: Option<memory::ByteSize>,
        /// Return once the work has started instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// The VM's id.
        #[arg(long, default_value = "vm0")]
        id: String,
    },
}

/// The request a command sends: method, path and JSON body.
pub fn command_request(command: &CtlCommand) -> (Method, String, Option<Vec<u8>>) {
    let state_body = |state| {
        // A StateRequest is a struct with one enum field: it always serializes.
        serde_json::to_vec(&StateRequest { state }).ok()
    };
    match command {
        CtlCommand::Vms => (Method::GET, "/api/v1/vms".into(), None),
        CtlCommand::Info { id } => (Method::GET, format!("/api/v1/vms/{id}"), None),
        CtlCommand::Pause { id } => (
            Method::PUT,
            format!("/api/v1/vms/{id}/state"),
            state_body(RunState::Paused),
        ),
        CtlCommand::Resume { id } => (
            Method::PUT,
            format!("/api/v1/vms/{id}/state"),
            state_body(RunState::Running),
        ),
        CtlCommand::Shutdown { id } => (Method::PUT, format!("/api/v1/vms/{id}/shutdown"), None),
        CtlCommand::Metrics => (Method::GET, "/metrics".into(), None),
        CtlCommand::Balloon {
            size: Some(size),
            id,
        } => (
            Method::PUT,
            format!("/api/v1/vms/{id}/balloon"),
            // A BalloonRequest is a struct with one integer: it always serializes.
            serde_json::to_vec(&BalloonRequest {
                target_mib: size.mib(),
            })
            .ok(),
        ),
        CtlCommand::Balloon { size: None, id } => {
            (Method::GET, format!("/api/v1/vms/{id}/balloon"), None)
        }
        CtlCommand::BalloonStats { id } => {
            (Method::GET, format!("/api/v1/vms/{id}/balloon/stats"), None)
        }
        CtlCommand::Sharing { id } => (Method::GET, format!("/api/v1/vms/{id}/sharing"), None),
        CtlCommand::Host => (Method::GET, "/api/v1/host".into(), None),
        CtlCommand::Resize {
            size: Some(size),
            id,
        } => (
            Method::PUT,
            format!("/api/v1/vms/{id}/memory"),
            serde_json::to_vec(&MemoryRequest {
                requested_mib: size.mib(),
            })
            .ok(),
        ),
        CtlCommand::Resize { size: None, id } => {
            (Method::GET, format!("/api/v1/vms/{id}/memory"), None)
        }
        CtlCommand::Swap {
            size: Some(size),
            id,
            ..
        } => (
            Method::PUT,
            format!("/api/v1/vms/{id}/swap"),
            serde_json::to_vec(&SwapRequest {
                target_mib: size.mib(),
            })
            .ok(),
        ),
        CtlCommand::Swap { size: None, id, .. } => {
            (Method::GET, format!("/api/v1/vms/{id}/swap"), None)
        }
    }
}

/// How often `ctl swap SIZE` polls until the swapper is done.
const SWAP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a `memvisor ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API could not be reached or the exchange failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The API refused the request.
    #[error("{message} ({status} for {method} {path})")]
    Refused {
        /// The API's error text.
        message: String,
        /// The HTTP status.
        status: StatusCode,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
    },
    /// The reply was not what the command expects.
    #[error("unexpected reply to {method} {path}")]
    UnexpectedReply {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// Why it could not be read.
        #[source]
        source: serde_json::Error,
    },
    /// The output could not be written.
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
}

fn refused(reply: &HttpReply, method: &Method, path: &str) -> CtlError {
    CtlError::Refused {
        message: reply.error_text(),
        status: reply.status,
        method: method.clone(),
        path: path.to_owned(),
    }
}

/// Runs one `memvisor ctl` command, printing to stdout.
pub fn run_ctl(args: &CtlArgs) -> Result<(), CtlError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_ctl_to(args, &mut out)
}

/// Runs one `memvisor ctl` command, printing to `out`.
pub fn run_ctl_to(args: &CtlArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let mut client = ApiClient::new(&args.api_socket)?;
    let (method, path, body) = command_request(&args.command);
    let mut reply = client.request(method.clone(), &path, body)?;
    if !reply.status.is_success() {
        return Err(refused(&reply, &method, &path));
    }
    if let CtlCommand::Swap {
        size: Some(_),
        no_wait: false,
        ..
    } = &args.command
    {
        // The swap-out runs in the background: poll until the swapper is idle again.
        while serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v.get("busy").and_then(serde_json::Value::as_bool))
            .unwrap_or(false)
        {
            std::thread::sleep(SWAP_POLL);
            reply = client.request(Method::GET, &path, None)?;
            if !reply.status.is_success() {
                return Err(refused(&reply, &Method::GET, &path));
            }
        }
    }
    if args.json {
        out.write_all(&reply.body)?;
        if !reply.body.is_empty() && !reply.body.ends_with(b"\n") {
            out.write_all(b"\n")?;
        }
        return Ok(());
    }
    let text = render(&args.command, &reply).map_err(|source| CtlError::UnexpectedReply {
        method,
        path,
        source,
    })?;
    out.write_all(text.as_bytes())?;
    Ok(())
}

fn mib(n: u64) -> String {
    format!("{n} MiB")
}

/// The readable output for a successful reply: one arm per command, each a few lines of
/// formatting (its length grows with the commands, not with its logic).
fn render(command: &CtlCommand, reply: &HttpReply) -> Result<String, serde_json::Error> {
    Ok(match command {
        CtlCommand::Vms => {
            let list: VmList = serde_json::from_slice(&reply.body)?;
            let mut s = format!(
                "{:<12} {:<8} {:>5} {:>10} {:>10} {:>10}\n",
                "ID", "STATE", "CPUS", "BOOT", "VISIBLE", "RESIDENT"
            );
            for vm in &list.vms {
                s += &format!(
                    "{:<12} {:<8} {:>5} {:>10} {:>10} {:>10}\n",
                    vm.id,
                    vm.state.to_string(),
                    vm.config.cpus,
                    mib(vm.memory.boot_mib),
                    mib(vm.memory.guest_visible_mib),
                    mib(vm.memory.host_resident_mib)
                );
            }
            s
        }
        CtlCommand::Info { .. } => {
            let vm: VmInfo = serde_json::from_slice(&reply.body)?;
            let c = &vm.config;
            let mut s = format!("{}: {}\n", vm.id, vm.state);
            s += &format!(
                "  memory:  boot {}, guest-visible {}, host resident {}\n",
                mib(vm.memory.boot_mib),
                mib(vm.memory.guest_visible_mib),
                mib(vm.memory.host_resident_mib)
            );
            let m = &vm.memory;
            if m.ballooned_mib + m.plugged_mib + m.swapped_mib > 0 {
                s += &format!(
                    "           ballooned {}, plugged {}, swapped {}\n",
                    mib(m.ballooned_mib),
                    mib(m.plugged_mib),
                    mib(m.swapped_mib)
                );
            }
            s += &format!("  cpus:    {}\n", c.cpus);
            s += &format!("  kernel:  {}\n", c.kernel.display());
            if let Some(initrd) = &c.initrd {
                s += &format!("  initrd:  {}\n", initrd.display());
            }
            s += &format!("  cmdline: {}\n", c.base_cmdline());
            s
        }
        CtlCommand::Pause { .. } | CtlCommand::Resume { .. } => {
            let vm: VmInfo = serde_json::from_slice(&reply.body)?;
            format!("{}: {}\n", vm.id, vm.state)
        }
        CtlCommand::Shutdown { id } => format!("{id}: shutdown requested\n"),
        CtlCommand::Metrics => String::from_utf8_lossy(&reply.body).into_owned(),
        CtlCommand::Balloon { id, .. } => {
            let b: BalloonInfo = serde_json::from_slice(&reply.body)?;
            format!(
                "{id}: balloon target {}, actual {}\n",
                mib(b.target_mib),
                mib(b.actual_mib)
            )
        }
        CtlCommand::Resize { id, .. } => {
            let m: hotplug::VirtioMemStatus = serde_json::from_slice(&reply.body)?;
            format!(
                "{id}: plugged {}, requested {} (region {} at {:#x}, blocks of {} KiB{})\n",
                mib(m.plugged_mib),
                mib(m.requested_mib),
                mib(m.region_size_mib),
                m.region_addr,
                m.block_size_bytes >> 10,
                if m.driver_active {
                    ""
                } else {
                    ", no guest driver yet"
                }
            )
        }
        CtlCommand::Swap { id, .. } => {
            let mut value: serde_json::Value = serde_json::from_slice(&reply.body)?;
            // The transition history is for scripts (`--json`); one line per field here.
            if let Some(map) = value.as_object_mut() {
                map.remove("transitions");
            }
            let mut s = format!("{id}: swap\n");
            render_json(&value, 1, &mut s);
            s
        }
        CtlCommand::Sharing { .. } | CtlCommand::Host => {
            let value: serde_json::Value = serde_json::from_slice(&reply.body)?;
            let mut s = String::new();
            render_json(&value, 0, &mut s);
            s
        }
        CtlCommand::BalloonStats { id } => {
            let b: BalloonStatsInfo = serde_json::from_slice(&reply.body)?;
            let mut s = match b.age_ms {
                Some(ms) => format!("{id}: guest memory statistics, {} s old\n", ms / 1000),
                None => format!("{id}: the guest has not reported statistics\n"),
            };
            for (name, value) in &b.stats {
                s += &format!("  {name:<24} {value}\n");
            }
            s
        }
    })
}

/// A JSON document as indented `key: value` lines.
fn render_json(value: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if v.is_object() {
                    out.push_str(&format!("{pad}{k}:\n"));
                    render_json(v, indent + 1, out);
                } else {
                    out.push_str(&format!("{pad}{k}: {}\n", scalar(v)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket, or it cannot be opened.
    #[error("cannot connect to the API socket {path} (is memvisor running with --api-socket?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be built (for example, a VM id that is not valid in a path).
    #[error("invalid request for {0}")]
    Request(String, #[source] hyper::http::Error),
    /// The HTTP exchange failed.
    #[error("the API request failed")]
    Http(#[source] hyper::Error),
    /// The client's runtime could not be created.
    #[error("cannot start the API client")]
    Runtime(#[source] std::io::Error),
}

/// A response as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReply {
    /// The status.
    pub status: StatusCode,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The server's `error` text, or the body's first line when it is not an error body.
    pub fn error_text(&self) -> String {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => e.error,
            Err(_) => String::from_utf8_lossy(&self.body)
                .lines()
                .next()
                .filter(|l| !l.trim().is_empty())
                .unwrap_or("no error text")
                .to_owned(),
        }
    }
}

/// A blocking client of the API socket that reuses its connection.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl ApiClient {
    /// A client for the API at `socket`. Connects on the first request.
    pub fn new(socket: &Path) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(ApiClient {
            socket: socket.to_path_buf(),
            runtime,
            sender: None,
        })
    }

    /// Closes the connection; the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.sender = None;
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<HttpReply, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request(path.to_owned(), e))?;
        let socket = self.socket.clone();
        let cached = self.sender.take().filter(|s| !s.is_closed());
        let (reply, sender) = self.runtime.block_on(async move {
            let mut sender = match cached {
                Some(s) => s,
                None => connect(&socket).await?,
            };
            sender.ready().await.map_err(ClientError::Http)?;
            let response = sender
                .send_request(request)
                .await
                .map_err(ClientError::Http)?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(ClientError::Http)?
                .to_bytes()
                .to_vec();
            Ok::<_, ClientError>((
                HttpReply {
                    status,
                    content_type,
                    body,
                },
                sender,
            ))
        })?;
        self.sender = Some(sender);
        Ok(reply)
    }
}

async fn connect(socket: &Path) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("API client connection ended: {e}");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> CtlArgs {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .expect("valid arguments")
            .ctl
    }

    #[test]
    fn vm_id_defaults_to_vm0() {
        let a = parse(&["--api-socket", "/s", "pause"]);
        assert_eq!(a.command, CtlCommand::Pause { id: "vm0".into() });
        let a = parse(&["--api-socket", "/s", "info", "vm3"]);
        assert_eq!(a.command, CtlCommand::Info { id: "vm3".into() });
    }

    #[test]
    fn json_flag_goes_before_or_after_the_command() {
        assert!(parse(&["--api-socket", "/s", "--json", "vms"]).json);
        assert!(parse(&["--api-socket", "/s", "vms", "--json"]).json);
        assert!(!parse(&["--api-socket", "/s", "vms"]).json);
    }

    #[test]
    fn api_socket_is_required() {
        assert!(Cli::try_parse_from(["ctl", "vms"]).is_err());
    }

    #[test]
    fn commands_map_to_routes() {
        let (m, p, b) = command_request(&CtlCommand::Resume { id: "vm1".into() });
        assert_eq!((m, p.as_str()), (Method::PUT, "/api/v1/vms/vm1/state"));
        assert_eq!(b.as_deref(), Some(&br#"{"state":"running"}"#[..]));
        let (m, p, b) = command_request(&CtlCommand::Shutdown { id: "vm0".into() });
        assert_eq!(
            (m, p.as_str(), b),
            (Method::PUT, "/api/v1/vms/vm0/shutdown", None)
        );
        for command in [
            CtlCommand::Vms,
            CtlCommand::Info { id: "vm0".into() },
            CtlCommand::Pause { id: "vm0".into() },
            CtlCommand::Metrics,
        ] {
            let (m, p, _) = command_request(&command);
            assert!(
                crate::api::routes::match_route(m.as_str(), &p).is_ok(),
                "{command:?} -> {m} {p} has no route"
            );
        }
    }

    #[test]
    fn error_text_prefers_the_error_field() {
        let reply = HttpReply {
            status: StatusCode::NOT_FOUND,
            content_type: None,
            body: br#"{"error": "no VM named \"vm9\""}"#.to_vec(),
        };
        assert_eq!(reply.error_text(), "no VM named \"vm9\"");
        let reply = HttpReply {
            body: b"plain failure\nmore".to_vec(),
            ..reply
        };
        assert_eq!(reply.error_text(), "plain failure");
    }
}
