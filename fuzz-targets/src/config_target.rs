//! The config file: any text into `config::Config::parse` (a VM's config)
//! and `parse_devices` (what remote-host reads), then each device's own
//! settings into its plugin's settings type, as the plugin's constructor
//! receives them (`plugin_api::settings`).

use std::path::Path;

/// Parses `data` (as UTF-8, invalid sequences replaced) both ways.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz/vm.toml");
    if let Ok(c) = config::Config::parse(&text, path) {
        for r in &c.remotes {
            let _ = c.devices_of_remote(&r.id).count();
        }
        for d in &c.devices {
            let _ = plugin_api::settings::<lsi53c895a::Settings>(&d.settings);
        }
    }
    let _ = config::Config::parse_devices(&text, path);
}
