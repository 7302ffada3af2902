//! Finding and loading plugin libraries (host side).
//!
//! Libraries are loaded with `lib_header_from_path(..).init_root_module()`
//! rather than `RootModule::load_from_file`: the latter caches one module
//! per root-module type, so a second plugin would silently come back as
//! the first. Loaded libraries are never unloaded (abi_stable's rule).

use std::fmt;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};

use crate::abi::{PluginModuleRef, ABI_VERSION};

/// A plugin library that passed every ABI check.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// The library file (`<linked NAME>` for a linked plugin).
    pub path: PathBuf,
    /// Its root module.
    pub module: PluginModuleRef,
    /// The plugin's name (`export_plugin!`'s `name`).
    pub name: String,
    /// The plugin's own version (its crate version).
    pub version: String,
    /// The device kinds it provides.
    pub kinds: Vec<String>,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kinds", &self.kinds)
            .finish()
    }
}

impl LoadedPlugin {
    /// A plugin linked into this binary (an rlib), e.g. for in-process use.
    pub fn linked(module: PluginModuleRef) -> Self {
        let name = module.name()().to_string();
        let version = module.version()().to_string();
        let kinds = module.device_kinds()()
            .iter()
            .map(|k| k.to_string())
            .collect();
        LoadedPlugin {
            path: PathBuf::from(format!("<linked {name}>")),
            module,
            name,
            version,
            kinds,
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// No library with that name in any plugin directory.
    NotFound {
        /// The plugin name asked for.
        name: String,
        /// The directories looked in.
        searched: Vec<PathBuf>,
    },
    /// The file could not be opened as a shared library.
    Open {
        /// The library file.
        path: PathBuf,
        /// The dynamic loader's error.
        message: String,
    },
    /// The library does not export a plugin root module.
    NotAPlugin {
        /// The library file.
        path: PathBuf,
        /// abi_stable's error.
        message: String,
    },
    /// The library was built against a plugin-api (ABI) version this host
    /// cannot load: `why` is the rule it breaks.
    IncompatibleAbi {
        /// The library file.
        path: PathBuf,
        /// The plugin-api version the plugin was built against.
        plugin_abi: String,
        /// This host's plugin-api version.
        host_abi: String,
        /// The rule it breaks (see [`abi_compatible`]).
        why: &'static str,
    },
    /// The library's ABI types do not have the layout this host expects
    /// (same version numbers, different types: a plugin-api changed
    /// without a version bump, or a hand-made root module).
    Layout {
        /// The library file.
        path: PathBuf,
        /// The plugin-api version the plugin was built against.
        plugin_abi: String,
        /// This host's plugin-api version.
        host_abi: String,
        /// The first line of abi_stable's report (the whole report is
        /// logged at debug level).
        first_difference: String,
    },
    /// The root module failed to initialize (e.g. it panicked).
    Init {
        /// The library file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotFound { name, searched } => {
                write!(f, "plugin `{name}` not found in ")?;
                if searched.is_empty() {
                    write!(f, "any plugin directory (none configured)")
                } else {
                    let dirs: Vec<String> =
                        searched.iter().map(|p| p.display().to_string()).collect();
                    write!(f, "{}", dirs.join(", "))
                }
            }
            LoadError::Open { path, message } => {
                write!(f, "{}: cannot load library: {message}", path.display())
            }
            LoadError::NotAPlugin { path, message } => write!(
                f,
                "{}: not a device plugin (no plugin root module): {message}",
                path.display()
            ),
            LoadError::IncompatibleAbi {
                path,
                plugin_abi,
                host_abi,
                why,
            } => write!(
                f,
                "{}: plugin was built against plugin-api {plugin_abi}, but this host uses plugin-api {host_abi} ({why}); rebuild the plugin against plugin-api {}",
                path.display(),
                requirement(host_abi),
            ),
            LoadError::Layout {
                path,
                plugin_abi,
                host_abi,
                first_difference,
            } => write!(
                f,
                "{}: plugin built against plugin-api {plugin_abi} has ABI types that differ from this host's plugin-api {host_abi} ({first_difference}); rebuild the plugin against plugin-api {}",
                path.display(),
                requirement(host_abi),
            ),
            LoadError::Init { path, message } => {
                write!(f, "{}: plugin failed to initialize: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for LoadError {}

fn map_library_error(path: &Path, plugin_abi: &str, e: LibraryError) -> LoadError {
    let path = path.to_owned();
    match e {
        e @ LibraryError::OpenError { .. } => LoadError::Open {
            path,
            message: e.to_string(),
        },
        e @ LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
            path,
            message: e.to_string(),
        },
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::IncompatibleAbi {
            path,
            plugin_abi: actual_version.to_string(),
            host_abi: expected_version.to_string(),
            why: "abi_stable's version rule",
        },
        LibraryError::AbiInstability(e) => {
            let report = e.to_string();
            tracing::debug!("{}: abi_stable layout report:\n{report}", path.display());
            let first_difference = layout_summary(&report);
            LoadError::Layout {
                path,
                plugin_abi: plugin_abi.to_owned(),
                host_abi: ABI_VERSION.to_owned(),
                first_difference,
            }
        }
        other => LoadError::Init {
            path,
            message: other.to_string(),
        },
    }
}

/// Loads the plugin library at `path`, checking ABI version and layout.
pub fn load_path(path: &Path) -> Result<LoadedPlugin, LoadError> {
    let header = lib_header_from_path(path).map_err(|e| map_library_error(path, "?", e))?;
    // Our own version rule first, before abi_stable looks at the layout:
    // its rule lets a newer 0.y plugin through to a layout check whose
    // report never names the plugin's version.
    let plugin_abi = header.version_strings().to_string();
    if let Err(why) = abi_compatible(&plugin_abi, ABI_VERSION) {
        return Err(LoadError::IncompatibleAbi {
            path: path.to_owned(),
            plugin_abi,
            host_abi: ABI_VERSION.to_owned(),
            why,
        });
    }
    let module = header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| map_library_error(path, &plugin_abi, e))?;
    let mut plugin = LoadedPlugin::linked(module);
    plugin.path = path.to_owned();
    Ok(plugin)
}

/// Whether a plugin built against plugin-api `plugin` may be loaded by a
/// host built against `host`, or the rule it breaks. Cargo's rules, read
/// for an ABI: the same major version; under 1.0 the same minor version
/// (0.y is a major version of its own); from 1.0 on, a plugin no newer than
/// the host in the minor version (it may call host services an older host
/// lacks). This is only the version rule: abi_stable's layout check then
/// still refuses an older plugin whose vtables lack methods appended since
/// (docs/plugins.md, "Versions and the ABI").
pub fn abi_compatible(plugin: &str, host: &str) -> Result<(), &'static str> {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        let major = it.next()?.trim().parse().ok()?;
        let minor = it.next()?.trim().parse().ok()?;
        Some((major, minor))
    };
    let (Some((pm, pn)), Some((hm, hn))) = (parse(plugin), parse(host)) else {
        return Err("its version is not a version number");
    };
    match (pm.cmp(&hm), hm) {
        (std::cmp::Ordering::Less, _) => Err("an older major version"),
        (std::cmp::Ordering::Greater, _) => Err("a newer major version"),
        (_, 0) if pn < hn => {
            Err("an older 0.y version; under 1.0 each minor version is its own ABI")
        }
        (_, 0) if pn > hn => {
            Err("a newer 0.y version; under 1.0 each minor version is its own ABI")
        }
        _ if pn > hn => Err("a newer minor version than the host"),
        _ => Ok(()),
    }
}

/// The first difference abi_stable's layout report names, in one line:
/// "mismatched type: expected `PluginModule`, found `Other`". The report
/// itself runs to thousands of lines of both layouts.
fn layout_summary(report: &str) -> String {
    let mut lines = report.lines().map(str::trim);
    let mut summary = None;
    while let Some(l) = lines.next() {
        let Some(what) = l.strip_prefix("Error:") else {
            continue;
        };
        let mut next_value = |label: &str| {
            lines
                .by_ref()
                .skip_while(|l| *l != label)
                .nth(1)
                .map(str::to_owned)
        };
        let expected = next_value("Expected:");
        let found = next_value("Found:");
        summary = Some(match (expected, found) {
            (Some(e), Some(f)) => format!("{}: expected `{e}`, found `{f}`", what.trim()),
            _ => what.trim().to_owned(),
        });
        break;
    }
    let mut s = summary.unwrap_or_else(|| "see the debug log for abi_stable's report".into());
    s.truncate(s.char_indices().nth(200).map_or(s.len(), |(i, _)| i));
    s
}

/// The versions of plugin-api a plugin for a host built against `host`
/// may be built against, as a Cargo requirement (`0.1.x`, `1.x`).
fn requirement(host: &str) -> String {
    let mut it = host.split('.');
    match (it.next(), it.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}.x"),
        (Some(major), Some(minor)) => format!("{major}.x (up to {major}.{minor})"),
        _ => host.to_owned(),
    }
}

