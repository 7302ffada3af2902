//! The controller's state as a blob (`Device::save_state` /
//! `restore_state`): what a new device process needs to go on where the
//! old one was (a restart, later a migration), without touching guest RAM.
//!
//! JSON (byte buffers as hex), versioned. It holds the registers, the
//! SCRIPTS RAM, the processor's run state and a memory move in progress,
//! the bus (selected target, message bytes queued, the connected command
//! and the disconnected ones with their data) and the SCSI IDs of the
//! drives. A blob that is too large, truncated, of another format or
//! version, or inconsistent (a buffer of the wrong size, a command past
//! the controller's limits) is refused with a message and the controller
//! is left exactly as it was: everything is checked before anything is
//! replaced.
//!
//! Commands that were on the I/O worker at save time: a read or a command
//! without data runs again on restore (the same result); a write comes
//! back with BUSY, which the Linux SCSI midlayer retries (its DATA OUT was
//! handed to the worker and is not kept twice). Unit attentions pending
//! on a disk stay with the disk (`block`), not in this blob.

use std::collections::{BTreeSet, VecDeque};

use block::DataDirection;
use plugin_api::{Deserialize, Serialize};

use crate::chip::SCRIPT_RAM_SIZE;
use crate::chip::{Chip, PendingMove, RunState};
use crate::scsi::{
    Bus, MsgAction, Request, RequestState, MAX_CDB, MAX_OUTSTANDING, MAX_QUEUED_BYTES, MAX_TRANSFER,
};
use crate::worker::WorkerMsg;

const FORMAT: &str = "lsi53c895a-state";
/// The state layout this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest blob read: the outstanding commands' data (at most
/// [`MAX_QUEUED_BYTES`], twice that as hex) and the rest.
pub const MAX_STATE_BYTES: usize = 2 * MAX_QUEUED_BYTES + (1 << 20);
/// SCSI status BUSY.
const STATUS_BUSY: u8 = 0x08;

#[derive(Serialize, Deserialize)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
struct State {
    format: String,
    version: u32,
    regs: String,
    script_ram: String,
    bar1: u64,
    bar2: u64,
    bar_shadow: String,
    run_state: String,
    start_pending: bool,
    carry: bool,
    /// Source, destination, bytes left.
    pending_move: Option<[u32; 3]>,
    /// SCSI IDs with a drive.
    targets: Vec<u8>,
    bus: BusState,
}

#[derive(Serialize, Deserialize)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
struct BusState {
    target: u8,
    lun: u8,
    tag: Option<u8>,
    msg_in: String,
    msg_action: String,
    next_seq: u64,
    current: Option<RequestBlob>,
    queue: Vec<RequestBlob>,
}

#[derive(Serialize, Deserialize)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
struct RequestBlob {
    seq: u64,
    target: u8,
    lun: u8,
    tag: Option<u8>,
    cdb: String,
    dir: String,
    len: usize,
    data: String,
    pos: usize,
    status: u8,
    state: String,
}

/// Lower-case hex digits of `bytes`, written into one buffer:
/// `hex::encode` collects its string a `char` at a time, which was most
/// of a save's time in the fuzz build's profile (16 KiB of digits for the
/// SCRIPTS RAM; saves are taken at every idle point, for recovery).
fn to_hex(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    let mut digits = vec![0u8; bytes.len() * 2];
    match hex::encode_to_slice(bytes, &mut digits) {
        Ok(()) => String::from_utf8(digits).unwrap_or_else(|_| hex::encode(bytes)),
        Err(_) => hex::encode(bytes),
    }
}

fn unhex(what: &str, s: &str, max: usize) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || s.len() / 2 > max {
        return Err(format!(
            "{what}: {} hex digits (at most {} bytes, an even count)",
            s.len(),
            max
        ));
    }
    hex::decode(s).map_err(|e| match e {
        hex::FromHexError::InvalidHexCharacter { index, .. } => {
            format!("{what}: not hex at byte {}", index / 2)
        }
        other => format!("{what}: {other}"),
    })
}

fn exact(what: &str, s: &str, len: usize) -> Result<Vec<u8>, String> {
    let v = unhex(what, s, len)?;
    if v.len() != len {
        return Err(format!("{what}: {} bytes, {len} expected", v.len()));
    }
    Ok(v)
}

fn run_state_name(s: RunState) -> &'static str {
    match s {
        RunState::Stopped => "stopped",
        RunState::WaitReselect => "wait-reselect",
        // Running cannot be seen from outside a run (the run holds the
        // chip); should it be, the processor goes on as after a pause.
        RunState::Running | RunState::Paused => "paused",
    }
}

