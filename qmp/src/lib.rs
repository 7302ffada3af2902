//! A QMP-compatible monitor server that the VMM embeds.
//!
//! QMP (the QEMU Machine Protocol) is JSON over a stream socket: the server
//! greets, the client negotiates capabilities with `qmp_capabilities`, then
//! sends `{"execute": NAME, "arguments": {...}, "id": ANY}` and gets
//! `{"return": ..., "id": ...}` or `{"error": {"class": ..., "desc": ...},
//! "id": ...}`; the server also sends asynchronous `{"event": ...}`
//! messages. Speaking it lets existing tools (the `qemu.qmp` Python
//! package, `qmp-shell`, libvirt-style scripts) drive our VMM.
//!
//! The embedding program implements [`Commands`]; [`Server`] does the
//! socket, the session and the errors of the protocol itself;
//! [`EventSender`] broadcasts events from any thread. `docs/qmp.md` has the
//! design and the commands the VMM maps.
//!
//! ```no_run
//! use std::sync::Arc;
//! use qmp::{Arguments, Commands, EventSender, QmpError, Server, ServerOptions};
//! use serde_json::{json, Map, Value};
//!
//! struct Vm;
//! impl Commands for Vm {
//!     fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
//!         match name {
//!             "query-status" => Ok(json!({"status": "running", "running": true})),
//!             "device_del" => Err(QmpError::device_not_found(args.str("id")?)),
//!             _ => Err(QmpError::command_not_found(name)),
//!         }
//!     }
//!     fn command_names(&self) -> Vec<String> {
//!         vec!["query-status".into(), "device_del".into()]
//!     }
//! }
//!
//! let events = EventSender::new();
//! let server = Server::bind_with("/run/vm1.qmp", Arc::new(Vm), ServerOptions::default(), events.clone())?;
//! events.emit("STOP", Value::Null);
//! server.shutdown();
//! # Ok::<(), std::io::Error>(())
//! ```

mod commands;
mod input;
mod server;

pub use commands::{Arguments, Commands, ErrorClass, QmpError};
pub use server::{EventSender, QemuVersion, Server, ServerOptions, BUILTIN_COMMANDS};
