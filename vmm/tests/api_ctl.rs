//! `memvisor ctl` against a real API server with the fake action handler (no KVM): what ctl prints for
//! each reply and refusal. What a real VM answers is tests/api.rs's.

use std::path::PathBuf;
use std::sync::Arc;

use vmm::action::fake::FakeHandler;
use vmm::action::{Action, ActionError, RunState, VmInfo};
use vmm::api::ApiServer;
use vmm::ctl::{run_ctl_to, CtlArgs, CtlCommand};

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    handler: Arc<FakeHandler>,
    _server: ApiServer,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("api.sock");
    let handler = Arc::new(FakeHandler::new(&["vm0"]));
    let server = ApiServer::start(&socket, handler.clone()).expect("server starts");
    Fixture {
        _dir: dir,
        socket,
        handler,
        _server: server,
    }
}

impl Fixture {
    fn ctl(&self, command: CtlCommand, json: bool) -> anyhow::Result<String> {
        let args = CtlArgs {
            api_socket: self.socket.clone(),
            json,
            command,
        };
        let mut out = Vec::new();
        run_ctl_to(&args, &mut out)?;
        Ok(String::from_utf8(out).expect("utf-8 output"))
    }
}

#[test]
fn info_prints_state_memory_and_config() {
    let f = start();
    let out = f
        .ctl(CtlCommand::Info { id: "vm0".into() }, false)
        .expect("info");
    assert_eq!(
        out,
        "vm0: running\n\
         \x20 memory:  boot 128 MiB, guest-visible 128 MiB, host resident 32 MiB\n\
         \x20 cpus:    1\n\
         \x20 kernel:  /guest/vmlinux\n\
         \x20 initrd:  /guest/initramfs.cpio.gz\n\
         \x20 cmdline: console=ttyS0 reboot=k panic=1 8250.nr_uarts=1\n"
    );
}

#[test]
fn json_prints_the_raw_body() {
    let f = start();
    let out = f
        .ctl(CtlCommand::Info { id: "vm0".into() }, true)
        .expect("info");
    let info: VmInfo = serde_json::from_str(&out).expect("raw JSON body");
    assert_eq!(info.id, "vm0");
    assert!(out.ends_with("}\n"), "{out:?}");
}

#[test]
fn vms_prints_a_table() {
    let f = start();
    let out = f.ctl(CtlCommand::Vms, false).expect("vms");
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("ID "), "{out}");
    let cols: Vec<_> = lines[1].split_whitespace().collect();
    assert_eq!(
        cols,
        ["vm0", "running", "1", "128", "MiB", "128", "MiB", "32", "MiB"]
    );
}

#[test]
fn pause_resume_and_shutdown_print_the_outcome() {
    let f = start();
    let out = f
        .ctl(CtlCommand::Pause { id: "vm0".into() }, false)
        .expect("pause");
    assert_eq!(out, "vm0: paused\n");
    let out = f
        .ctl(CtlCommand::Resume { id: "vm0".into() }, false)
        .expect("resume");
    assert_eq!(out, "vm0: running\n");
    let out = f
        .ctl(CtlCommand::Shutdown { id: "vm0".into() }, false)
        .expect("shutdown");
    assert_eq!(out, "vm0: shutdown requested\n");
    let actions: Vec<_> = f.handler.actions().into_iter().map(|(_, a)| a).collect();
    assert_eq!(
        actions,
        [
            Action::SetState(RunState::Paused),
            Action::SetState(RunState::Running),
            Action::Shutdown
        ]
    );
}

#[test]
fn metrics_prints_the_exposition_text() {
    let f = start();
    let out = f.ctl(CtlCommand::Metrics, false).expect("metrics");
    assert!(out.starts_with("# HELP "), "{out}");
    assert!(out.contains("memvisor_vm_exits_total{vm=\"vm0\""), "{out}");
}

#[test]
fn server_errors_become_one_line_with_the_error_text() {
    let f = start();
    let e = f
        .ctl(CtlCommand::Info { id: "vm9".into() }, false)
        .expect_err("unknown VM");
    assert_eq!(
        format!("{e:#}"),
        "no VM named \"vm9\" (404 Not Found for GET /api/v1/vms/vm9)"
    );
    f.handler
        .answer_next(Err(ActionError::Conflict("scripted conflict".into())));
    let e = f
        .ctl(CtlCommand::Resume { id: "vm0".into() }, false)
        .expect_err("refused");
    assert_eq!(
        format!("{e:#}"),
        "scripted conflict (409 Conflict for PUT /api/v1/vms/vm0/state)"
    );
}

#[test]
fn no_server_is_a_clear_connect_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = CtlArgs {
        api_socket: dir.path().join("absent.sock"),
        json: false,
        command: CtlCommand::Vms,
    };
    let e = run_ctl_to(&args, &mut Vec::new()).expect_err("no server");
    let text = format!("{e:#}");
    assert!(
        text.starts_with("cannot connect to the API socket ")
            && text.contains("absent.sock (is memvisor running with --api-socket?)"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
}