/// The file name a plugin called `name` has: `lib<name with - as _>.so`.
pub fn library_file_name(name: &str) -> String {
    format!("lib{}.so", name.replace('-', "_"))
}

/// Loads a plugin given as a path (contains `/` or ends in `.so`) or a name
/// looked up in `dirs`.
pub fn find(name_or_path: &str, dirs: &[PathBuf]) -> Result<LoadedPlugin, LoadError> {
    if name_or_path.contains('/') || name_or_path.ends_with(".so") {
        return load_path(Path::new(name_or_path));
    }
    let file = library_file_name(name_or_path);
    for dir in dirs {
        let candidate = dir.join(&file);
        if candidate.is_file() {
            return load_path(&candidate);
        }
    }
    Err(LoadError::NotFound {
        name: name_or_path.to_owned(),
        searched: dirs.to_vec(),
    })
}

/// Every `lib*.so` in `dirs`, each with its load result: a broken or
/// incompatible file is reported, not fatal to the listing.
pub fn scan(dirs: &[PathBuf]) -> Vec<(PathBuf, Result<LoadedPlugin, LoadError>)> {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let is_lib = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lib") && n.ends_with(".so"));
            // The same file reached through two directories (a directory
            // given on the command line that is also a default one, or a
            // symlink) is listed once.
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            if is_lib && p.is_file() && !files.contains(&p) {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let r = load_path(&p);
            (p, r)
        })
        .collect()
}

