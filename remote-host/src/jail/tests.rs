//! Each case forks a child (namespaces are per process while it has one
//! thread; the test harness has many), enters the jail there and checks
//! what a subverted device would try; the child's exit code is the first
//! step that failed (0: all held).

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use super::*;
use crate::forked::in_child;

fn is_root() -> bool {
    // SAFETY: reads this process's effective uid.
    unsafe { libc::geteuid() == 0 }
}

/// Three directories: one to see read-write, one read-only, one that
/// must stay out of sight; each with a file; open to every user.
struct Dirs {
    rw: tempfile::TempDir,
    ro: tempfile::TempDir,
    secret: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let d = Dirs {
            rw: tempfile::tempdir().expect("tempdir"),
            ro: tempfile::tempdir().expect("tempdir"),
            secret: tempfile::tempdir().expect("tempdir"),
        };
        for (dir, name) in [(&d.rw, "a"), (&d.ro, "b"), (&d.secret, "s")] {
            std::fs::write(dir.path().join(name), name).expect("write");
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
        }
        d
    }

    fn view(&self) -> View {
        let mut read_only = vec![self.ro.path().to_path_buf()];
        read_only.extend(SYSTEM_LIBRARIES.iter().map(PathBuf::from));
        View {
            read_write: vec![self.rw.path().to_path_buf()],
            read_only,
        }
    }
}

/// What every jail must hold, from inside it: step number on failure.
fn checks(d: &Dirs, abstract_name: &str) -> i32 {
    if std::fs::read(d.rw.path().join("a")).ok().as_deref() != Some(b"a".as_slice()) {
        return 11;
    }
    if std::fs::write(d.rw.path().join("new"), b"n").is_err() {
        return 12;
    }
    if std::fs::read(d.ro.path().join("b")).ok().as_deref() != Some(b"b".as_slice()) {
        return 13;
    }
    match std::fs::write(d.ro.path().join("x"), b"x") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        _ => return 14,
    }
    for hidden in [d.secret.path().join("s"), PathBuf::from("/etc/passwd")] {
        match std::fs::read(&hidden) {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            _ => return 15,
        }
    }
    match std::fs::write("/escape", b"x") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        _ => return 16,
    }
    if std::env::current_dir().ok().as_deref() != Some(Path::new("/")) {
        return 17;
    }
    if std::fs::write("/dev/null", b"x").is_err() {
        return 18;
    }
    // The C library is where the loader looks (merged /usr or not).
    if ![
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    .iter()
    .any(|l| Path::new(l).exists())
    {
        return 19;
    }
    // The process's own descriptors, and nothing else of /proc.
    let Ok(f) = std::fs::File::open("/dev/zero") else {
        return 22;
    };
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&f)
    ));
    if link.ok().as_deref() != Some(Path::new("/dev/zero")) {
        return 23;
    }
    if Path::new("/proc/1").exists() || Path::new("/proc/self/environ").exists() {
        return 24;
    }
    // An abstract UNIX socket of the machine: another network namespace.
    let Ok(addr) = SocketAddr::from_abstract_name(abstract_name) else {
        return 20;
    };
    if UnixStream::connect_addr(&addr).is_ok() {
        return 21;
    }
    0
}

