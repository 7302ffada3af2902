//! The SCSI disk logical unit: command planning and execution, sense and
//! unit attention state.

use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::{debug, warn};

use crate::backend::Backend;
use crate::cdb::{self, opcode, Command};
use crate::config::DriveConfig;
use crate::delayed::Delayed;
use crate::inquiry::{self, UnmapLimits, VpdInfo};
use crate::mode_pages::{self, Form, ModeState};
use crate::raw_file::RawFile;
use crate::sense::{Sense, FIXED_SENSE_LEN};
use crate::BlockError;

/// SCSI status codes (SAM-5 §5.3).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
}

/// Largest data transfer of one READ/WRITE; reported as MAXIMUM TRANSFER
/// LENGTH in the Block Limits page. Longer commands get INVALID FIELD IN CDB,
/// so a guest can never make the target allocate more than this.
pub const MAX_TRANSFER_BYTES: usize = 8 << 20;

/// Largest range of one WRITE SAME (MAXIMUM WRITE SAME LENGTH).
pub const MAX_WRITE_SAME_BYTES: u64 = 1 << 30;

/// Largest range of one UNMAP descriptor (MAXIMUM UNMAP LBA COUNT).
pub const MAX_UNMAP_BYTES: u64 = 1 << 30;

/// Most descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// WRITE SAME writes its pattern in steps of at most this many bytes.
const WRITE_SAME_CHUNK: usize = 1 << 20;

/// Longest unit serial number reported (VPD page 80h).
const MAX_SERIAL_LEN: usize = 64;

/// Direction of a command's data phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    /// Target to initiator (DATA IN).
    In,
    /// Initiator to target (DATA OUT).
    Out,
}

/// What the controller must do before executing a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandPlan {
    /// Transfer `len` bytes in `dir` (`len` is 0 exactly when `dir` is
    /// `None`), then call [`ScsiDisk::execute`]. For `In`, `len` is the
    /// exact length `execute` returns on success (already cut to the
    /// allocation length); for `Out`, the bytes `execute` expects.
    Transfer { dir: DataDirection, len: usize },
    /// The command is over before any data phase (bad opcode or field, LBA
    /// out of range, write protected, unit attention...): report this.
    Complete(Completion),
}

/// The outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// [`status::GOOD`] or [`status::CHECK_CONDITION`].
    pub status: u8,
    /// Data for the initiator (`In` commands); at most the planned length.
    pub data_in: Vec<u8>,
    /// Set with CHECK CONDITION; also kept by the disk for REQUEST SENSE.
    pub sense: Option<Sense>,
}

impl Completion {
    pub fn good(data_in: Vec<u8>) -> Self {
        Completion {
            status: status::GOOD,
            data_in,
            sense: None,
        }
    }

    pub fn check_condition(sense: Sense) -> Self {
        Completion {
            status: status::CHECK_CONDITION,
            data_in: Vec::new(),
            sense: Some(sense),
        }
    }

    pub fn is_good(&self) -> bool {
        self.status == status::GOOD
    }
}

/// Mutable state of the logical unit. Held only for short, I/O-free sections.
#[derive(Debug)]
struct State {
    /// Sense of the last CHECK CONDITION, kept until REQUEST SENSE reads it
    /// or another CHECK CONDITION replaces it.
    sense: Sense,
    /// Pending unit attentions, oldest first.
    unit_attentions: Vec<Sense>,
    /// Write cache enabled (caching mode page WCE).
    wce: bool,
}

/// Default WCE after power on or reset: write back, flushed by SYNCHRONIZE
/// CACHE, as Linux expects from a disk with a volatile cache.
const DEFAULT_WCE: bool = true;

/// One SCSI disk: LUN 0 of a target. `Send + Sync`; all methods take `&self`.
pub struct ScsiDisk {
    name: String,
    backend: Box<dyn Backend>,
    block_size: u32,
    serial: String,
    naa_id: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for ScsiDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDisk")
            .field("name", &self.name)
            .field("block_size", &self.block_size)
            .field("capacity_blocks", &self.capacity_blocks())
            .field("read_only", &self.read_only())
            .finish()
    }
}

/// Result of one command: data in, or the sense to report.
type CmdResult = Result<Vec<u8>, Sense>;

fn valid_block_size(bs: u32) -> bool {
    matches!(bs, 512 | 1024 | 2048 | 4096)
}

