//! The SCSI bus as the controller sees it: selection, the information
//! phases (message out/in, command, data, status), disconnection and
//! reselection, and the commands each target is working on.
//!
//! Commands that touch the medium are handed to the I/O worker and the
//! target disconnects (SAVE DATA POINTER, DISCONNECT), so the guest's
//! SCRIPTS go on; the worker's completion reselects (IDENTIFY, SIMPLE TAG)
//! and the data/status phases follow. Requests are owned values looked up
//! by sequence number, so a completion or abort for a request that is gone
//! is a no-op, never a use-after-free.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{CommandPlan, Completion, DataDirection, ScsiDisk};

use crate::chip::Chip;
use crate::instruction::phase;
use crate::regs::*;
use crate::worker::WorkerMsg;

/// The longest a disk command may have taken for the next one to run
/// inline in a posted write (`Chip::posted`): a page-cache hit takes well
/// under it even in an emulated L1, a disk that takes longer is slow,
/// and a guest read waiting behind one stays far from the VMM's
/// `timeout-ms` (1 s by default).
pub const INLINE_LIMIT: Duration = Duration::from_millis(10);

/// The largest transfer a posted write may run inline: a plain READ or
/// WRITE of at most this many bytes ([`block::plain_transfer`]). A cache
/// flush, an unmap, a WRITE SAME or VERIFY over the whole disk, or a
/// large transfer takes as long as the disk wants, whatever the last
/// command took, and goes to the worker.
pub const INLINE_MAX_BYTES: usize = 256 * 1024;

/// Runs a disk command and says how long it took (for [`INLINE_LIMIT`]),
/// on the worker or inline.
pub(crate) fn timed_execute(
    disk: &ScsiDisk,
    lun: u8,
    cdb: &[u8],
    data_out: &[u8],
) -> (Completion, Duration) {
    let t = Instant::now();
    let c = disk.execute(lun, cdb, data_out);
    (c, t.elapsed())
}

/// Largest CDB the controller accepts.
pub const MAX_CDB: usize = 16;
/// Largest data transfer of one command.
pub const MAX_TRANSFER: usize = 32 << 20;

/// SCSI status BUSY.
const STATUS_BUSY: u8 = 0x08;
/// SCSI status TASK SET FULL: the initiator retries later (Linux lowers
/// the queue depth of the device).
pub const STATUS_TASK_SET_FULL: u8 = 0x28;
/// Commands the controller keeps at once (connected or disconnected).
/// Linux's sym53c8xx queues at most 64 per device by default.
pub const MAX_OUTSTANDING: usize = 128;
/// Bytes of transfer buffers all outstanding commands may pin together:
/// commands that SCRIPTS never reselect keep theirs, so without a cap a
/// guest could grow this process without bound.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

const MSG_COMMAND_COMPLETE: u8 = 0x00;
const MSG_EXTENDED: u8 = 0x01;
const MSG_SAVE_DATA_POINTER: u8 = 0x02;
const MSG_DISCONNECT: u8 = 0x04;
const MSG_ABORT: u8 = 0x06;
const MSG_REJECT: u8 = 0x07;
const MSG_NOP: u8 = 0x08;
const MSG_BUS_DEVICE_RESET: u8 = 0x0c;
const MSG_ABORT_TAG: u8 = 0x0d;
const MSG_CLEAR_QUEUE: u8 = 0x0e;
const MSG_SIMPLE_TAG: u8 = 0x20;
const MSG_ORDERED_TAG: u8 = 0x22;
const MSG_IDENTIFY: u8 = 0x80;

/// What follows when the queued MSG IN bytes have been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MsgAction {
    #[default]
    Command,
    Disconnect,
    DataIn,
    DataOut,
    Status,
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestState {
    /// Receiving DATA OUT from the initiator.
    Collecting,
    /// On the worker.
    Executing,
    /// Done, waiting to reselect the initiator.
    Ready,
    /// Connected, moving data in / status.
    Transferring,
}

/// One SCSI command.
pub struct Request {
    pub seq: u64,
    pub target: u8,
    pub lun: u8,
    /// Queue tag, when the initiator sent one.
    pub tag: Option<u8>,
    pub cdb: Vec<u8>,
    pub dir: DataDirection,
    /// Bytes the command moves (planned).
    pub len: usize,
    /// DATA OUT collected, or DATA IN to deliver.
    pub data: Vec<u8>,
    /// Bytes of `data` already moved to the initiator.
    pub pos: usize,
    pub status: u8,
    pub state: RequestState,
}

