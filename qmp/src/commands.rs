//! What the embedding program implements ([`Commands`]), the errors it
//! returns ([`QmpError`], [`ErrorClass`]) and typed access to a command's
//! `arguments` ([`Arguments`]), all with QEMU's wording so that QMP clients
//! and people used to QEMU see familiar messages.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The commands of a monitor, implemented by the embedding program (the
/// VMM).
///
/// The server answers `qmp_capabilities`, `query-commands` and
/// `query-version` itself and passes every other negotiated `execute` here.
/// `execute` is called on the thread of the client that sent the command,
/// so several clients may call it at once; a slow command delays only its
/// own client. It must not wait for [`crate::Server::shutdown`] (a `quit`
/// should ask the main loop to stop and return at once). A panic in it is
/// caught and answered with a `GenericError`.
pub trait Commands: Send + Sync {
    /// Runs command `name` with its `arguments` (an empty map when the
    /// client sent none). The returned value becomes the `return` member;
    /// commands that return nothing return `{}` (`Value::Object` empty), as
    /// QEMU does.
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;

    /// The names of the commands `execute` accepts, for `query-commands`.
    fn command_names(&self) -> Vec<String>;
}

/// QMP's error classes (QEMU's `QapiErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Everything that has no class of its own (QEMU uses it for almost
    /// every error, bad arguments included).
    GenericError,
    /// The command does not exist, or is not available now (before
    /// capabilities negotiation).
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// No device (or drive, node, remote) has the given id.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error: `{"error": {"class": CLASS, "desc": DESC}}` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` with this description.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound`: "The command NAME has not been found".
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// `DeviceNotFound`: "Device 'ID' not found".
    pub fn device_not_found(id: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        )
    }

    /// `DeviceNotActive`: "No DEVICE device has been activated" is QEMU's
    /// only use; here the description is the caller's.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    /// `GenericError`: "Parameter 'NAME' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// `GenericError`: "Invalid parameter type for 'NAME', expected: TYPE".
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// `GenericError`: "Parameter 'NAME' expects WHAT" (a value of the right
    /// type that is not acceptable, e.g. `"a positive size"`).
    pub fn invalid_parameter_value(name: &str, expected: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expected}"))
    }

    /// `GenericError`: "Parameter 'NAME' is unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// `GenericError`: "Duplicate ID 'ID' for WHAT" (QEMU's wording for
    /// `device_add` with an id in use; `what` is e.g. "device").
    pub fn duplicate_id(id: &str, what: &str) -> Self {
        Self::generic(format!("Duplicate ID '{id}' for {what}"))
    }
}

/// Typed, QEMU-worded access to a command's `arguments`.
///
/// ```
/// use qmp::{Arguments, QmpError};
/// use serde_json::{json, Map, Value};
///
/// fn block_resize(args: &Map<String, Value>) -> Result<Value, QmpError> {
///     args.allow_only(&["node-name", "size"])?;
///     let node = args.str("node-name")?;
///     let size = args.u64("size")?;
///     Ok(json!({ "resized": node, "to": size }))
/// }
/// let args = json!({"node-name": "disk1"});
/// let err = block_resize(args.as_object().unwrap()).unwrap_err();
/// assert_eq!(err.desc, "Parameter 'size' is missing");
/// ```
pub trait Arguments {
    /// The raw value, if present.
    fn value(&self, name: &str) -> Option<&Value>;

    /// Names present in the arguments, for [`Arguments::allow_only`].
    fn names(&self) -> Vec<&str>;

    /// Refuses any argument not in `allowed` ("Parameter 'X' is
    /// unexpected"), as QEMU does for every command with a schema.
    fn allow_only(&self, allowed: &[&str]) -> Result<(), QmpError> {
        match self.names().into_iter().find(|n| !allowed.contains(n)) {
            Some(n) => Err(QmpError::unexpected_parameter(n)),
            None => Ok(()),
        }
    }

    /// A required string.
    fn str(&self, name: &str) -> Result<&str, QmpError> {
        self.opt_str(name)?
            .ok_or_else(|| QmpError::missing_parameter(name))
    }

