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
    pub path: PathBuf,
    pub module: PluginModuleRef,
    pub name: String,
    pub version: String,
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
        name: String,
        searched: Vec<PathBuf>,
    },
    /// The file could not be opened as a shared library.
    Open { path: PathBuf, message: String },
    /// The library does not export a plugin root module.
    NotAPlugin { path: PathBuf, message: String },
    /// The library was built against another plugin-api (ABI) version.
    IncompatibleAbi {
        path: PathBuf,
        plugin_abi: String,
        host_abi: String,
    },
    /// The library's types do not have the layout this host expects.
    Layout { path: PathBuf, message: String },
    /// The root module failed to initialize (e.g. it panicked).
    Init { path: PathBuf, message: String },
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
            } => write!(
                f,
                "{}: plugin was built against plugin-api {plugin_abi}, but this host uses plugin-api {host_abi}; rebuild the plugin against {host_abi}",
                path.display()
            ),
            LoadError::Layout { path, message } => write!(
                f,
                "{}: plugin ABI layout does not match this host's plugin-api {ABI_VERSION}: {message}",
                path.display()
            ),
            LoadError::Init { path, message } => {
                write!(f, "{}: plugin failed to initialize: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for LoadError {}

fn map_library_error(path: &Path, e: LibraryError) -> LoadError {
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
        },
        LibraryError::AbiInstability(e) => LoadError::Layout {
            path,
            message: e
                .to_string()
                .lines()
                .take(12)
                .collect::<Vec<_>>()
                .join("\n"),
        },
        other => LoadError::Init {
            path,
            message: other.to_string(),
        },
    }
}

/// Loads the plugin library at `path`, checking ABI version and layout.
pub fn load_path(path: &Path) -> Result<LoadedPlugin, LoadError> {
    let header = lib_header_from_path(path).map_err(|e| map_library_error(path, e))?;
    let module = header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| map_library_error(path, e))?;
    let mut plugin = LoadedPlugin::linked(module);
    plugin.path = path.to_owned();
    Ok(plugin)
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