fn msg_action_name(a: MsgAction) -> &'static str {
    match a {
        MsgAction::Command => "command",
        MsgAction::Disconnect => "disconnect",
        MsgAction::DataIn => "data-in",
        MsgAction::DataOut => "data-out",
        MsgAction::Status => "status",
    }
}

fn request_state_name(s: RequestState) -> &'static str {
    match s {
        RequestState::Collecting => "collecting",
        RequestState::Executing => "executing",
        RequestState::Ready => "ready",
        RequestState::Transferring => "transferring",
    }
}

fn dir_name(d: DataDirection) -> &'static str {
    match d {
        DataDirection::None => "none",
        DataDirection::In => "in",
        DataDirection::Out => "out",
    }
}

fn save_request(r: &Request) -> RequestBlob {
    RequestBlob {
        seq: r.seq,
        target: r.target,
        lun: r.lun,
        tag: r.tag,
        cdb: to_hex(&r.cdb),
        dir: dir_name(r.dir).into(),
        len: r.len,
        data: to_hex(&r.data),
        pos: r.pos,
        status: r.status,
        state: request_state_name(r.state).into(),
    }
}

fn load_request(b: &RequestBlob) -> Result<Request, String> {
    let what = format!("command {}", b.seq);
    let cdb = unhex(&format!("{what}: cdb"), &b.cdb, MAX_CDB)?;
    if cdb.is_empty() {
        return Err(format!("{what}: empty cdb"));
    }
    if b.len > MAX_TRANSFER {
        return Err(format!(
            "{what}: {} bytes, more than a command moves ({MAX_TRANSFER})",
            b.len
        ));
    }
    let data = unhex(&format!("{what}: data"), &b.data, b.len)?;
    if b.pos > data.len() {
        return Err(format!(
            "{what}: position {} past its {} bytes",
            b.pos,
            data.len()
        ));
    }
    if b.target > 15 || b.lun > 7 {
        return Err(format!("{what}: target {} lun {}", b.target, b.lun));
    }
    let dir = match b.dir.as_str() {
        "none" => DataDirection::None,
        "in" => DataDirection::In,
        "out" => DataDirection::Out,
        d => return Err(format!("{what}: direction `{d}`")),
    };
    let state = match b.state.as_str() {
        "collecting" => RequestState::Collecting,
        "executing" => RequestState::Executing,
        "ready" => RequestState::Ready,
        "transferring" => RequestState::Transferring,
        s => return Err(format!("{what}: state `{s}`")),
    };
    Ok(Request {
        seq: b.seq,
        target: b.target,
        lun: b.lun,
        tag: b.tag,
        cdb,
        dir,
        len: b.len,
        data,
        pos: b.pos,
        status: b.status,
        state,
    })
}

/// What a restore still has to do once the new state is in place.
struct Followups {
    /// Commands to hand to the worker again.
    rerun: Vec<u64>,
    resume: bool,
}

impl Chip {
    /// The controller's state as a blob.
    pub fn save_state(&self) -> Vec<u8> {
        let bus = &self.bus;
        let state = State {
            format: FORMAT.into(),
            version: VERSION,
            regs: to_hex(self.regs),
            script_ram: to_hex(&self.script_ram),
            bar1: self.bar1,
            bar2: self.bar2,
            bar_shadow: to_hex(self.bar_shadow.concat()),
            run_state: run_state_name(self.state).into(),
            start_pending: self.start_pending,
            carry: self.carry,
            pending_move: self.pending_move.map(|m| [m.source, m.dest, m.remaining]),
            targets: self.targets.keys().copied().collect(),
            bus: BusState {
                target: bus.target,
                lun: bus.lun,
                tag: bus.tag,
                msg_in: to_hex(bus.msg_in.iter().copied().collect::<Vec<u8>>()),
                msg_action: msg_action_name(bus.msg_action).into(),
                next_seq: bus.next_seq,
                current: bus.current.as_ref().map(save_request),
                queue: bus.queue.iter().map(save_request).collect(),
            },
        };
        plugin_api::serde_json::to_vec(&state).unwrap_or_default()
    }

