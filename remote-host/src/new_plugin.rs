//! `remote-host new-plugin NAME`: writes a plugin crate to start from,
//! outside any workspace: `Cargo.toml` (cdylib + rlib, plugin-api the only
//! dependency), `src/lib.rs` (a device with one register BAR, an INTx
//! interrupt, a setting and a control operation), `tests/device.rs` (the
//! harness, each test linked and from the `.so`), a README and a
//! `.gitignore`.
//!
//! The files are `remote-host/template/`, compiled in. The template is a
//! crate called `plugin-template`; making one is replacing that name (as
//! `plugin-template`, `plugin_template` and `PluginTemplate`) and the
//! plugin-api dependency. `remote-host/tests/new_plugin.rs` builds, tests
//! and loads what it makes, so the template cannot rot.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The template's files: path in the new crate, contents.
const FILES: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../template/Cargo.toml.in")),
    ("src/lib.rs", include_str!("../template/src/lib.rs")),
    (
        "tests/device.rs",
        include_str!("../template/tests/device.rs"),
    ),
    ("README.md", include_str!("../template/README.md")),
    (".gitignore", include_str!("../template/gitignore")),
];

/// What the new crate's `plugin-api` dependency is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginApi {
    /// A checkout's `plugin-api` directory (absolute).
    Path(PathBuf),
    /// A version requirement from a registry (`0.1.1`).
    Version(String),
}

impl PluginApi {
    /// From `--plugin-api`: a directory holding plugin-api's Cargo.toml,
    /// or a version.
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        let path = Path::new(arg);
        if path.is_dir() {
            let abs = std::path::absolute(path)
                .with_context(|| format!("--plugin-api {arg}: cannot make it absolute"))?;
            if !is_plugin_api(&abs) {
                bail!(
                    "--plugin-api {arg}: no plugin-api crate there (its Cargo.toml with name = \"plugin-api\"); give the plugin-api directory of a checkout, or a version"
                );
            }
            return Ok(PluginApi::Path(abs));
        }
        let looks_like_version = !arg.is_empty()
            && arg
                .trim_start_matches(['=', '^', '~'])
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
        if looks_like_version {
            Ok(PluginApi::Version(arg.to_owned()))
        } else {
            bail!("--plugin-api {arg}: neither a directory nor a version such as 0.1.1")
        }
    }

    /// The default: the plugin-api of the checkout this remote-host was
    /// built in when the executable is in its `target/` directory, else
    /// this remote-host's own plugin-api version (the ABI it loads).
    pub fn default_for_this_host() -> Self {
        let exe = std::env::current_exe().ok();
        let found = exe
            .iter()
            .flat_map(|e| e.ancestors().skip(1).take(5))
            .find_map(|d| {
                let candidate = d.join("plugin-api");
                is_plugin_api(&candidate).then_some(candidate)
            });
        match found {
            Some(p) => PluginApi::Path(p),
            None => PluginApi::Version(plugin_api::ABI_VERSION.to_owned()),
        }
    }

    /// The dependency's value in Cargo.toml.
    fn toml(&self) -> anyhow::Result<String> {
        let quoted = |s: &str| serde_json::to_string(s).context("cannot quote");
        Ok(match self {
            PluginApi::Path(p) => {
                let s = p
                    .to_str()
                    .with_context(|| format!("{}: not a UTF-8 path", p.display()))?;
                format!("{{ path = {} }}", quoted(s)?)
            }
            PluginApi::Version(v) => quoted(v)?,
        })
    }
}

impl std::fmt::Display for PluginApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginApi::Path(p) => write!(f, "path {}", p.display()),
            PluginApi::Version(v) => write!(f, "version {v}"),
        }
    }
}

fn is_plugin_api(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "name = \"plugin-api\""))
}

/// Rust keywords and crates a plugin's crate cannot be called.
const RESERVED: &[&str] = &[
    "alloc",
    "as",
    "async",
    "await",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "plugin_api",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "type",
    "unsafe",
    "use",
    "where",
    "while",
];

