use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/vm/test.toml"))
}

fn err(text: &str) -> (usize, usize, String) {
    match parse(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(ConfigError::Invalid { location, message }) => {
            (location.line, location.column, message)
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

const GOOD: &str = r#"
[vm]
memory = "512M"
vcpus = 2
kernel = "vmlinuz"
cmdline = "console=ttyS0 quiet"

[[remote]]
id = "storage"
log = "/var/log/storage.log"

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4
[[device.drive]]
file = "disk.img"
scsi-id = 0

[[device]]
id = "dma"
in-process = true
plugin = "dma-example"
slot = 5
"#;

#[test]
fn good_config_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.vm.as_ref().unwrap().memory_bytes, 512 << 20);
    assert_eq!(c.vm.as_ref().unwrap().vcpus, 2);
    assert_eq!(
        c.vm.as_ref().unwrap().kernel,
        PathBuf::from("/etc/vm/vmlinuz")
    );
    assert_eq!(c.remotes[0].protocol, Protocol::VfioUser);
    assert_eq!(c.remotes[0].timeout_ms, 1000);
    assert_eq!(c.devices[0].placement, Placement::Remote("storage".into()));
    assert_eq!(c.devices[1].placement, Placement::InProcess);
    assert_eq!(c.devices_of_remote("storage").count(), 1);
    // The plugin's own table is handed on as TOML, placement keys removed.
    let settings: toml_edit::DocumentMut = c.devices[0].settings.parse().unwrap();
    assert!(settings.get("id").is_none());
    let drive = &settings["drive"][0];
    assert_eq!(drive["file"].as_str(), Some("disk.img"));
    assert_eq!(drive["scsi-id"].as_integer(), Some(0));
}

#[test]
fn syntax_error_has_position() {
    let (line, col, msg) = err("[vm]\nmemory = \"512M\nkernel = 1\n");
    assert_eq!(line, 2, "{msg}");
    assert!(col >= 10, "{col} {msg}");
}

#[test]
fn unknown_key_is_reported_at_the_key() {
    let text = "[vm]\nmemory = \"64M\"\nkernel = \"k\"\n  memroy = 3\n";
    let (line, col, msg) = err(text);
    assert_eq!((line, col), (4, 3));
    assert!(msg.contains("unknown key `memroy`"), "{msg}");
}

#[test]
fn unknown_top_level_section() {
    let (line, _, msg) = err("[vm]\nmemory = \"64M\"\nkernel = \"k\"\n[network]\nx = 1\n");
    assert_eq!(line, 4);
    assert!(msg.contains("unknown key `network`"), "{msg}");
}

#[test]
fn wrong_type_is_reported_at_the_value() {
    let (line, col, msg) = err("[vm]\nmemory = \"64M\"\nkernel = \"k\"\nvcpus = \"two\"\n");
    assert_eq!((line, col), (4, 9));
    assert!(msg.contains("must be an integer"), "{msg}");
}

#[test]
fn bad_memory_size() {
    let (line, _, msg) = err("[vm]\nmemory = \"12 parsecs\"\nkernel = \"k\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("memory"), "{msg}");
}

#[test]
fn duplicate_device_id() {
    let text = GOOD.replace("id = \"dma\"", "id = \"lsi0\"");
    let (line, _, msg) = err(&text);
    assert_eq!(line, 22);
    assert!(msg.contains("duplicate device id `lsi0`"), "{msg}");
}

#[test]
fn duplicate_remote_id() {
    let text = GOOD.replace(
        "[[device]]\nid = \"lsi0\"",
        "[[remote]]\nid = \"storage\"\n[[device]]\nid = \"lsi0\"",
    );
    let (_, _, msg) = err(&text);
    assert!(msg.contains("duplicate remote id `storage`"), "{msg}");
}

#[test]
fn device_naming_missing_remote() {
    let text = GOOD.replace("remote = \"storage\"", "remote = \"nowhere\"");
    let (line, col, msg) = err(&text);
    assert_eq!((line, col), (14, 10));
    assert!(msg.contains("`nowhere`"), "{msg}");
}

#[test]
fn two_devices_on_one_slot() {
    let text = GOOD.replace("slot = 5", "slot = 4");
    let (line, col, msg) = err(&text);
    assert_eq!((line, col), (25, 8));
    assert!(msg.contains("slot 4"), "{msg}");
}

#[test]
fn slot_out_of_range_and_placement_required() {
    let (_, _, msg) = err(&GOOD.replace("slot = 5", "slot = 0"));
    assert!(msg.contains("between 1 and 31"), "{msg}");
    let (line, _, msg) = err(&GOOD.replace("in-process = true\n", ""));
    assert_eq!(line, 21);
    assert!(msg.contains("in-process"), "{msg}");
}

#[test]
fn bad_protocol() {
    let text = GOOD.replace("log = ", "protocol = \"carrier-pigeon\"\nlog = ");
    let (line, _, msg) = err(&text);
    assert_eq!(line, 10);
    assert!(msg.contains("carrier-pigeon"), "{msg}");
}

#[test]
fn missing_vm_and_missing_kernel() {
    let (_, _, msg) = err("[[remote]]\nid = \"r\"\n");
    assert!(msg.contains("[vm]"), "{msg}");
    let (line, _, msg) = err("[vm]\nmemory = \"64M\"\n");
    assert_eq!(line, 1);
    assert!(msg.contains("missing `kernel`"), "{msg}");
}

#[test]
fn columns_count_characters_not_bytes() {
    let (line, col, _) = err("[vm]\nmemory = \"64M\"\nkernel = \"k\"\ncmdline = \"é\"\nbad = 1\n");
    assert_eq!((line, col), (5, 1));
    let (_, col, _) = err("[vm]\nmemory = \"64M\"\nkernel = \"ké\" ; x = 1\n");
    assert!(col > 1);
}

#[test]
fn on_reboot_defaults_to_restart_and_parses_exit() {
    assert_eq!(
        parse(GOOD).unwrap().vm.unwrap().on_reboot,
        OnReboot::Restart
    );
    let text = GOOD.replace("vcpus = 2\n", "vcpus = 2\non-reboot = \"exit\"\n");
    assert_eq!(parse(&text).unwrap().vm.unwrap().on_reboot, OnReboot::Exit);
    let text = GOOD.replace("vcpus = 2\n", "vcpus = 2\non-reboot = \"restart\"\n");
    assert_eq!(
        parse(&text).unwrap().vm.unwrap().on_reboot,
        OnReboot::Restart
    );
}

#[test]
fn bad_on_reboot_is_reported_at_the_value() {
    let text = GOOD.replace("vcpus = 2\n", "vcpus = 2\non-reboot = \"poweroff\"\n");
    let (line, col, msg) = err(&text);
    assert_eq!((line, col), (5, 13));
    assert!(msg.contains("poweroff") && msg.contains("restart"), "{msg}");
    let text = GOOD.replace("vcpus = 2\n", "vcpus = 2\non-reboot = true\n");
    let (line, _, msg) = err(&text);
    assert_eq!(line, 5);
    assert!(msg.contains("on-reboot"), "{msg}");
}

#[test]
fn a_remote_only_file_is_read_for_its_devices_but_not_as_a_vm() {
    let text = r#"
[[remote]]
id = "storage"

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4
"#;
    let path = Path::new("/etc/vm/remote.toml");
    let c =
        Config::parse_devices(text, path).expect("a remote-only file is enough for its devices");
    assert!(c.vm.is_none());
    assert_eq!(c.devices_of_remote("storage").count(), 1);
    let msg = match Config::parse(text, path) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a VM config without [vm] was accepted"),
    };
    assert!(msg.contains("missing [vm] section"), "{msg}");
    // A [vm] that is there is still checked.
    let bad = format!("[vm]\nmemory = \"1T\"\nkernel = \"k\"\n{text}");
    assert!(Config::parse_devices(&bad, path).is_err());
}

/// Every relative path of a config resolves against the config file's
/// directory, made absolute when it is read: `[vm]` and `[[remote]]`
/// paths, the base of a device's own settings, and a plugin given as a
/// path (one with a `/` or ending in `.so`), so that a remote-host or an
/// in-process device finds the same file whatever its current directory.
#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let text = r#"
[vm]
memory = "64M"
kernel = "boot/vmlinuz"
qmp = "/run/vm/qmp.sock"

[[remote]]
id = "r"
log = "r.log"
plugin-dirs = ["plugins"]

[[device]]
id = "a"
remote = "r"
plugin = "plugins/libdma_example.so"
slot = 4

[[device]]
id = "b"
in-process = true
plugin = "libdma_example.so"
slot = 5

[[device]]
id = "c"
remote = "r"
plugin = "/opt/plugins/libdma_example.so"
slot = 6

[[device]]
id = "d"
remote = "r"
plugin = "dma-example"
slot = 7
"#;
    let cwd = std::env::current_dir().unwrap();
    let c = Config::parse(text, Path::new("vms/one/vm.toml")).unwrap();
    let base = cwd.join("vms/one");
    assert_eq!(c.base_dir, base);
    let vm = c.vm.as_ref().unwrap();
    assert_eq!(vm.kernel, base.join("boot/vmlinuz"));
    assert_eq!(vm.qmp, Some(PathBuf::from("/run/vm/qmp.sock")));
    assert_eq!(c.remotes[0].log, Some(base.join("r.log")));
    assert_eq!(c.remotes[0].plugin_dirs, vec![base.join("plugins")]);
    let plugins: Vec<&str> = c.devices.iter().map(|d| d.plugin.as_str()).collect();
    let a = base.join("plugins/libdma_example.so");
    let b = base.join("libdma_example.so");
    assert_eq!(
        plugins,
        [
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "/opt/plugins/libdma_example.so",
            "dma-example"
        ]
    );
    assert!(c.devices.iter().all(|d| d.base_dir == base));

    // A file named without a directory: the current directory, absolute.
    let c = Config::parse(text, Path::new("vm.toml")).unwrap();
    assert_eq!(c.base_dir, cwd);
    assert_eq!(c.vm.unwrap().kernel, cwd.join("boot/vmlinuz"));
}

