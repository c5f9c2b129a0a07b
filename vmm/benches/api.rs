//! Latency of `GET /api/v1/vms/{id}` through the real API server, 1,000 requests.
//!
//! Without arguments, starts an [`ApiServer`] on a temporary socket with the fake action
//! handler, so the figure is the cost of the HTTP and routing layers. With `--socket PATH`
//! it measures a running memvisor (`--vm ID` picks the VM, default `vm0`).
//!
//! Run: `bench/api` (or `cargo bench -p vmm --bench api -- [--socket PATH] [--vm ID]`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::Method;
use vmm::action::fake::FakeHandler;
use vmm::api::ApiServer;
use vmm::ctl::ApiClient;

const REQUESTS: usize = 1000;
const WARMUP: usize = 50;

struct Options {
    socket: Option<PathBuf>,
    vm: String,
}

fn options() -> anyhow::Result<Options> {
    let mut opts = Options {
        socket: None,
        vm: "vm0".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--socket" => opts.socket = Some(args.next().context("--socket needs a path")?.into()),
            "--vm" => opts.vm = args.next().context("--vm needs an id")?,
            other => bail!("unknown argument {other:?} (use --socket PATH, --vm ID)"),
        }
    }
    Ok(opts)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn measure(client: &mut ApiClient, path: &str, reconnect: bool) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(REQUESTS);
    for i in 0..WARMUP + REQUESTS {
        if reconnect {
            client.disconnect();
        }
        let start = Instant::now();
        let reply = client.request(Method::GET, path, None)?;
        let elapsed = start.elapsed();
        if !reply.status.is_success() {
            bail!("{path}: {} {}", reply.status, reply.error_text());
        }
        if i >= WARMUP {
            times.push(elapsed);
        }
    }
    times.sort();
    Ok(times)
}

fn report(label: &str, times: &[Duration]) {
    println!(
        "{label:<38} p50 {:>7.1} µs   p99 {:>7.1} µs   max {:>7.1} µs",
        percentile(times, 50.0).as_secs_f64() * 1e6,
        percentile(times, 99.0).as_secs_f64() * 1e6,
        times.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
    );
}

fn main() -> anyhow::Result<()> {
    let opts = options()?;
    let dir = tempfile::tempdir()?;
    let (socket, _server, target) = match opts.socket {
        Some(path) => (path, None, "running memvisor"),
        None => {
            let path = dir.path().join("api.sock");
            let server = ApiServer::start(&path, Arc::new(FakeHandler::new(&[&opts.vm])))?;
            (path, Some(server), "fake handler")
        }
    };
    let path = format!("/api/v1/vms/{}", opts.vm);
    let mut client = ApiClient::new(&socket)?;
    println!("GET {path}, {REQUESTS} requests after {WARMUP} warm-up, {target}");
    report(
        "one connection (keep-alive):",
        &measure(&mut client, &path, false)?,
    );
    report(
        "a new connection per request:",
        &measure(&mut client, &path, true)?,
    );
    Ok(())
}