/// Printable ASCII only, at most [`MAX_SERIAL_LEN`] bytes.
fn sanitize_serial(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_SERIAL_LEN)
        .collect()
}

impl ScsiDisk {
    /// Opens the drive's image as a raw file. A relative `file` is resolved
    /// against `base_dir`. The capacity is the file size rounded down to a
    /// whole number of blocks (trailing bytes are never accessed; a warning
    /// is logged); a file smaller than one block is an error.
    pub fn open(cfg: &DriveConfig, base_dir: &Path) -> Result<Self, BlockError> {
        if cfg.lun != 0 {
            return Err(BlockError::UnsupportedLun(cfg.lun));
        }
        let block_size = cfg.block_size.unwrap_or(512);
        if !valid_block_size(block_size) {
            return Err(BlockError::InvalidBlockSize(block_size));
        }
        let path = if cfg.file.is_absolute() {
            cfg.file.clone()
        } else {
            base_dir.join(&cfg.file)
        };
        let file =
            RawFile::open(&path, cfg.read_only, cfg.direct).map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        let size = file.size();
        if size < u64::from(block_size) {
            return Err(BlockError::TooSmall {
                path,
                size,
                block_size,
            });
        }
        let name = cfg.id.clone().unwrap_or_else(|| path.display().to_string());
        if size % u64::from(block_size) != 0 {
            warn!(
                drive = %name,
                size,
                block_size,
                "image size is not a multiple of the block size; the trailing {} bytes are not used",
                size % u64::from(block_size)
            );
        }
        let serial = cfg
            .serial
            .as_deref()
            .or(cfg.id.as_deref())
            .map(sanitize_serial)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                let abs = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                format!(
                    "{:016X}",
                    inquiry::fnv1a(abs.as_os_str().as_encoded_bytes())
                )
            });
        let backend: Box<dyn Backend> = if cfg.delay_us > 0 {
            Box::new(Delayed::new(
                Box::new(file),
                std::time::Duration::from_micros(cfg.delay_us),
            ))
        } else {
            Box::new(file)
        };
        Self::with_backend(name, backend, block_size, &serial)
    }

    /// A disk on any backend (for other image formats, and tests).
    pub fn with_backend(
        name: String,
        backend: Box<dyn Backend>,
        block_size: u32,
        serial: &str,
    ) -> Result<Self, BlockError> {
        if !valid_block_size(block_size) {
            return Err(BlockError::InvalidBlockSize(block_size));
        }
        let serial = sanitize_serial(serial);
        let naa_id = inquiry::fnv1a(serial.as_bytes());
        Ok(ScsiDisk {
            name,
            backend,
            block_size,
            serial,
            naa_id,
            state: Mutex::new(State {
                sense: Sense::no_sense(),
                unit_attentions: Vec::new(),
                wce: DEFAULT_WCE,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update
        // is a single assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Capacity in logical blocks.
    pub fn capacity_blocks(&self) -> u64 {
        self.backend.size() / u64::from(self.block_size)
    }

    pub fn read_only(&self) -> bool {
        self.backend.is_read_only()
    }

    /// Unit serial number as reported in VPD page 80h.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Write cache enabled (WCE in the caching mode page).
    pub fn write_cache_enabled(&self) -> bool {
        self.state().wce
    }

    /// The sense REQUEST SENSE would report now (the oldest pending unit
    /// attention, else the sense of the last CHECK CONDITION), without
    /// clearing it. For controllers doing autosense, [`Completion::sense`]
    /// already carries it.
    pub fn request_sense(&self) -> Sense {
        let st = self.state();
        st.unit_attentions.first().copied().unwrap_or(st.sense)
    }

    /// Bus or device reset: pending unit attentions and sense are replaced
    /// by POWER ON, RESET, OR BUS DEVICE RESET OCCURRED, and mode parameters
    /// return to their defaults. Outstanding I/O is the controller's to drop.
    pub fn reset(&self) {
        let mut st = self.state();
        st.unit_attentions.clear();
        st.unit_attentions.push(Sense::power_on_reset());
        st.sense = Sense::no_sense();
        st.wce = DEFAULT_WCE;
    }

    /// Changes the capacity to `new_size` bytes (a positive multiple of the
    /// block size) and raises CAPACITY DATA HAS CHANGED.
    pub fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        if self.read_only() {
            return Err(BlockError::ReadOnly);
        }
        if new_size == 0 || new_size % u64::from(self.block_size) != 0 {
            return Err(BlockError::InvalidSize {
                size: new_size,
                block_size: self.block_size,
            });
        }
        self.backend.resize(new_size)?;
        self.raise_unit_attention(Sense::capacity_changed());
        Ok(())
    }

    fn raise_unit_attention(&self, ua: Sense) {
        let mut st = self.state();
        if !st.unit_attentions.contains(&ua) {
            st.unit_attentions.push(ua);
        }
    }

    /// Decides the data phase of a command, without I/O. A pending unit
    /// attention is reported (and consumed) here on any command but INQUIRY,
    /// REPORT LUNS and REQUEST SENSE.
    pub fn plan(&self, lun: u8, cdb: &[u8]) -> CommandPlan {
        if lun != 0 {
            return match no_lun_response(cdb) {
                Ok(data) => transfer(DataDirection::In, data.len()),
                Err(s) => CommandPlan::Complete(Completion::check_condition(s)),
            };
        }
        let op = cdb.first().copied();
        let exempt = matches!(
            op,
            Some(opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE)
        );
        if !exempt {
            let mut st = self.state();
            if !st.unit_attentions.is_empty() {
                let ua = st.unit_attentions.remove(0);
                st.sense = ua;
                debug!(drive = %self.name, ?op, sense = %ua, "unit attention");
                return CommandPlan::Complete(Completion::check_condition(ua));
            }
        }
        match Command::parse(cdb).and_then(|c| self.plan_command(&c)) {
            Ok((dir, len)) => transfer(dir, len),
            Err(s) => CommandPlan::Complete(self.fail(op, s)),
        }
    }

    /// Executes a command after its data phase; `data_out` holds what the
    /// initiator sent for `Out` commands. May block on file I/O.
    pub fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Completion {
        if lun != 0 {
            return match no_lun_response(cdb) {
                Ok(data) => Completion::good(data),
                Err(s) => Completion::check_condition(s),
            };
        }
        let op = cdb.first().copied();
        match Command::parse(cdb).and_then(|c| self.execute_command(&c, data_out)) {
            Ok(data) => Completion::good(data),
            Err(s) => self.fail(op, s),
        }
    }

    /// Records `sense` for REQUEST SENSE and builds the CHECK CONDITION.
    fn fail(&self, op: Option<u8>, sense: Sense) -> Completion {
        debug!(drive = %self.name, ?op, %sense, "check condition");
        self.state().sense = sense;
        Completion::check_condition(sense)
    }

    fn check_writable(&self) -> Result<(), Sense> {
        if self.read_only() {
            Err(Sense::write_protected())
        } else {
            Ok(())
        }
    }

    /// `lba..lba+blocks` must lie on the medium.
    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.capacity_blocks() => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// Byte offset of `lba`.
    fn offset(&self, lba: u64) -> Result<u64, Sense> {
        lba.checked_mul(u64::from(self.block_size))
            .ok_or_else(Sense::lba_out_of_range)
    }

    /// Range check plus transfer size for READ/WRITE: the byte length.
    fn rw_len(&self, lba: u64, blocks: u32) -> Result<usize, Sense> {
        self.check_range(lba, u64::from(blocks))?;
        u64::from(blocks)
            .checked_mul(u64::from(self.block_size))
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= MAX_TRANSFER_BYTES)
            .ok_or_else(Sense::invalid_field_in_cdb)
    }

    fn write_same_len(&self, lba: u64, blocks: u32) -> Result<u64, Sense> {
        self.check_writable()?;
        self.check_range(lba, u64::from(blocks))?;
        u64::from(blocks)
            .checked_mul(u64::from(self.block_size))
            .filter(|&n| n <= MAX_WRITE_SAME_BYTES)
            .ok_or_else(Sense::invalid_field_in_cdb)
    }

    fn max_transfer_blocks(&self) -> u32 {
        u32::try_from(MAX_TRANSFER_BYTES / self.block_size as usize).unwrap_or(u32::MAX)
    }

    fn unmap_limits(&self) -> Option<UnmapLimits> {
        self.backend.supports_discard().then(|| UnmapLimits {
            max_lba_count: u32::try_from(MAX_UNMAP_BYTES / u64::from(self.block_size))
                .unwrap_or(u32::MAX),
            max_descriptors: MAX_UNMAP_DESCRIPTORS,
        })
    }

    /// The data phase of a command, validating everything that can be
    /// validated without I/O.
    fn plan_command(&self, cmd: &Command) -> Result<(DataDirection, usize), Sense> {
        use DataDirection::{In, None as NoData, Out};
        Ok(match *cmd {
            Command::TestUnitReady(_) | Command::StartStopUnit(_) => (NoData, 0),
            Command::RequestSense(c) => (In, usize::from(c.alloc_len).min(FIXED_SENSE_LEN)),
            Command::Inquiry(_)
            | Command::ModeSense6(_)
            | Command::ModeSense10(_)
            | Command::ReadCapacity10(_)
            | Command::ReadCapacity16(_)
            | Command::ReportLuns(_) => (In, self.emulate_data_in(cmd)?.len()),
            Command::ModeSelect6(c) => (Out, usize::from(c.param_len)),
            Command::ModeSelect10(c) => (Out, usize::from(c.param_len)),
            Command::Read6(c) => (In, self.rw_len(c.lba, c.blocks)?),
            Command::Read10(c) => (In, self.rw_len(c.lba, c.blocks)?),
            Command::Read12(c) => (In, self.rw_len(c.lba, c.blocks)?),
            Command::Read16(c) => (In, self.rw_len(c.lba, c.blocks)?),
            Command::Write6(c) => self.plan_write(c.lba, c.blocks)?,
            Command::Write10(c) => self.plan_write(c.lba, c.blocks)?,
            Command::Write12(c) => self.plan_write(c.lba, c.blocks)?,
            Command::Write16(c) => self.plan_write(c.lba, c.blocks)?,
            Command::WriteAndVerify10(c) => self.plan_write(c.lba, c.blocks)?,
            Command::WriteAndVerify16(c) => self.plan_write(c.lba, c.blocks)?,
            Command::Verify10(c) => self.plan_verify(c.lba, c.blocks, c.bytchk)?,
            Command::Verify16(c) => self.plan_verify(c.lba, c.blocks, c.bytchk)?,
            Command::SynchronizeCache10(c) => {
                self.check_range(c.lba, u64::from(c.blocks))?;
                (NoData, 0)
            }
            Command::SynchronizeCache16(c) => {
                self.check_range(c.lba, u64::from(c.blocks))?;
                (NoData, 0)
            }
            Command::WriteSame10(c) => {
                self.write_same_len(c.lba, c.blocks)?;
                (Out, self.block_size as usize)
            }
            Command::WriteSame16(c) => {
                self.write_same_len(c.lba, c.blocks)?;
                if c.ndob {
                    (NoData, 0)
                } else {
                    (Out, self.block_size as usize)
                }
            }
            Command::Unmap(c) => {
                self.check_writable()?;
                if !self.backend.supports_discard() {
                    // Not advertised (LBPU=0): as if the command did not exist.
                    return Err(Sense::invalid_opcode());
                }
                (Out, usize::from(c.param_len))
            }
        })
    }

    fn plan_verify(
        &self,
        lba: u64,
        blocks: u32,
        bytchk: bool,
    ) -> Result<(DataDirection, usize), Sense> {
        if bytchk {
            Ok((DataDirection::Out, self.rw_len(lba, blocks)?))
        } else {
            self.check_range(lba, u64::from(blocks))?;
            Ok((DataDirection::None, 0))
        }
    }

    fn plan_write(&self, lba: u64, blocks: u32) -> Result<(DataDirection, usize), Sense> {
        self.check_writable()?;
        Ok((DataDirection::Out, self.rw_len(lba, blocks)?))
    }

    /// Responses of the commands that only report state (no I/O), cut to
    /// the allocation length.
    fn emulate_data_in(&self, cmd: &Command) -> CmdResult {
        let (data, alloc_len) = match *cmd {
            Command::Inquiry(c) => (
                self.inquiry(inquiry::PERIPHERAL_DISK, &c)?,
                c.alloc_len.into(),
            ),
            Command::ModeSense6(c) => (
                mode_pages::mode_sense(
                    &self.mode_state(),
                    Form::Six,
                    c.dbd,
                    c.pc,
                    c.page_code,
                    c.subpage,
                )?,
                usize::from(c.alloc_len),
            ),
            Command::ModeSense10(c) => (
                mode_pages::mode_sense(
                    &self.mode_state(),
                    Form::Ten { llbaa: c.llbaa },
                    c.dbd,
                    c.pc,
                    c.page_code,
                    c.subpage,
                )?,
                usize::from(c.alloc_len),
            ),
            Command::ReadCapacity10(_) => (self.read_capacity10(), usize::MAX),
            Command::ReadCapacity16(c) => (
                self.read_capacity16(),
                usize::try_from(c.alloc_len).unwrap_or(usize::MAX),
            ),
            Command::ReportLuns(c) => (
                report_luns(),
                usize::try_from(c.alloc_len).unwrap_or(usize::MAX),
            ),
            _ => return Err(Sense::invalid_opcode()),
        };
        Ok(truncated(data, alloc_len))
    }

    fn vpd_info(&self) -> VpdInfo<'_> {
        VpdInfo {
            serial: &self.serial,
            naa_id: self.naa_id,
            block_size: self.block_size,
            max_transfer_blocks: self.max_transfer_blocks(),
            max_write_same_blocks: MAX_WRITE_SAME_BYTES / u64::from(self.block_size),
            unmap: self.unmap_limits(),
        }
    }

    fn inquiry(&self, peripheral: u8, c: &cdb::Inquiry) -> CmdResult {
        if c.evpd {
            inquiry::vpd_page(peripheral, c.page_code, &self.vpd_info())
        } else {
            Ok(inquiry::standard(peripheral))
        }
    }

    fn mode_state(&self) -> ModeState {
        ModeState {
            wce: self.state().wce,
            read_only: self.read_only(),
            block_size: self.block_size,
            capacity_blocks: self.capacity_blocks(),
        }
    }

    fn read_capacity10(&self) -> Vec<u8> {
        let last = self.capacity_blocks().saturating_sub(1);
        // RETURNED LOGICAL BLOCK ADDRESS FFFFFFFFh: use READ CAPACITY(16).
        let last = u32::try_from(last)
            .ok()
            .filter(|&l| l != u32::MAX)
            .unwrap_or(u32::MAX);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&last.to_be_bytes());
        d.extend_from_slice(&self.block_size.to_be_bytes());
        d
    }

    fn read_capacity16(&self) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.capacity_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: report 4 KiB physical
        // blocks so guests align their I/O (good for O_DIRECT backends).
        d[13] = (4096 / self.block_size).max(1).trailing_zeros() as u8;
        if self.backend.supports_discard() {
            // LBPME: logical block provisioning management enabled.
            d[14] = 0x80;
        }
        d
    }

    fn execute_command(&self, cmd: &Command, data_out: &[u8]) -> CmdResult {
        // Re-validate: the capacity or the state may have changed since
        // plan(), and a controller may call execute() alone.
        let (dir, len) = self.plan_command(cmd)?;
        let out = match dir {
            DataDirection::Out => data_out.get(..len),
            _ => Some(&[][..]),
        };
        match *cmd {
            Command::TestUnitReady(_) => Ok(Vec::new()),
            Command::RequestSense(c) => {
                let sense = {
                    let mut st = self.state();
                    let s = if st.unit_attentions.is_empty() {
                        st.sense
                    } else {
                        st.unit_attentions.remove(0)
                    };
                    st.sense = Sense::no_sense();
                    s
                };
                Ok(truncated(sense.to_fixed().to_vec(), c.alloc_len.into()))
            }
            Command::Inquiry(_)
            | Command::ModeSense6(_)
            | Command::ModeSense10(_)
            | Command::ReadCapacity10(_)
            | Command::ReadCapacity16(_)
            | Command::ReportLuns(_) => self.emulate_data_in(cmd),
            Command::ModeSelect6(_) | Command::ModeSelect10(_) => {
                let ten = matches!(cmd, Command::ModeSelect10(_));
                let params = out.ok_or_else(Sense::param_list_length_error)?;
                self.mode_select(ten, params)
            }
            Command::StartStopUnit(c) => {
                if !c.start && c.power_condition == 0 && !c.no_flush {
                    // Stopping the unit writes back its cache.
                    self.flush()?;
                }
                Ok(Vec::new())
            }
            Command::Read6(c) => self.read(c.lba, len),
            Command::Read10(c) => self.read(c.lba, len),
            Command::Read12(c) => self.read(c.lba, len),
            Command::Read16(c) => self.read(c.lba, len),
            Command::Write6(c) => self.write(c.lba, out, false),
            Command::Write10(c) => self.write(c.lba, out, c.fua),
            Command::Write12(c) => self.write(c.lba, out, c.fua),
            Command::Write16(c) => self.write(c.lba, out, c.fua),
            Command::WriteAndVerify10(c) => self.write_and_verify(c.lba, out, c.bytchk),
            Command::WriteAndVerify16(c) => self.write_and_verify(c.lba, out, c.bytchk),
            // Without BYTCHK the range check in plan_command is the
            // verification.
            Command::Verify10(c) => self.verify(c.lba, out, c.bytchk),
            Command::Verify16(c) => self.verify(c.lba, out, c.bytchk),
            Command::SynchronizeCache10(_) | Command::SynchronizeCache16(_) => {
                self.flush()?;
                Ok(Vec::new())
            }
            Command::WriteSame10(c) => self.write_same(c.lba, c.blocks, c.unmap, out),
            Command::WriteSame16(c) => {
                let zeros;
                let pattern = if c.ndob {
                    zeros = vec![0u8; self.block_size as usize];
                    Some(&zeros[..])
                } else {
                    out
                };
                self.write_same(c.lba, c.blocks, c.unmap, pattern)
            }
            Command::Unmap(_) => {
                let params = out.ok_or_else(Sense::param_list_length_error)?;
                self.unmap(params)
            }
        }
    }

    fn flush(&self) -> Result<(), Sense> {
        self.backend.flush().map_err(|e| {
            warn!(drive = %self.name, error = %e, "flush failed");
            Sense::flush_error()
        })
    }

    fn read(&self, lba: u64, len: usize) -> CmdResult {
        let offset = self.offset(lba)?;
        let mut buf = vec![0u8; len];
        self.backend.read_at(&mut buf, offset).map_err(|e| {
            warn!(drive = %self.name, lba, len, error = %e, "read failed");
            Sense::unrecovered_read_error().with_info(lba)
        })?;
        Ok(buf)
    }

    fn write(&self, lba: u64, data: Option<&[u8]>, fua: bool) -> CmdResult {
        let data = data.ok_or_else(Sense::data_phase_error)?;
        let offset = self.offset(lba)?;
        self.backend.write_at(data, offset).map_err(|e| {
            warn!(drive = %self.name, lba, len = data.len(), error = %e, "write failed");
            write_sense(&e, lba)
        })?;
        if fua || !self.write_cache_enabled() {
            self.flush()?;
        }
        Ok(Vec::new())
    }

    /// WRITE AND VERIFY: the write is made durable before status; with
    /// BYTCHK the blocks are read back and compared with what was sent.
    fn write_and_verify(&self, lba: u64, data: Option<&[u8]>, bytchk: bool) -> CmdResult {
        self.write(lba, data, true)?;
        self.verify(lba, data, bytchk)
    }

    /// With BYTCHK, compares the medium from `lba` with `data`
    /// (MISCOMPARE, INFORMATION = offset of the first differing byte).
    fn verify(&self, lba: u64, data: Option<&[u8]>, bytchk: bool) -> CmdResult {
        if bytchk {
            let data = data.ok_or_else(Sense::data_phase_error)?;
            let back = self.read(lba, data.len())?;
            if let Some(i) = back.iter().zip(data).position(|(a, b)| a != b) {
                return Err(Sense::miscompare().with_info(i as u64));
            }
        }
        Ok(Vec::new())
    }

    fn write_same(&self, lba: u64, blocks: u32, unmap: bool, pattern: Option<&[u8]>) -> CmdResult {
        let pattern = pattern.ok_or_else(Sense::data_phase_error)?;
        let total = self.write_same_len(lba, blocks)?;
        let offset = self.offset(lba)?;
        if unmap && self.backend.supports_discard() && pattern.iter().all(|&b| b == 0) {
            match self.backend.discard(offset, total) {
                Ok(()) => return Ok(Vec::new()),
                // Fall back to writing the zeros.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                Err(e) => {
                    warn!(drive = %self.name, lba, error = %e, "discard failed");
                    return Err(write_sense(&e, lba));
                }
            }
        }
        let bs = self.block_size as usize;
        let chunk_blocks = (WRITE_SAME_CHUNK / bs).min(blocks as usize).max(1);
        let buf = pattern.repeat(chunk_blocks);
        let mut done = 0u64;
        while done < u64::from(blocks) {
            let n = (u64::from(blocks) - done).min(chunk_blocks as u64);
            let chunk = buf.get(..n as usize * bs).unwrap_or(&buf);
            let cur = lba + done;
            self.backend
                .write_at(chunk, self.offset(cur)?)
                .map_err(|e| {
                    warn!(drive = %self.name, lba = cur, error = %e, "write same failed");
                    write_sense(&e, cur)
                })?;
            done += n;
        }
        if !self.write_cache_enabled() {
            self.flush()?;
        }
        Ok(Vec::new())
    }

    fn unmap(&self, params: &[u8]) -> CmdResult {
        let descs = cdb::Unmap::parse_params(params)?;
        let limits = self.unmap_limits().ok_or_else(Sense::invalid_opcode)?;
        if descs.len() > limits.max_descriptors as usize {
            return Err(Sense::invalid_field_in_param_list());
        }
        // Validate the whole list before changing anything.
        for d in &descs {
            if d.blocks > limits.max_lba_count {
                return Err(Sense::invalid_field_in_param_list());
            }
            self.check_range(d.lba, u64::from(d.blocks))?;
        }
        for d in descs.iter().filter(|d| d.blocks > 0) {
            let offset = self.offset(d.lba)?;
            let len = u64::from(d.blocks) * u64::from(self.block_size);
            match self.backend.discard(offset, len) {
                Ok(()) => {}
                // LBPRZ=0: leaving the data in place is a valid unmap.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => break,
                Err(e) => {
                    warn!(drive = %self.name, lba = d.lba, error = %e, "unmap failed");
                    return Err(write_sense(&e, d.lba));
                }
            }
        }
        Ok(Vec::new())
    }

    fn mode_select(&self, ten: bool, params: &[u8]) -> CmdResult {
        let changes = mode_pages::mode_select(&self.mode_state(), ten, params)?;
        if let Some(wce) = changes.wce {
            let was = std::mem::replace(&mut self.state().wce, wce);
            if was && !wce {
                // Going write-through: nothing may stay in the cache.
                self.flush()?;
            }
        }
        Ok(Vec::new())
    }
}

