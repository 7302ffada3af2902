//! A device's settings: its `[[device]]` table of the VM config, less the
//! placement keys, deserialized into the plugin's own type.

use serde::de::DeserializeOwned;

/// Deserializes a device's settings (TOML text, as a constructor receives
/// it) into `S`.
///
/// The error is one line that names the key, e.g.
/// ``settings: `drive.scsi-id`: invalid value: integer `300`, expected u8``
/// or ``settings: unknown field `max-transfr`, expected `max-transfer` ``.
/// It names no line number: the text is re-serialized from the config
/// file, so its lines are not the user's (the key is what they can find).
///
/// A constructor that takes `S` directly (see [`crate::export_plugin!`])
/// gets its settings through this function; a constructor that takes the
/// text may call it itself.
///
/// `S` derives [`crate::Deserialize`]; without a `serde` dependency of the
/// plugin's own, tell the derive where serde is:
///
/// ```
/// #[derive(plugin_api::Deserialize, Debug, PartialEq)]
/// #[serde(crate = "plugin_api::serde", deny_unknown_fields, rename_all = "kebab-case")]
/// struct Settings {
///     #[serde(default)]
///     max_transfer: u32,
/// }
///
/// let s: Settings = plugin_api::settings("max-transfer = 4096\n").unwrap();
/// assert_eq!(s, Settings { max_transfer: 4096 });
/// let e = plugin_api::settings::<Settings>("max-transfer = \"big\"\n").unwrap_err();
/// assert_eq!(e, "settings: `max-transfer`: invalid type: string \"big\", expected u32");
/// ```
pub fn settings<S: DeserializeOwned>(text: &str) -> Result<S, String> {
    // Two steps: the text's syntax, then the table into `S`. Deserializing
    // from a table (instead of the text) is what makes toml name the key
    // path of an error ("in `drive.scsi-id`") instead of quoting a line.
    let table: toml::Table = toml::from_str(text)
        .map_err(|e| format!("settings: not valid TOML: {}", one_line(e.message())))?;
    toml::Value::Table(table)
        .try_into::<S>()
        .map_err(|e| format!("settings: {}", with_key(&e)))
}

/// `message` with its key path first, from toml's display of a value
/// error: "message\nin `a.b`\n".
fn with_key(e: &toml::de::Error) -> String {
    let shown = e.to_string();
    let key = shown
        .lines()
        .filter_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
        .next_back();
    let message = one_line(e.message());
    match key {
        Some(k) if !message.contains(&format!("`{k}`")) => format!("`{k}`: {message}"),
        _ => message,
    }
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Drive {
        scsi_id: u8,
        #[serde(default)]
        read_only: bool,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct S {
        #[serde(default)]
        max_transfer: u32,
        #[serde(default)]
        drive: Vec<Drive>,
    }

    fn err(text: &str) -> String {
        settings::<S>(text).expect_err(text)
    }

    #[test]
    fn parses_and_defaults() {
        assert_eq!(
            settings::<S>(""),
            Ok(S {
                max_transfer: 0,
                drive: vec![]
            })
        );
        let s: S = settings("max-transfer = 7\n[[drive]]\nscsi-id = 2\n").expect("valid");
        assert_eq!(s.max_transfer, 7);
        assert_eq!(
            s.drive,
            vec![Drive {
                scsi_id: 2,
                read_only: false
            }]
        );
    }

    #[test]
    fn errors_name_the_key_in_one_line() {
        assert_eq!(
            err("max-transfer = \"big\""),
            "settings: `max-transfer`: invalid type: string \"big\", expected u32"
        );
        assert_eq!(
            err("[[drive]]\nscsi-id = 300\n"),
            "settings: `drive.scsi-id`: invalid value: integer `300`, expected u8"
        );
        assert_eq!(
            err("max-transfr = 1"),
            "settings: unknown field `max-transfr`, expected `max-transfer` or `drive`"
        );
        assert_eq!(
            err("[[drive]]\nread-only = true\n"),
            "settings: `drive`: missing field `scsi-id`"
        );
        let e = err("max-transfer = [");
        assert!(e.starts_with("settings: not valid TOML: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
