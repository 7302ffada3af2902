//! A toy VM behind the QMP monitor, for trying the protocol with any QMP
//! client and for the `qemu.qmp` interoperability test.
//!
//! ```text
//! cargo run -p qmp --example qmp_demo -- /tmp/demo.qmp
//! python3 -m qemu.qmp.qmp_shell /tmp/demo.qmp     # or socat - UNIX:/tmp/demo.qmp
//! ```
//!
//! Commands: `query-status`, `emit-test-event [tag: str]` (emits
//! `TEST_EVENT` with `{"tag": TAG}` to every client), `quit` (replies,
//! emits `SHUTDOWN`, closes the monitor and exits 0), plus the server's
//! own `qmp_capabilities`, `query-commands`, `query-version`.

use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use qmp::{Arguments, Commands, EventSender, QmpError, Server, ServerOptions};
use serde_json::{json, Map, Value};

struct ToyVm {
    events: EventSender,
    quit: Mutex<Sender<()>>,
}

impl Commands for ToyVm {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "query-status" => {
                args.allow_only(&[])?;
                Ok(json!({"status": "running", "running": true}))
            }
            "emit-test-event" => {
                args.allow_only(&["tag"])?;
                let tag = args.opt_str("tag")?.unwrap_or("");
                self.events.emit("TEST_EVENT", json!({ "tag": tag }));
                Ok(json!({}))
            }
            "quit" => {
                args.allow_only(&[])?;
                // Only ask: the main thread shuts the server down, which
                // waits for this reply to be written.
                let _ = self
                    .quit
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send(());
                Ok(json!({}))
            }
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    fn command_names(&self) -> Vec<String> {
        ["query-status", "emit-test-event", "quit"]
            .map(String::from)
            .to_vec()
    }
}

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: qmp_demo SOCKET");
        return ExitCode::from(2);
    };
    let events = EventSender::new();
    let (quit_tx, quit_rx) = channel();
    let vm = Arc::new(ToyVm {
        events: events.clone(),
        quit: Mutex::new(quit_tx),
    });
    let options = ServerOptions {
        package: "rust-vmm-remote qmp_demo".into(),
        ..ServerOptions::default()
    };
    let server = match Server::bind_with(&path, vm, options, events.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qmp_demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("qmp_demo: listening on {}", server.path().display());
    let _ = quit_rx.recv();
    events.emit(
        "SHUTDOWN",
        json!({"guest": false, "reason": "host-qmp-quit"}),
    );
    server.shutdown();
    println!("qmp_demo: quit");
    ExitCode::SUCCESS
}