/// Bus and nexus state.
#[derive(Default)]
pub struct Bus {
    /// Target ID selected or reselecting.
    pub target: u8,
    pub lun: u8,
    /// Tag received in MSG OUT for the command being sent.
    pub tag: Option<u8>,
    /// The connected request (data/status phases).
    pub current: Option<Request>,
    /// Disconnected requests (executing or ready to reselect).
    pub queue: Vec<Request>,
    pub msg_in: VecDeque<u8>,
    pub msg_action: MsgAction,
    pub(crate) next_seq: u64,
}

impl Bus {
    pub fn reset(&mut self) {
        self.current = None;
        self.queue.clear();
        self.msg_in.clear();
        self.msg_action = MsgAction::Command;
        self.tag = None;
    }

    pub fn outstanding(&self) -> usize {
        self.queue.len() + usize::from(self.current.is_some())
    }

    /// Transfer bytes the outstanding commands were planned with.
    pub fn queued_bytes(&self) -> usize {
        self.queue
            .iter()
            .chain(self.current.as_ref())
            .map(|r| r.len)
            .sum()
    }
}

impl Chip {
    pub(crate) fn disconnect(&mut self) {
        self.regs[SCNTL1] &= !SCNTL1_CON;
        self.regs[SSTAT1] &= !7;
        self.regs[SBCL] = 0;
        self.regs[SOCL] &= !SOCL_ATN;
        // A request still connected here was interrupted (abort, reset):
        // it has nowhere to go.
        self.bus.current = None;
        self.bus.msg_in.clear();
    }

    pub(crate) fn cancel_all_requests(&mut self) {
        self.bus.current = None;
        self.bus.queue.clear();
    }

    fn cancel_where(&mut self, keep: impl Fn(&Request) -> bool) {
        if self.bus.current.as_ref().is_some_and(|r| !keep(r)) {
            self.bus.current = None;
        }
        self.bus.queue.retain(|r| keep(r));
    }

    /// Target `id` was detached (`drive-del`). A request of it still
    /// receiving DATA OUT has no disk to go to: it ends with BUSY (the
    /// initiator retries and finds the target gone). Requests on the
    /// worker or waiting to reselect go on: they hold the disk themselves
    /// and need nothing from the target map.
    pub(crate) fn drop_target(&mut self, id: u8) {
        let Some(r) = self.bus.current.as_mut() else {
            return;
        };
        if r.target == id && r.state == RequestState::Collecting {
            r.status = STATUS_BUSY;
            r.data.clear();
            r.state = RequestState::Transferring;
            if self.connected() && self.phase() == phase::DATA_OUT {
                self.set_phase(phase::STATUS);
            }
        }
    }

    /// SELECT: connect to `id` or time out.
    pub(crate) fn select(&mut self, id: u8, atn: bool) {
        self.regs[SDID] = id;
        self.regs[SCNTL1] &= !SCNTL1_IARB;
        if !self.targets.contains_key(&id) {
            // Selection timeout: SCRIPTS stop at the next bus instruction.
            self.scsi_interrupt(0, SIST1_STO);
            self.disconnect();
            return;
        }
        self.bus.target = id;
        self.bus.lun = 0;
        self.bus.tag = None;
        self.bus.msg_in.clear();
        self.regs[SCNTL1] |= SCNTL1_CON;
        if atn {
            self.regs[SOCL] |= SOCL_ATN;
        }
        // The target always asks for a message first (as QEMU's model
        // does): SeaBIOS selects without ATN and still sends IDENTIFY.
        self.set_phase(phase::MSG_OUT);
    }

