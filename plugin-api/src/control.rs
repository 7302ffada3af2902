//! Typed control operations.
//!
//! [`Device::control`](crate::Device::control) stays JSON at the ABI (one
//! `op` name and a JSON object in, a JSON value out), so that the VMM, QMP
//! and `remote-host` pass operations through without knowing any device,
//! and a plugin can add operations without an ABI change. What a plugin
//! author writes is typed: each operation's arguments are a struct that
//! derives [`Deserialize`] and its reply anything that
//! derives [`Serialize`]; [`call`] converts both ways and
//! words the errors.
//!
//! Why serde structs and not typed getters (`args.u64("size")`): the
//! struct is the one description of an operation's arguments, unknown or
//! misspelt keys are refused with `deny_unknown_fields` instead of being
//! ignored, defaults and renames are attributes, and the same rules as the
//! device's settings apply (`rename_all = "kebab-case"` makes `scsi_id`
//! the key `scsi-id`).
//!
//! ```
//! use plugin_api::control::{self, NoArgs, Value};
//!
//! #[derive(plugin_api::Deserialize)]
//! #[serde(crate = "plugin_api::serde", deny_unknown_fields, rename_all = "kebab-case")]
//! struct SetLimit {
//!     max_transfer: u32,
//! }
//!
//! #[derive(plugin_api::Serialize)]
//! #[serde(crate = "plugin_api::serde", rename_all = "kebab-case")]
//! struct Limit {
//!     max_transfer: u32,
//! }
//!
//! struct Dev {
//!     max_transfer: u32,
//! }
//!
//! impl Dev {
//!     // The body of `Device::control`.
//!     fn control(&mut self, op: &str, args: &Value) -> Result<Value, String> {
//!         match op {
//!             "set-limit" => control::call(op, args, |a: SetLimit| {
//!                 if a.max_transfer == 0 {
//!                     return Err("max-transfer must be at least 1".to_string());
//!                 }
//!                 self.max_transfer = a.max_transfer;
//!                 Ok(Limit { max_transfer: a.max_transfer })
//!             }),
//!             "get-limit" => control::call(op, args, |NoArgs {}| {
//!                 Ok(Limit { max_transfer: self.max_transfer })
//!             }),
//!             _ => Err(control::unknown(op)),
//!         }
//!     }
//! }
//!
//! let mut d = Dev { max_transfer: 1 };
//! let r = d.control("set-limit", &control::json!({"max-transfer": 4096}));
//! assert_eq!(r, Ok(control::json!({"max-transfer": 4096})));
//! assert_eq!(
//!     d.control("set-limit", &control::json!({"max-transfr": 1})),
//!     Err("set-limit: unknown field `max-transfr`, expected `max-transfer`".to_string())
//! );
//! assert_eq!(d.control("get-limit", &Value::Null).unwrap()["max-transfer"], 4096);
//! assert_eq!(
//!     d.control("reset-limit", &Value::Null),
//!     Err("this device has no control operation `reset-limit`".to_string())
//! );
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use serde_json::{json, Value};

/// The arguments of an operation that takes none: accepts `{}` and `null`
/// (and refuses any key).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Runs operation `op`: deserializes `args` into `A`, calls `f`, and
/// serializes its reply. `null` arguments read as `{}`, so an argument
/// struct whose fields all have defaults (or [`NoArgs`]) accepts them.
///
/// Errors are prefixed with the operation's name: `op: missing field
/// `size``; the error `f` returns is passed on as it is.
pub fn call<A, R>(
    op: &str,
    args: &Value,
    f: impl FnOnce(A) -> Result<R, String>,
) -> Result<Value, String>
where
    A: DeserializeOwned,
    R: Serialize,
{
    let a = self::args(op, args)?;
    reply(op, f(a)?)
}

/// Deserializes the arguments of `op` into `A` (what [`call`] does first),
/// for an operation that wants to look at them before deciding.
pub fn args<A: DeserializeOwned>(op: &str, args: &Value) -> Result<A, String> {
    let r = match args {
        Value::Null => A::deserialize(&Value::Object(Default::default())),
        v => A::deserialize(v),
    };
    r.map_err(|e| format!("{op}: {e}"))
}

/// Serializes the reply of `op` (what [`call`] does last).
pub fn reply<R: Serialize>(op: &str, reply: R) -> Result<Value, String> {
    serde_json::to_value(reply).map_err(|e| format!("{op}: the reply cannot be encoded: {e}"))
}

/// The refusal of an operation the device does not have, worded as the
/// default [`Device::control`](crate::Device::control) words it.
pub fn unknown(op: &str) -> String {
    format!("this device has no control operation `{op}`")
}

