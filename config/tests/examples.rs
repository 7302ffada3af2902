//! Every example in `configs/` parses, and each plugin table is handed on
//! intact.

use std::path::PathBuf;

use config::{Config, Placement};

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

#[test]
fn every_example_config_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).expect("configs/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = Config::load(&path) {
                panic!("{e}");
            }
            n += 1;
        }
    }
    assert!(n >= 2, "expected the example configs, found {n}");
}

#[test]
fn demo_config_places_the_lsi_in_a_remote() {
    let c = Config::load(&configs_dir().join("demo.toml")).expect("demo.toml parses");
    let lsi = &c.devices[0];
    assert_eq!(lsi.plugin, "lsi53c895a");
    assert_eq!(lsi.placement, Placement::Remote("storage".into()));
    assert!(lsi.settings.contains("[[drive]]"), "{}", lsi.settings);
    assert!(lsi.settings.contains("scsi-id = 0"), "{}", lsi.settings);
}

#[test]
fn two_remotes_example() {
    let c = Config::load(&configs_dir().join("two-remotes.toml")).expect("parses");
    assert_eq!(c.remotes.len(), 2);
    assert_eq!(c.remotes[0].heartbeat_ms, 250);
    assert_eq!(c.devices_of_remote("storage").count(), 1);
    assert_eq!(c.devices[2].placement, Placement::InProcess);
    assert!(c.devices[1].settings.contains("max-transfer = 65536"));
}