    /// MESSAGE OUT: the block move's bytes are messages from the initiator.
    pub(crate) fn msg_out(&mut self, addr: u64, count: u32) -> Result<(), ()> {
        // Messages are short; a larger move is drained without reading it.
        let n = (count as usize).min(64);
        let mut bytes = vec![0u8; n];
        self.dma_read(addr, &mut bytes)?;
        self.set_dnad(self.dnad().wrapping_add(count));
        self.set_dbc(0);
        self.regs[SOCL] &= !SOCL_ATN;
        let mut it = bytes.into_iter();
        while let Some(msg) = it.next() {
            self.regs[SFBR] = msg;
            match msg {
                MSG_DISCONNECT => self.disconnect(),
                MSG_NOP => self.set_phase(phase::COMMAND),
                MSG_EXTENDED => {
                    let len = usize::from(it.next().unwrap_or(0));
                    let code = it.next().unwrap_or(0);
                    // SDTR (1), WDTR (3) and PPR (4) are ignored: the
                    // transfer is not timed, and the driver falls back to
                    // asynchronous narrow when no answer comes.
                    if !matches!(code, 1 | 3 | 4) {
                        return self.reject_message();
                    }
                    for _ in 1..len {
                        it.next();
                    }
                }
                MSG_SIMPLE_TAG..=MSG_ORDERED_TAG => self.bus.tag = it.next(),
                MSG_ABORT_TAG => {
                    let (t, l, tag) = (self.bus.target, self.bus.lun, self.bus.tag);
                    self.cancel_where(|r| !(r.target == t && r.lun == l && r.tag == tag));
                    self.disconnect();
                }
                MSG_ABORT | MSG_CLEAR_QUEUE | MSG_BUS_DEVICE_RESET => {
                    let (t, l) = (self.bus.target, self.bus.lun);
                    if msg == MSG_ABORT {
                        self.cancel_where(|r| !(r.target == t && r.lun == l));
                    } else {
                        self.cancel_where(|r| r.target != t);
                    }
                    if msg == MSG_BUS_DEVICE_RESET {
                        if let Some(d) = self.targets.get(&t) {
                            d.reset();
                        }
                    }
                    self.disconnect();
                }
                m if m & MSG_IDENTIFY != 0 => {
                    self.bus.lun = m & 7;
                    self.set_phase(phase::COMMAND);
                }
                _ => return self.reject_message(),
            }
        }
        Ok(())
    }

    fn reject_message(&mut self) -> Result<(), ()> {
        self.bus.msg_in.clear();
        self.bus.msg_in.push_back(MSG_REJECT);
        self.bus.msg_action = MsgAction::Command;
        self.set_phase(phase::MSG_IN);
        Ok(())
    }

