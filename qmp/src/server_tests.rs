use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::thread;

use serde_json::{json, Map, Value};

use super::*;
use crate::commands::{Arguments, Commands, QmpError};

struct TestVm {
    events: EventSender,
    executed: AtomicUsize,
}

impl Commands for TestVm {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        self.executed.fetch_add(1, Ordering::SeqCst);
        match name {
            "query-status" => {
                args.allow_only(&[])?;
                Ok(json!({"status": "running", "running": true}))
            }
            "device_del" => {
                args.allow_only(&["id"])?;
                let id = args.str("id")?;
                Err(QmpError::device_not_found(id))
            }
            "echo" => Ok(Value::Object(args.clone())),
            "sleep" => {
                thread::sleep(Duration::from_millis(args.u64("ms")?));
                Ok(json!({}))
            }
            "boom" => panic!("the command panics"),
            "emit" => {
                let n = self.events.emit(args.str("name")?, json!({"n": 1}));
                Ok(json!({ "clients": n }))
            }
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    fn command_names(&self) -> Vec<String> {
        [
            "query-status",
            "device_del",
            "echo",
            "sleep",
            "boom",
            "emit",
        ]
        .map(String::from)
        .to_vec()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Option<Server>,
    vm: Arc<TestVm>,
}

fn fixture_with(options: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let events = EventSender::new();
    let vm = Arc::new(TestVm {
        events: events.clone(),
        executed: AtomicUsize::new(0),
    });
    let server = Server::bind_with(&path, vm.clone(), options, events).unwrap();
    Fixture {
        _dir: dir,
        path,
        server: Some(server),
        vm,
    }
}

fn fixture() -> Fixture {
    fixture_with(ServerOptions::default())
}

impl Fixture {
    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    /// Connects, checks the greeting and negotiates.
    fn negotiated(path: &Path) -> Client {
        let mut c = Client::connect(path);
        assert!(c.recv().get("QMP").is_some());
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn send(&mut self, v: Value) {
        self.send_raw(format!("{v}\n").as_bytes());
    }

    /// The next message, or `None` at end of stream.
    fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
        }
    }

    fn recv(&mut self) -> Value {
        self.try_recv().expect("server hung up")
    }

    fn cmd(&mut self, v: Value) -> Value {
        self.send(v);
        self.recv()
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn with_id(mut v: Value, id: Value) -> Value {
    v.as_object_mut().unwrap().insert("id".into(), id);
    v
}

#[test]
fn greeting() {
    let f = fixture();
    let mut c = Client::connect(&f.path);
    let g = c.recv();
    assert_eq!(
        g,
        json!({"QMP": {
            "version": {
                "qemu": {"micro": 0, "minor": 0, "major": 0},
                "package": format!("rust-vmm-remote qmp-{}", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }})
    );
}

#[test]
fn negotiation() {
    let f = fixture();
    let mut c = Client::connect(&f.path);
    c.recv();
    assert_eq!(
        c.cmd(json!({"execute": "query-status", "id": 1})),
        with_id(
            error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            ),
            json!(1)
        )
    );
    // Even a command that does not exist, and the built-in ones.
    for name in ["frob", "query-commands"] {
        assert_eq!(
            c.cmd(json!({ "execute": name })),
            error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        );
    }
    assert_eq!(f.vm.executed.load(Ordering::SeqCst), 0);
    // Malformed requests keep their own errors.
    assert_eq!(
        c.cmd(json!({"execute": 5})),
        error(
            "GenericError",
            "QMP input member 'execute' must be a string"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})),
        error("GenericError", "Capability oob not available")
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}})),
        error(
            "GenericError",
            "Parameter 'enable[0]' does not accept value 'x'"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"bogus": 1}})),
        error("GenericError", "Parameter 'bogus' is unexpected")
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {}, "id": "neg"})),
        json!({"return": {}, "id": "neg"})
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"})),
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "query-status"})),
        json!({"return": {"status": "running", "running": true}})
    );
}