#[test]
fn plugin_path_rule() {
    assert!(is_plugin_path("./libx.so"));
    assert!(is_plugin_path("libx.so"));
    assert!(is_plugin_path("dir/x"));
    assert!(!is_plugin_path("lsi53c895a"));
    let base = Path::new("/etc/vm");
    assert_eq!(resolve_plugin(base, "x/liby.so"), "/etc/vm/x/liby.so");
    assert_eq!(resolve_plugin(base, "/abs/liby.so"), "/abs/liby.so");
    assert_eq!(resolve_plugin(base, "dma-example"), "dma-example");
    assert_eq!(
        resolve_path(base, "disk.img"),
        PathBuf::from("/etc/vm/disk.img")
    );
}

#[test]
fn restart_policy_defaults_to_never_and_parses_each_value() {
    let remote = |text: &str| parse(text).unwrap().remotes[0].clone();
    let r = remote(GOOD);
    assert_eq!(
        (r.restart, r.restart_limit),
        (crate::RestartPolicy::Never, 5)
    );
    for (v, want) in [
        ("never", crate::RestartPolicy::Never),
        ("on-failure", crate::RestartPolicy::OnFailure),
        ("always", crate::RestartPolicy::Always),
    ] {
        let text = GOOD.replace(
            "id = \"storage\"\n",
            &format!("id = \"storage\"\nrestart = \"{v}\"\nrestart-limit = 3\n"),
        );
        let r = remote(&text);
        assert_eq!((r.restart, r.restart_limit), (want, 3));
        assert_eq!(r.restart.name(), v);
        assert!(r.standby, "a standby process by default");
    }
    let text = GOOD.replace("id = \"storage\"\n", "id = \"storage\"\nstandby = false\n");
    assert!(!remote(&text).standby);
    let text = GOOD.replace("id = \"storage\"\n", "id = \"storage\"\nstandby = \"no\"\n");
    let (line, _, msg) = err(&text);
    assert_eq!(line, 10);
    assert!(msg.contains("standby"), "{msg}");
}