/// Default plugin directories: `$PLUGIN_PATH` (colon-separated), then the
/// directory of the running executable and its `plugins/` subdirectory.
pub fn default_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PLUGIN_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("plugins"));
        dirs.push(exe_dir);
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_rule_names_each_case() {
        assert_eq!(abi_compatible("0.1.1", "0.1.1"), Ok(()));
        assert_eq!(abi_compatible("0.1.0", "0.1.3"), Ok(()));
        assert_eq!(abi_compatible("0.1.9", "0.1.3"), Ok(()));
        assert!(abi_compatible("0.0.9", "0.1.1")
            .unwrap_err()
            .contains("older 0.y"));
        assert!(abi_compatible("0.2.0", "0.1.1")
            .unwrap_err()
            .contains("newer 0.y"));
        assert!(abi_compatible("99.0.0", "0.1.1")
            .unwrap_err()
            .contains("newer major"));
        assert!(abi_compatible("1.0.0", "2.3.0")
            .unwrap_err()
            .contains("older major"));
        assert_eq!(abi_compatible("2.1.0", "2.3.0"), Ok(()));
        assert!(abi_compatible("2.4.0", "2.3.0")
            .unwrap_err()
            .contains("newer minor"));
        assert!(abi_compatible("x", "0.1.1").is_err());
        assert_eq!(requirement("0.1.1"), "0.1.x");
        assert_eq!(requirement("2.3.0"), "2.x (up to 2.3)");
    }

    #[test]
    fn layout_report_becomes_one_line() {
        let report = "Compared <this>:\n  lots\n\nError:mismatched type\nExpected:\n    PluginModule\nFound:\n    ForeignPlugin\n";
        assert_eq!(
            layout_summary(report),
            "mismatched type: expected `PluginModule`, found `ForeignPlugin`"
        );
        assert!(layout_summary("nothing useful").contains("debug log"));
    }
}