#[test]
fn dispatch_and_ids() {
    let f = fixture();
    let mut c = Client::negotiated(&f.path);
    for id in [
        json!(7),
        json!("abc"),
        json!({"nested": [1, 2]}),
        json!(null),
        json!(1.5),
    ] {
        assert_eq!(
            c.cmd(json!({"execute": "query-status", "id": id})),
            json!({"return": {"status": "running", "running": true}, "id": id})
        );
    }
    assert_eq!(
        c.cmd(json!({"execute": "echo", "arguments": {"a": [1, {"b": null}]}})),
        json!({"return": {"a": [1, {"b": null}]}})
    );
    let names: Vec<String> = c.cmd(json!({"execute": "query-commands"}))["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for n in BUILTIN_COMMANDS
        .iter()
        .copied()
        .chain(["query-status", "device_del", "echo"])
    {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    assert_eq!(
        c.cmd(json!({"execute": "query-version"})),
        json!({"return": {
            "qemu": {"micro": 0, "minor": 0, "major": 0},
            "package": format!("rust-vmm-remote qmp-{}", env!("CARGO_PKG_VERSION")),
        }})
    );
}

#[test]
fn errors() {
    let f = fixture();
    let mut c = Client::negotiated(&f.path);
    let cases = [
        (
            json!({"execute": "frob", "id": 1}),
            with_id(
                error("CommandNotFound", "The command frob has not been found"),
                json!(1),
            ),
        ),
        (
            json!({"execute": "device_del", "id": 2}),
            with_id(error("GenericError", "Parameter 'id' is missing"), json!(2)),
        ),
        (
            json!({"execute": "device_del", "arguments": {"id": 3}}),
            error(
                "GenericError",
                "Invalid parameter type for 'id', expected: string",
            ),
        ),
        (
            json!({"execute": "device_del", "arguments": {"id": "x", "force": true}}),
            error("GenericError", "Parameter 'force' is unexpected"),
        ),
        (
            json!({"execute": "device_del", "arguments": {"id": "lsi9"}}),
            error("DeviceNotFound", "Device 'lsi9' not found"),
        ),
        (
            json!({"execute": "query-commands", "arguments": {"x": 1}}),
            error("GenericError", "Parameter 'x' is unexpected"),
        ),
        (
            json!([1, 2]),
            error("GenericError", "QMP input must be a JSON object"),
        ),
        (
            json!("query-status"),
            error("GenericError", "QMP input must be a JSON object"),
        ),
        (
            json!({"id": 4}),
            with_id(
                error("GenericError", "QMP input lacks member 'execute'"),
                json!(4),
            ),
        ),
        (
            json!({"execute": "echo", "arguments": [1]}),
            error(
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ),
        (
            json!({"execute": "echo", "extra": 1}),
            error("GenericError", "QMP input member 'extra' is unexpected"),
        ),
        (
            json!({"exec-oob": "query-status", "id": 5}),
            with_id(
                error("GenericError", "QMP input member 'exec-oob' is unexpected"),
                json!(5),
            ),
        ),
        (
            json!({"execute": "boom", "id": 6}),
            with_id(
                error("GenericError", "Internal error: the command failed"),
                json!(6),
            ),
        ),
    ];
    for (req, want) in cases {
        assert_eq!(c.cmd(req.clone()), want, "request {req}");
    }
    // Still usable after all of that (the panic included).
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["running"],
        true
    );
}

#[test]
fn malformed_json_keeps_the_connection() {
    let f = fixture();
    let mut c = Client::negotiated(&f.path);
    for bad in [
        &b"{\"execute\": query-status}\n"[..],
        b"nonsense\n",
        b"{\"a\": \xff\xfe}\n",
        b"{\"execute\": \"query-status\",,}\n",
    ] {
        c.send_raw(bad);
        let r = c.recv();
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with("JSON parse error, "), "{desc}");
        assert!(r.get("id").is_none());
        assert_eq!(
            c.cmd(json!({"execute": "query-status", "id": "after"}))["id"],
            "after"
        );
    }
    // Requests split over writes and several in one write.
    c.send_raw(b"{\"execute\": \"query-");
    thread::sleep(Duration::from_millis(50));
    c.send_raw(b"status\", \"id\": 1}{\"execute\": \"query-status\", \"id\": 2}\n");
    assert_eq!(c.recv()["id"], 1);
    assert_eq!(c.recv()["id"], 2);
}

#[test]
fn oversized_input_closes_only_that_client() {
    let f = fixture_with(ServerOptions {
        max_input: 64 * 1024,
        ..ServerOptions::default()
    });
    let mut good = Client::negotiated(&f.path);
    let mut bad = Client::negotiated(&f.path);
    let mut payload = b"{\"execute\": \"echo\", \"arguments\": {\"x\": \"".to_vec();
    payload.extend(std::iter::repeat_n(b'a', 200 * 1024));
    // The server may hang up before all of it is written.
    let _ = bad.writer.write_all(&payload);
    assert_eq!(bad.try_recv(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.server().client_count() != 1 {
        assert!(Instant::now() < deadline, "client not dropped");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        good.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
    // A large but complete request within the limit is fine.
    let big = "b".repeat(60 * 1024);
    assert_eq!(
        good.cmd(json!({"execute": "echo", "arguments": {"x": big}}))["return"]["x"],
        json!(big)
    );
}

#[test]
fn events_reach_negotiated_clients_only() {
    let f = fixture();
    let events = f.server().events();
    let mut a = Client::negotiated(&f.path);
    let mut b = Client::negotiated(&f.path);
    let mut pending = Client::connect(&f.path);
    pending.recv();
    // Wait until the server has registered all three.
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.server().client_count() != 3 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // From another thread, as the VMM's supervision thread would.
    let n = thread::spawn(move || events.emit("REMOTE_DIED", json!({"id": "storage", "pid": 42})))
        .join()
        .unwrap();
    assert_eq!(n, 2);
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "REMOTE_DIED");
        assert_eq!(e["data"], json!({"id": "storage", "pid": 42}));
        let s = e["timestamp"]["seconds"].as_u64().unwrap();
        assert!(s >= before && s < before + 60);
        assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    // An event without data has no data member.
    f.server().events().emit("STOP", Value::Null);
    let e = a.recv();
    assert_eq!(e["event"], "STOP");
    assert!(e.get("data").is_none());
    b.recv();
    // The unnegotiated client saw nothing: its next message is the reply.
    assert_eq!(
        pending.cmd(json!({"execute": "qmp_capabilities", "id": 1})),
        json!({"return": {}, "id": 1})
    );
    // A command that emits: the event follows or precedes its reply, both
    // arrive, and the other client gets the event too.
    a.send(json!({"execute": "emit", "arguments": {"name": "TEST"}, "id": "e"}));
    let mut got = [a.recv(), a.recv()];
    got.sort_by_key(|v| v.get("event").is_some());
    assert_eq!(got[0], json!({"return": {"clients": 3}, "id": "e"}));
    assert_eq!(got[1]["event"], "TEST");
    assert_eq!(b.recv()["event"], "TEST");
    assert_eq!(pending.recv()["event"], "TEST");
}

#[test]
fn concurrent_clients() {
    let f = fixture();
    let path = f.path.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let path = path.clone();
            thread::spawn(move || {
                let mut c = Client::negotiated(&path);
                // Pipeline 50 requests, then read the replies in order.
                for i in 0..50 {
                    c.send(json!({"execute": "echo", "arguments": {"t": t, "i": i}, "id": [t, i]}));
                }
                for i in 0..50 {
                    let r = c.recv();
                    assert_eq!(r["id"], json!([t, i]));
                    assert_eq!(r["return"], json!({"t": t, "i": i}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A slow command delays only its own client.
    let mut slow = Client::negotiated(&f.path);
    let mut fast = Client::negotiated(&f.path);
    slow.send(json!({"execute": "sleep", "arguments": {"ms": 6000}}));
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    assert_eq!(
        fast.cmd(json!({"execute": "query-status"}))["return"]["running"],
        true
    );
    assert!(t0.elapsed() < Duration::from_secs(4));
    assert_eq!(slow.recv(), json!({"return": {}}));
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_emit_never_blocks() {
    let f = fixture_with(ServerOptions {
        max_queued: 4,
        ..ServerOptions::default()
    });
    let _deaf = Client::negotiated(&f.path);
    let mut ok = Client::negotiated(&f.path);
    // How many events the reading client has taken. The emitter never runs
    // more than two ahead of it, so the reader's queue (4) can never fill,
    // however the threads are scheduled: only the deaf client can be dropped.
    let taken = Arc::new(AtomicU64::new(0));
    let taken2 = taken.clone();
    let reader = thread::spawn(move || {
        let mut n = 0u64;
        loop {
            let e = ok.recv();
            if e["event"] == "END" {
                return n;
            }
            assert_eq!(e["data"]["i"], n, "events out of order");
            n += 1;
            taken2.store(n, Ordering::Release);
        }
    });
    let events = f.server().events();
    let t0 = Instant::now();
    let mut i = 0u64;
    while f.server().client_count() == 2 {
        while i >= taken.load(Ordering::Acquire) + 2 {
            assert!(t0.elapsed() < Duration::from_secs(60), "reader stalled");
            thread::yield_now();
        }
        let t = Instant::now();
        events.emit("FLOOD", json!({"i": i, "pad": "x".repeat(200)}));
        assert!(t.elapsed() < Duration::from_secs(4), "emit blocked");
        i += 1;
        assert!(t0.elapsed() < Duration::from_secs(60), "deaf client kept");
    }
    // The deaf client was dropped only once its queue (4) was full: how many
    // more its socket buffer absorbed first depends on when its writer
    // thread ran, so only the queue is a bound.
    assert!(i > 4, "dropped after {i} events");
    assert_eq!(events.emit("END", Value::Null), 1);
    assert_eq!(reader.join().unwrap(), i);
}

#[test]
fn max_clients() {
    let f = fixture_with(ServerOptions {
        max_clients: 2,
        ..ServerOptions::default()
    });
    let _a = Client::negotiated(&f.path);
    let _b = Client::negotiated(&f.path);
    let mut c = Client::connect(&f.path);
    assert_eq!(c.try_recv(), None);
}

#[test]
fn socket_path_handling() {
    let dir = tempfile::tempdir().unwrap();
    let vm = || {
        Arc::new(TestVm {
            events: EventSender::new(),
            executed: AtomicUsize::new(0),
        })
    };
    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = Server::bind(&stale, vm()).unwrap();
    let mode = fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // It was bound in a private directory and moved into place: nothing
    // of that is left beside it.
    let beside: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["stale.sock"]);
    // A live one is refused, and left alone.
    let e = Server::bind(&stale, vm()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    Client::negotiated(&stale);
    // Shutdown removes the socket.
    server.shutdown();
    assert!(!stale.exists());
    // A regular file is refused and kept.
    let file = dir.path().join("file");
    fs::write(&file, "keep").unwrap();
    let e = Server::bind(&file, vm()).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    // A socket replaced by someone else after bind is not removed by us.
    let taken = dir.path().join("taken.sock");
    let server = Server::bind(&taken, vm()).unwrap();
    fs::remove_file(&taken).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&taken).unwrap();
    drop(server);
    assert!(taken.exists());
    drop(other);
}

#[test]
fn shutdown_finishes_running_commands_and_flushes_replies() {
    // A shutdown timeout far beyond the command, so that a slow machine
    // does not turn "waits for the command" into "gave up waiting".
    let mut f = fixture_with(ServerOptions {
        shutdown_timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    });
    let mut c = Client::negotiated(&f.path);
    c.send(json!({"execute": "sleep", "arguments": {"ms": 300}, "id": "last"}));
    thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    f.server.take().unwrap().shutdown();
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(c.recv(), json!({"return": {}, "id": "last"}));
    assert_eq!(c.try_recv(), None);
    assert!(!f.path.exists());
    assert_eq!(f.vm.events.emit("LATE", Value::Null), 0);
}

#[test]
fn no_event_overtakes_the_negotiation_reply() {
    // Room for the clients of earlier rounds that the server has not yet
    // seen hang up.
    // The test is about order, not back-pressure: queues deep enough that
    // a client thread the scheduler leaves waiting is not cut off as slow.
    let f = fixture_with(ServerOptions {
        max_clients: 64,
        max_queued: 1 << 16,
        ..ServerOptions::default()
    });
    let events = f.server().events();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                events.emit("TICK", Value::Null);
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    for _ in 0..30 {
        let mut c = Client::connect(&f.path);
        assert!(c.recv().get("QMP").is_some());
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities", "id": "n"})),
            json!({"return": {}, "id": "n"})
        );
        // Events do flow afterwards.
        assert_eq!(c.recv()["event"], "TICK");
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
}

#[test]
fn handles_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Server>();
    send_sync::<EventSender>();
    send_sync::<QmpError>();
}