#[test]
fn posted_writes_are_off_unless_asked() {
    let remote = |text: &str| parse(text).unwrap().remotes[0].clone();
    assert!(!remote(GOOD).posted_writes);
    let text = GOOD.replace(
        "id = \"storage\"\n",
        "id = \"storage\"\nposted-writes = true\n",
    );
    assert!(remote(&text).posted_writes);
    let text = GOOD.replace(
        "id = \"storage\"\n",
        "id = \"storage\"\nposted-writes = 1\n",
    );
    let (_, _, msg) = err(&text);
    assert!(msg.contains("posted-writes"), "{msg}");
}

#[test]
fn bad_restart_policy_is_reported_at_the_value() {
    let text = GOOD.replace(
        "id = \"storage\"\n",
        "id = \"storage\"\nrestart = \"sometimes\"\n",
    );
    let (line, col, msg) = err(&text);
    assert_eq!((line, col), (10, 11));
    assert!(
        msg.contains("sometimes") && msg.contains("on-failure"),
        "{msg}"
    );
    let text = GOOD.replace(
        "id = \"storage\"\n",
        "id = \"storage\"\nrestart-limit = 0\n",
    );
    let (line, _, msg) = err(&text);
    assert_eq!(line, 10);
    assert!(msg.contains("restart-limit"), "{msg}");
}

#[test]
fn remote_resource_limits() {
    let none = parse(GOOD).unwrap();
    assert!(!none.remotes[0].limits.any());
    let text = GOOD.replace(
        "log = \"/var/log/storage.log\"",
        "log = \"/var/log/storage.log\"\nmemory-max = \"256M\"\ncpu-percent = 150\ntasks-max = 64",
    );
    assert_eq!(
        parse(&text).unwrap().remotes[0].limits,
        ResourceLimits {
            memory_bytes: Some(256 << 20),
            cpu_percent: Some(150),
            tasks: Some(64),
        }
    );
    for (bad, want) in [
        ("memory-max = \"1M\"", "from 16M"),
        ("memory-max = \"lots\"", "from 16M"),
        ("memory-max = 256", "a string"),
        ("cpu-percent = 0", "between 1 and"),
        ("tasks-max = 2", "between 8 and"),
        ("tasks-max = \"8\"", "an integer"),
    ] {
        let text = GOOD.replace(
            "log = \"/var/log/storage.log\"",
            &format!("log = \"/var/log/storage.log\"\n{bad}"),
        );
        let (line, _, msg) = err(&text);
        assert_eq!(line, 11, "{bad}: {msg}");
        assert!(msg.contains(want), "{bad}: {msg}");
    }
}