    /// An optional string.
    fn opt_str(&self, name: &str) -> Result<Option<&str>, QmpError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "string")),
        }
    }

    /// A required boolean.
    fn bool(&self, name: &str) -> Result<bool, QmpError> {
        self.opt_bool(name)?
            .ok_or_else(|| QmpError::missing_parameter(name))
    }

    /// An optional boolean.
    fn opt_bool(&self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "boolean")),
        }
    }

    /// A required signed integer (QAPI `int`).
    fn i64(&self, name: &str) -> Result<i64, QmpError> {
        self.opt_i64(name)?
            .ok_or_else(|| QmpError::missing_parameter(name))
    }

    /// An optional signed integer.
    fn opt_i64(&self, name: &str) -> Result<Option<i64>, QmpError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_type(name, "integer")),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "integer")),
        }
    }

    /// A required unsigned integer (QAPI `uint64`/`size`). A negative or
    /// fractional number is refused with QEMU's "Parameter 'X' expects
    /// uint64".
    fn u64(&self, name: &str) -> Result<u64, QmpError> {
        self.opt_u64(name)?
            .ok_or_else(|| QmpError::missing_parameter(name))
    }

    /// An optional unsigned integer.
    fn opt_u64(&self, name: &str) -> Result<Option<u64>, QmpError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_value(name, "uint64")),
            Some(_) => Err(QmpError::invalid_parameter_value(name, "uint64")),
        }
    }

    /// A required object (nested arguments such as `blockdev-add`'s
    /// `file`).
    fn object(&self, name: &str) -> Result<&Map<String, Value>, QmpError> {
        self.opt_object(name)?
            .ok_or_else(|| QmpError::missing_parameter(name))
    }

    /// An optional object.
    fn opt_object(&self, name: &str) -> Result<Option<&Map<String, Value>>, QmpError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "object")),
        }
    }

    /// A required array.
    fn array(&self, name: &str) -> Result<&[Value], QmpError> {
        self.opt_array(name)?
            .ok_or_else(|| QmpError::missing_parameter(name))
    }

    /// An optional array.
    fn opt_array(&self, name: &str) -> Result<Option<&[Value]>, QmpError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(QmpError::invalid_parameter_type(name, "array")),
        }
    }
}

impl Arguments for Map<String, Value> {
    fn value(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }

    fn names(&self) -> Vec<&str> {
        self.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn wording_matches_qemu() {
        let a = map(json!({"id": 5, "size": -1, "ro": "yes", "file": [], "n": 1.5}));
        assert_eq!(
            a.str("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            a.str("missing").unwrap_err().desc,
            "Parameter 'missing' is missing"
        );
        assert_eq!(
            a.u64("size").unwrap_err().desc,
            "Parameter 'size' expects uint64"
        );
        assert_eq!(
            a.bool("ro").unwrap_err().desc,
            "Invalid parameter type for 'ro', expected: boolean"
        );
        assert_eq!(
            a.object("file").unwrap_err().desc,
            "Invalid parameter type for 'file', expected: object"
        );
        assert_eq!(
            a.i64("n").unwrap_err().desc,
            "Invalid parameter type for 'n', expected: integer"
        );
        assert_eq!(
            a.allow_only(&["id", "size", "ro", "file"])
                .unwrap_err()
                .desc,
            "Parameter 'n' is unexpected"
        );
        for e in [
            a.str("id").unwrap_err(),
            a.u64("size").unwrap_err(),
            a.allow_only(&[]).unwrap_err(),
        ] {
            assert_eq!(e.class, ErrorClass::GenericError);
        }
    }

    #[test]
    fn typed_values() {
        let a = map(json!({
            "id": "d1", "size": 1073741824u64, "off": -3, "ro": true,
            "file": {"driver": "file"}, "list": [1, 2]
        }));
        assert_eq!(a.str("id").unwrap(), "d1");
        assert_eq!(a.u64("size").unwrap(), 1 << 30);
        assert_eq!(a.i64("off").unwrap(), -3);
        assert!(a.bool("ro").unwrap());
        assert_eq!(a.object("file").unwrap()["driver"], "file");
        assert_eq!(a.array("list").unwrap().len(), 2);
        assert_eq!(a.opt_str("nope").unwrap(), None);
        assert_eq!(a.opt_u64("nope").unwrap(), None);
        a.allow_only(&["id", "size", "off", "ro", "file", "list"])
            .unwrap();
    }

    #[test]
    fn constructors() {
        assert_eq!(
            QmpError::device_not_found("lsi9"),
            QmpError::new(ErrorClass::DeviceNotFound, "Device 'lsi9' not found")
        );
        assert_eq!(
            QmpError::command_not_found("frob").desc,
            "The command frob has not been found"
        );
        assert_eq!(
            serde_json::to_value(QmpError::generic("x")).unwrap(),
            json!({"class": "GenericError", "desc": "x"})
        );
        assert_eq!(ErrorClass::KVMMissingCap.to_string(), "KVMMissingCap");
    }
}