/// A notice from the host, sent as a control operation with
/// [`PostedWrites`] (`{"on": true}` or `false`): from now on the device's
/// BAR writes are posted, no vCPU waits for them (a remote's access ring
/// delivers them while the guest runs on), or no longer are. A device may
/// then do inline the blocking work a write starts, which it would
/// otherwise hand to a thread of its own, and spare the guest a wakeup of
/// that thread (the LSI runs a disk command at once). Reads that follow
/// still wait for that work, so it must stay bounded like any access.
///
/// A device that does not know the operation answers with an error, which
/// hosts ignore: an extension without an ABI change, so plugins built
/// before it load and work as before. (abi_stable refuses a plugin whose
/// vtables have fewer methods than the host's, so a new method would make
/// every older plugin a rebuild: docs/plugins.md, "Versions and the ABI".)
pub const POSTED_WRITES: &str = "posted-writes";

/// The arguments of [`POSTED_WRITES`].
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostedWrites {
    /// Whether writes are posted from now on.
    pub on: bool,
}

/// A request from the host, sent as a control operation with
/// [`ResumeAfterLoss`] to a device just made in a new process after its
/// old process died (or hung and was killed): take `state`, a state the
/// device saved earlier, knowing that the guest has used the device since
/// and that whatever work it started since is lost (its accesses, and
/// what they set going, died with the process). The device comes back
/// from `state` in a way its guest driver recovers from by itself,
/// without an error its users see: a SCSI controller reports a reset of
/// its bus, after which the driver issues its outstanding commands again.
///
/// A host sends it only when it has no current save (one the guest has
/// not moved past), and only to a device still as it was made; a device
/// that does not know the operation refuses it and stays so, and the host
/// says it came back reset. An extension without an ABI change, as
/// [`POSTED_WRITES`] is.
pub const RESUME_AFTER_LOSS: &str = "resume-after-loss";

/// The arguments of [`RESUME_AFTER_LOSS`].
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResumeAfterLoss {
    /// The saved state, as lowercase hex text.
    pub state: String,
}

impl ResumeAfterLoss {
    /// The arguments carrying `state`.
    pub fn new(state: &[u8]) -> Self {
        ResumeAfterLoss {
            state: hex::encode(state),
        }
    }

    /// The state's bytes; an error names what is wrong with the text.
    pub fn state(&self) -> Result<Vec<u8>, String> {
        hex::decode(&self.state).map_err(|e| format!("{RESUME_AFTER_LOSS}: state: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Resize {
        scsi_id: u8,
        #[serde(default)]
        size: Option<u64>,
    }

    #[test]
    fn a_resume_carries_the_state_as_hex_and_names_bad_text() {
        let a = ResumeAfterLoss::new(&[0, 0xab, 7]);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v, json!({"state": "00ab07"}));
        let back: ResumeAfterLoss = args(RESUME_AFTER_LOSS, &v).unwrap();
        assert_eq!(back.state(), Ok(vec![0, 0xab, 7]));
        let bad = ResumeAfterLoss { state: "0g".into() };
        let e = bad.state().unwrap_err();
        assert!(e.starts_with("resume-after-loss: state: "), "{e}");
    }

    #[test]
    fn arguments_are_typed_and_errors_name_the_op() {
        let ok = call(
            "resize",
            &json!({"scsi-id": 3, "size": 512}),
            |a: Resize| Ok(json!({"got": a.scsi_id, "size": a.size})),
        );
        assert_eq!(ok, Ok(json!({"got": 3, "size": 512})));
        let e = call("resize", &json!({"size": 512}), |_: Resize| Ok(()));
        assert_eq!(e, Err("resize: missing field `scsi-id`".to_string()));
        let e = call("resize", &json!({"scsi-id": "x"}), |_: Resize| Ok(()));
        assert_eq!(
            e,
            Err("resize: invalid type: string \"x\", expected u8".to_string())
        );
        let e = call("resize", &json!({"scsi-id": 1}), |_: Resize| {
            Err::<(), _>("busy".to_string())
        });
        assert_eq!(e, Err("busy".to_string()));
    }

    #[test]
    fn no_arguments_accept_null_and_empty_object_only() {
        assert_eq!(call("list", &Value::Null, |NoArgs {}| Ok(7)), Ok(json!(7)));
        assert_eq!(
            call("list", &json!({}), |NoArgs {}| Ok(())),
            Ok(Value::Null)
        );
        assert!(call("list", &json!({"x": 1}), |NoArgs {}| Ok(()))
            .is_err_and(|e| e.starts_with("list: unknown field `x`")));
    }
}