    /// Replaces the controller's state by `blob` (see the module docs);
    /// on any error nothing changed.
    pub fn restore_state(&mut self, blob: &[u8]) -> Result<(), String> {
        if blob.len() > MAX_STATE_BYTES {
            return Err(format!(
                "state of {} bytes, more than this controller ever saves ({MAX_STATE_BYTES})",
                blob.len()
            ));
        }
        let s: State = plugin_api::serde_json::from_slice(blob)
            .map_err(|e| format!("not an lsi53c895a state: {e}"))?;
        if s.format != FORMAT {
            return Err(format!("a `{}` state, not an lsi53c895a one", s.format));
        }
        if s.version != VERSION {
            return Err(format!(
                "state version {}; this lsi53c895a reads version {VERSION}",
                s.version
            ));
        }
        let regs = exact("registers", &s.regs, 256)?;
        let script_ram = exact("SCRIPTS RAM", &s.script_ram, SCRIPT_RAM_SIZE)?;
        let shadow = exact("BAR shadow", &s.bar_shadow, 12)?;
        let state = match s.run_state.as_str() {
            "stopped" => RunState::Stopped,
            "wait-reselect" => RunState::WaitReselect,
            "paused" => RunState::Paused,
            r => return Err(format!("run state `{r}`")),
        };
        let have: BTreeSet<u8> = self.targets.keys().copied().collect();
        let want: BTreeSet<u8> = s.targets.iter().copied().collect();
        if have != want {
            return Err(format!(
                "the state's drives are at scsi-ids {want:?}, this controller's at {have:?}"
            ));
        }
        let b = &s.bus;
        let msg_in = unhex("message bytes", &b.msg_in, 64)?;
        let msg_action = match b.msg_action.as_str() {
            "command" => MsgAction::Command,
            "disconnect" => MsgAction::Disconnect,
            "data-in" => MsgAction::DataIn,
            "data-out" => MsgAction::DataOut,
            "status" => MsgAction::Status,
            a => return Err(format!("message action `{a}`")),
        };
        let current = b.current.as_ref().map(load_request).transpose()?;
        let mut queue = b
            .queue
            .iter()
            .map(load_request)
            .collect::<Result<Vec<_>, _>>()?;
        let all: Vec<&Request> = queue.iter().chain(current.as_ref()).collect();
        if all.len() > MAX_OUTSTANDING {
            return Err(format!(
                "{} commands outstanding, more than {MAX_OUTSTANDING}",
                all.len()
            ));
        }
        let bytes: usize = all.iter().map(|r| r.len).sum();
        if bytes > MAX_QUEUED_BYTES {
            return Err(format!(
                "{bytes} bytes of commands outstanding, more than {MAX_QUEUED_BYTES}"
            ));
        }
        let seqs: BTreeSet<u64> = all.iter().map(|r| r.seq).collect();
        if seqs.len() != all.len() || seqs.iter().any(|&q| q > b.next_seq) {
            return Err("command sequence numbers repeat or run past the last one given".into());
        }
        // Everything checked: from here on nothing fails.
        let mut follow = Followups {
            rerun: Vec::new(),
            resume: state == RunState::Paused,
        };
        for r in queue.iter_mut() {
            if r.state != RequestState::Executing {
                continue;
            }
            if matches!(r.dir, DataDirection::Out) {
                // Its DATA OUT went to the worker with it: ask again.
                r.status = STATUS_BUSY;
                r.data.clear();
                r.pos = 0;
                r.state = RequestState::Ready;
            } else {
                follow.rerun.push(r.seq);
            }
        }
        self.regs.copy_from_slice(&regs);
        self.script_ram = script_ram;
        self.bar1 = s.bar1;
        self.bar2 = s.bar2;
        for (i, chunk) in shadow.chunks(4).enumerate() {
            self.bar_shadow[i].copy_from_slice(chunk);
        }
        self.state = state;
        self.start_pending = s.start_pending;
        self.carry = s.carry;
        self.pending_move = s.pending_move.map(|[source, dest, remaining]| PendingMove {
            source,
            dest,
            remaining,
        });
        self.bus = Bus {
            target: b.target,
            lun: b.lun,
            tag: b.tag,
            current,
            queue,
            msg_in: msg_in.into_iter().collect::<VecDeque<u8>>(),
            msg_action,
            next_seq: b.next_seq,
        };
        self.follow_up(follow);
        Ok(())
    }

    fn follow_up(&mut self, f: Followups) {
        for seq in f.rerun {
            let Some(r) = self.bus.queue.iter().find(|r| r.seq == seq) else {
                continue;
            };
            let Some(disk) = self.targets.get(&r.target).cloned() else {
                continue;
            };
            let msg = WorkerMsg::Execute {
                seq,
                disk,
                lun: r.lun,
                cdb: r.cdb.clone(),
                data_out: Vec::new(),
            };
            if !self.worker.as_ref().is_some_and(|w| w.send(msg)) {
                self.host.warn("restore: the I/O worker is gone");
            }
        }
        if f.resume {
            if let Some(w) = &self.worker {
                w.send(WorkerMsg::Resume);
            }
        }
        // The line as the restored registers say, signalled anew.
        self.irq_level = false;
        self.update_irq();
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_are_hex_encodes() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(to_hex(&bytes), hex::encode(&bytes));
        assert_eq!(to_hex([0x0a, 0xff]), "0aff");
        assert_eq!(to_hex([]), "");
    }
}