/// A listener on an abstract socket name outside the jail (the control:
/// reachable from a child without the jail).
fn abstract_listener(tag: &str) -> (UnixListener, String) {
    let name = format!("remote-host-jail-test-{tag}-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(&name).expect("abstract name");
    (UnixListener::bind_addr(&addr).expect("bind"), name)
}

#[test]
fn a_jailed_process_sees_its_view_only() {
    if !is_root() {
        eprintln!("skipped: the root variant needs root (the user namespace case runs below)");
        return;
    }
    let d = Dirs::new();
    let (_l, name) = abstract_listener("root");
    // The control: without the jail, everything the checks refuse works.
    let code = in_child(|| {
        let addr = SocketAddr::from_abstract_name(&name).expect("name");
        let reach = UnixStream::connect_addr(&addr).is_ok();
        let secret = std::fs::read(d.secret.path().join("s")).is_ok();
        if reach && secret {
            0
        } else {
            1
        }
    });
    assert_eq!(
        code, 0,
        "the control failed: the checks would prove nothing"
    );
    let code = in_child(|| match enter(&d.view(), None) {
        Ok(e) if !e.user_namespace => checks(&d, &name),
        Ok(_) => 2,
        Err(_) => 1,
    });
    assert_eq!(code, 0, "step {code} of the jail's checks failed");
}

#[test]
fn a_jailed_process_can_become_another_user() {
    if !is_root() {
        eprintln!("skipped: changing user needs root");
        return;
    }
    let d = Dirs::new();
    let private = d.rw.path().join("private");
    std::fs::write(&private, b"p").expect("write");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let nobody = Identity {
        uid: 65534,
        gid: 65534,
    };
    let code = in_child(|| {
        if enter(&d.view(), Some(nobody)).is_err() {
            return 1;
        }
        // SAFETY: reads this process's ids.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        if (uid, gid) != (65534, 65534) {
            return 2;
        }
        // Root's private file in the view: now out of reach.
        match std::fs::read(&private) {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
            _ => return 3,
        }
        // SAFETY: setuid(0) only changes this process's ids, if allowed.
        if unsafe { libc::setuid(0) } == 0 {
            return 4;
        }
        0
    });
    assert_eq!(code, 0, "step {code} of the change of user failed");
}

/// Started as an ordinary user, the jail makes a user namespace: the same
/// view, with no privilege on the machine.
#[test]
fn an_unprivileged_process_is_jailed_through_a_user_namespace() {
    let d = Dirs::new();
    let (_l, name) = abstract_listener("user");
    let code = in_child(|| {
        if is_root() {
            // SAFETY: drops this child's ids to nobody's.
            let r = unsafe {
                libc::setgroups(0, std::ptr::null());
                libc::setresgid(65534, 65534, 65534) | libc::setresuid(65534, 65534, 65534)
            };
            // A process started as that user is dumpable; one that
            // dropped to it is not until it says so (else its /proc files
            // stay root's and the id maps cannot be written).
            // SAFETY: prctl on this child only.
            if r != 0 || unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) } != 0 {
                return 1;
            }
        }
        match enter(&d.view(), None) {
            Ok(e) if e.user_namespace => checks(&d, &name),
            Ok(_) => 2,
            Err(JailError::Unshare { .. }) => 3,
            Err(e) => {
                eprintln!("jail: {e}");
                4
            }
        }
    });
    if code == 3 {
        eprintln!("skipped: this kernel refuses unprivileged user namespaces");
        return;
    }
    assert_eq!(code, 0, "step {code} of the jail's checks failed");
}

#[test]
fn identities_parse_from_names_and_numbers() {
    assert_eq!(
        Identity::parse("1000:100"),
        Ok(Identity {
            uid: 1000,
            gid: 100
        })
    );
    assert_eq!(Identity::parse("0").map(|i| i.uid), Ok(0));
    assert_eq!(Identity::parse("root"), Ok(Identity { uid: 0, gid: 0 }));
    assert!(Identity::parse("no-such-user-here")
        .unwrap_err()
        .contains("no such user"));
    assert!(Identity::parse("1:x").unwrap_err().contains("not a gid"));
}

#[test]
fn the_paths_a_device_names_are_found_in_its_settings() {
    let d = Dirs::new();
    let image = d.ro.path().join("b");
    let socket = d.rw.path().join("port.sock");
    let settings = format!(
        "output = \"relative.out\"\nsocket = {:?}\n[[drive]]\nfile = {:?}\nscsi-id = 0\n[[drive]]\nfile = \"/no/such/dir/x.img\"\n",
        socket.display().to_string(),
        image.display().to_string()
    );
    // The image itself; the socket (not made yet) through its directory;
    // relative paths are the config directory's, a missing directory none.
    let mut found = paths_in_settings(&settings);
    found.sort();
    let mut want = vec![d.rw.path().to_path_buf(), image];
    want.sort();
    assert_eq!(found, want);
    assert!(paths_in_settings("not toml [").is_empty());
}