    /// COMMAND: reads the CDB and starts the command.
    pub(crate) fn command(&mut self, addr: u64, count: u32) -> Result<(), ()> {
        let n = (count as usize).min(MAX_CDB);
        let mut cdb = vec![0u8; n];
        self.dma_read(addr, &mut cdb)?;
        self.set_dnad(self.dnad().wrapping_add(count));
        self.set_dbc(0);
        self.regs[SFBR] = cdb.first().copied().unwrap_or(0);
        let target = self.bus.target;
        let lun = self.bus.lun;
        let Some(disk) = self.targets.get(&target).cloned() else {
            self.disconnect();
            return Ok(());
        };
        self.bus.next_seq += 1;
        self.stats.commands += 1;
        let mut req = Request {
            seq: self.bus.next_seq,
            target,
            lun,
            tag: self.bus.tag,
            cdb,
            dir: DataDirection::None,
            len: 0,
            data: Vec::new(),
            pos: 0,
            status: 0,
            state: RequestState::Transferring,
        };
        match disk.plan(lun, &req.cdb) {
            CommandPlan::Complete(c) => self.finish_inline(req, c),
            CommandPlan::Transfer { dir, len } => {
                if len > MAX_TRANSFER {
                    // The disk planned it, but one command may not pin
                    // more host memory than this.
                    req.status = 2;
                    self.bus.current = Some(req);
                    self.set_phase(phase::STATUS);
                    return Ok(());
                }
                if self.bus.outstanding() >= MAX_OUTSTANDING
                    || self.bus.queued_bytes() + len > MAX_QUEUED_BYTES
                {
                    // Nor may all of them together: the initiator gets
                    // TASK SET FULL and tries again when some are done.
                    req.status = STATUS_TASK_SET_FULL;
                    self.bus.current = Some(req);
                    self.set_phase(phase::STATUS);
                    return Ok(());
                }
                req.dir = dir;
                req.len = len;
                // Commands that may block on the backend run on the worker.
                let medium = block::may_block(req.cdb.first().copied().unwrap_or(0));
                match dir {
                    DataDirection::Out => {
                        req.state = RequestState::Collecting;
                        req.data.reserve(len);
                        self.bus.current = Some(req);
                        if len == 0 {
                            self.dispatch_current(&disk);
                        } else {
                            self.set_phase(phase::DATA_OUT);
                        }
                    }
                    _ if medium => {
                        self.bus.current = Some(req);
                        self.dispatch_current(&disk);
                    }
                    _ => {
                        let c = disk.execute(lun, &req.cdb, &[]);
                        self.finish_inline(req, c);
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_inline(&mut self, mut req: Request, c: Completion) {
        req.status = c.status;
        req.data = c.data_in;
        req.data.truncate(req.len);
        req.pos = 0;
        req.state = RequestState::Transferring;
        let has_data = !req.data.is_empty();
        self.bus.current = Some(req);
        self.set_phase(if has_data {
            phase::DATA_IN
        } else {
            phase::STATUS
        });
    }

    /// Hands the connected request to the worker and disconnects.
    ///
    /// Or, in a posted write (a remote's access ring: no vCPU waits for
    /// it, `control::POSTED_WRITES`) while the worker has nothing in
    /// hand, runs it at once and stays connected, as a command without
    /// medium access does: the guest is spared a wakeup of the worker, the
    /// disconnect and the reselection, which cost a remote more than the
    /// command itself (docs/benchmarks.md). Only with the worker idle, so
    /// a command never overtakes one handed over before; and only while
    /// the disk's last command took less than [`INLINE_LIMIT`], and only
    /// for a plain READ or WRITE of at most [`INLINE_MAX_BYTES`]: a slow
    /// disk's commands go to the worker, so a guest read that follows a
    /// posted write never waits long behind it (docs/security.md), and
    /// the first fast one brings them back.
    fn dispatch_current(&mut self, disk: &Arc<ScsiDisk>) {
        let Some(mut req) = self.bus.current.take() else {
            return;
        };
        if self.posted
            && self.last_execute < INLINE_LIMIT
            && block::plain_transfer(req.cdb.first().copied().unwrap_or(0))
            && req.len <= INLINE_MAX_BYTES
            && self.worker.as_ref().is_some_and(|w| w.idle())
        {
            let data_out = std::mem::take(&mut req.data);
            let (c, took) = timed_execute(disk, req.lun, &req.cdb, &data_out);
            self.last_execute = took;
            self.stats.commands_inline += 1;
            self.finish_inline(req, c);
            return;
        }
        req.state = RequestState::Executing;
        let msg = WorkerMsg::Execute {
            seq: req.seq,
            disk: disk.clone(),
            lun: req.lun,
            cdb: req.cdb.clone(),
            data_out: std::mem::take(&mut req.data),
        };
        let sent = self.worker.as_ref().is_some_and(|w| w.send(msg));
        if !sent {
            // No worker (shutting down): fail the command visibly.
            req.status = STATUS_BUSY;
            req.state = RequestState::Transferring;
            self.bus.current = Some(req);
            self.set_phase(phase::STATUS);
            return;
        }
        self.bus.queue.push(req);
        self.bus.msg_in.clear();
        self.bus.msg_in.push_back(MSG_SAVE_DATA_POINTER);
        self.bus.msg_in.push_back(MSG_DISCONNECT);
        self.bus.msg_action = MsgAction::Disconnect;
        self.set_phase(phase::MSG_IN);
    }

    /// DATA IN: moves up to `count` bytes to the initiator. Returns the
    /// bytes moved.
    pub(crate) fn data_in(&mut self, addr: u64, count: u32) -> Result<u32, ()> {
        let chunk = match self.bus.current.as_mut() {
            Some(req) => {
                let avail = req.data.len().saturating_sub(req.pos);
                let n = (count as usize).min(avail);
                let chunk = req.data[req.pos..req.pos + n].to_vec();
                req.pos += n;
                chunk
            }
            None => Vec::new(),
        };
        // The copy is taken before the DMA: a write that lands in our own
        // registers and resets the bus cannot pull the buffer away.
        if !chunk.is_empty() {
            self.dma_write(addr, &chunk)?;
            self.regs[SFBR] = chunk[0];
        }
        let n = chunk.len() as u32;
        let done = self
            .bus
            .current
            .as_ref()
            .is_none_or(|r| r.pos >= r.data.len());
        if done && self.connected() && self.phase() == phase::DATA_IN {
            self.set_phase(phase::STATUS);
        }
        Ok(n)
    }

    /// DATA OUT: takes up to `count` bytes from the initiator.
    pub(crate) fn data_out(&mut self, addr: u64, count: u32) -> Result<u32, ()> {
        let want = match self.bus.current.as_ref() {
            Some(r) if r.state == RequestState::Collecting => {
                r.len.saturating_sub(r.data.len()).min(count as usize)
            }
            _ => 0,
        };
        let mut buf = vec![0u8; want];
        if want > 0 {
            self.dma_read(addr, &mut buf)?;
        }
        let mut complete = false;
        if let Some(r) = self.bus.current.as_mut() {
            if r.state == RequestState::Collecting {
                r.data.extend_from_slice(&buf);
                complete = r.data.len() >= r.len;
            }
        }
        if let Some(&b) = buf.first() {
            self.regs[SFBR] = b;
        }
        if complete {
            let target = self.bus.target;
            if let Some(disk) = self.targets.get(&target).cloned() {
                self.dispatch_current(&disk);
            }
        }
        Ok(want as u32)
    }

    /// STATUS: one status byte, then COMMAND COMPLETE.
    pub(crate) fn status(&mut self, addr: u64, count: u32) -> Result<u32, ()> {
        let status = self.bus.current.take().map_or(0, |r| r.status);
        self.dma_write(addr, &[status])?;
        self.regs[SFBR] = status;
        self.bus.msg_in.clear();
        self.bus.msg_in.push_back(MSG_COMMAND_COMPLETE);
        self.bus.msg_action = MsgAction::Disconnect;
        self.set_phase(phase::MSG_IN);
        Ok(count.min(1))
    }

    /// MESSAGE IN: delivers queued message bytes.
    pub(crate) fn msg_in(&mut self, addr: u64, count: u32) -> Result<u32, ()> {
        let n = (count as usize).min(self.bus.msg_in.len());
        let bytes: Vec<u8> = self.bus.msg_in.drain(..n).collect();
        if !bytes.is_empty() {
            self.dma_write(addr, &bytes)?;
            self.regs[SFBR] = bytes[0];
            // Linux relies on the last byte being in SIDL.
            self.regs[SIDL] = bytes[bytes.len() - 1];
        }
        if self.bus.msg_in.is_empty() && self.connected() && self.phase() == phase::MSG_IN {
            match self.bus.msg_action {
                MsgAction::Command => self.set_phase(phase::COMMAND),
                MsgAction::Disconnect => self.disconnect(),
                MsgAction::DataIn => self.set_phase(phase::DATA_IN),
                MsgAction::DataOut => self.set_phase(phase::DATA_OUT),
                MsgAction::Status => self.set_phase(phase::STATUS),
            }
        }
        Ok(n as u32)
    }

    /// Reselects the initiator for a finished request, if one is ready
    /// and the bus is free. Returns whether it did.
    pub(crate) fn reselect_ready(&mut self) -> bool {
        if self.connected() {
            return false;
        }
        let Some(i) = self
            .bus
            .queue
            .iter()
            .position(|r| r.state == RequestState::Ready)
        else {
            return false;
        };
        let mut req = self.bus.queue.remove(i);
        self.stats.reselections += 1;
        req.state = RequestState::Transferring;
        let id = req.target;
        self.regs[SSID] = 0x80 | id;
        if self.regs[DCNTL] & DCNTL_COM == 0 {
            self.regs[SFBR] = 1u8.wrapping_shl(u32::from(id & 7));
        }
        self.regs[SCNTL1] |= SCNTL1_CON;
        self.bus.target = id;
        self.bus.lun = req.lun;
        self.bus.tag = req.tag;
        self.bus.msg_in.clear();
        self.bus.msg_in.push_back(MSG_IDENTIFY | req.lun);
        if let Some(tag) = req.tag {
            self.bus.msg_in.push_back(MSG_SIMPLE_TAG);
            self.bus.msg_in.push_back(tag);
        }
        self.bus.msg_action = if req.pos < req.data.len() {
            MsgAction::DataIn
        } else {
            MsgAction::Status
        };
        self.bus.current = Some(req);
        self.set_phase(phase::MSG_IN);
        if self.regs[SIEN0] & SIST0_RSL != 0 && self.regs[SCID] & SCID_RRE != 0 {
            self.scsi_interrupt(SIST0_RSL, 0);
        }
        true
    }

    /// The worker finished request `seq`.
    pub(crate) fn complete_request(&mut self, seq: u64, c: Completion) {
        let Some(req) = self.bus.queue.iter_mut().find(|r| r.seq == seq) else {
            return; // aborted or reset meanwhile
        };
        req.status = c.status;
        req.data = if matches!(req.dir, DataDirection::In) {
            let mut d = c.data_in;
            d.truncate(req.len);
            d
        } else {
            Vec::new()
        };
        req.pos = 0;
        req.state = RequestState::Ready;
    }
}