/// Checks a plugin name: it is also the crate's name, and its library is
/// `lib<name with - as _>.so`, so: lowercase ASCII letters, digits and
/// `-`, starting with a letter.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--");
    if !ok {
        return Err(format!(
            "`{name}` cannot name a plugin: use lowercase letters, digits and single `-`, starting with a letter (e.g. my-device)"
        ));
    }
    if RESERVED.contains(&crate_ident(name).as_str()) {
        return Err(format!(
            "`{name}` cannot name a plugin: it is a Rust keyword or a crate the plugin uses; choose another"
        ));
    }
    Ok(())
}

fn crate_ident(name: &str) -> String {
    name.replace('-', "_")
}

fn camel_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Writes plugin `name` into `dir` (which must not exist, or be empty)
/// and returns the files written.
pub fn write(name: &str, dir: &Path, api: &PluginApi) -> anyhow::Result<Vec<PathBuf>> {
    check_name(name).map_err(anyhow::Error::msg)?;
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot read it", dir.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} exists and is not empty; choose another --dir or remove it",
                dir.display()
            );
        }
    }
    let dependency = api.toml()?;
    let mut written = Vec::new();
    for (path, text) in FILES {
        let text = text
            .replace("PluginTemplate", &camel_case(name))
            .replace("plugin_template", &crate_ident(name))
            .replace("plugin-template", name)
            .replace("@PLUGIN_API@", &dependency);
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(check_name("pci-serial"), Ok(()));
        assert_eq!(check_name("uart16550"), Ok(()));
        for bad in [
            "", "Serial", "1uart", "my_dev", "a--b", "dev-", "a b", "std", "fn",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(camel_case("pci-serial-2"), "PciSerial2");
        assert_eq!(crate_ident("pci-serial"), "pci_serial");
    }

    #[test]
    fn plugin_api_argument() {
        assert_eq!(
            PluginApi::parse("0.1.1").ok(),
            Some(PluginApi::Version("0.1.1".into()))
        );
        assert_eq!(
            PluginApi::parse("=0.1").ok(),
            Some(PluginApi::Version("=0.1".into()))
        );
        assert!(PluginApi::parse("latest").is_err());
        let here = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-api");
        assert!(matches!(PluginApi::parse(here), Ok(PluginApi::Path(_))));
        let e = PluginApi::parse(env!("CARGO_MANIFEST_DIR")).map_err(|e| e.to_string());
        assert!(e.is_err_and(|e| e.contains("no plugin-api crate there")));
        assert_eq!(
            PluginApi::Version("0.1.1".into()).toml().ok(),
            Some("\"0.1.1\"".into())
        );
        assert_eq!(
            PluginApi::Path("/x/a\"b".into()).toml().ok(),
            Some(r#"{ path = "/x/a\"b" }"#.into())
        );
    }

    #[test]
    fn template_has_every_placeholder_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pci-serial");
        let files = write("pci-serial", &dir, &PluginApi::Version("0.1.1".into())).expect("write");
        assert_eq!(files.len(), FILES.len());
        let all: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("read"))
            .collect();
        for left in [
            "plugin-template",
            "plugin_template",
            "PluginTemplate",
            "@PLUGIN_API@",
        ] {
            assert!(!all.contains(left), "{left} left in the crate");
        }
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
        assert!(cargo.contains("name = \"pci-serial\""), "{cargo}");
        assert!(cargo.contains("plugin-api = \"0.1.1\""), "{cargo}");
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).expect("lib.rs");
        assert!(lib.contains("pub struct PciSerial {"));
        assert!(lib.contains("name: \"pci-serial\""));
        // Not over a crate that is there.
        let e = write("pci-serial", &dir, &PluginApi::Version("0.1.1".into()));
        assert!(e.is_err_and(|e| e.to_string().contains("exists and is not empty")));
    }
}