/// Sense for a failed write: DATA PROTECT if the backend refused it as
/// read-only, MEDIUM ERROR / WRITE ERROR otherwise.
fn write_sense(e: &io::Error, lba: u64) -> Sense {
    if e.kind() == io::ErrorKind::PermissionDenied {
        Sense::write_protected()
    } else {
        Sense::write_error().with_info(lba)
    }
}

fn transfer(dir: DataDirection, len: usize) -> CommandPlan {
    let dir = if len == 0 { DataDirection::None } else { dir };
    CommandPlan::Transfer { dir, len }
}

fn truncated(mut data: Vec<u8>, alloc_len: usize) -> Vec<u8> {
    data.truncate(alloc_len);
    data
}

/// REPORT LUNS parameter data: one LUN, 0.
fn report_luns() -> Vec<u8> {
    let mut d = vec![0u8; 16];
    // LUN LIST LENGTH: one 8-byte entry.
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d
}

/// Responses for a LUN that does not exist: INQUIRY reports peripheral
/// qualifier 3 / type 1Fh, REPORT LUNS the target's list, REQUEST SENSE
/// LOGICAL UNIT NOT SUPPORTED as data; everything else fails with it.
fn no_lun_response(cdb: &[u8]) -> CmdResult {
    match Command::parse(cdb)? {
        Command::Inquiry(c) => {
            let data = if c.evpd {
                // Only the page list: there is nothing to identify.
                if c.page_code != 0 {
                    return Err(Sense::invalid_field_in_cdb());
                }
                vec![inquiry::PERIPHERAL_NO_LUN, 0, 0, 1, 0]
            } else {
                inquiry::standard(inquiry::PERIPHERAL_NO_LUN)
            };
            Ok(truncated(data, c.alloc_len.into()))
        }
        Command::ReportLuns(c) => Ok(truncated(
            report_luns(),
            usize::try_from(c.alloc_len).unwrap_or(usize::MAX),
        )),
        Command::RequestSense(c) => Ok(truncated(
            Sense::lun_not_supported().to_fixed().to_vec(),
            c.alloc_len.into(),
        )),
        _ => Err(Sense::lun_not_supported()),
    }
}
