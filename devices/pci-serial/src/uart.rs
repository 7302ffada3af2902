//! What `vm-superio`'s 16550A lacks for a PCI function: a level-triggered
//! interrupt line, a reset, and a saved state in bytes.
//!
//! `vm-superio` models the ISA way: it calls its `Trigger` once when an
//! interrupt cause is added (an edge). A PCI INTx line is a level, high
//! while a cause is pending *and* enabled in IER, so the plugin ignores
//! the trigger and derives the level from the UART's state after every
//! access and every byte it queues ([`irq_level`]).

use std::convert::Infallible;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IIR: transmitter holding register empty.
const IIR_THR_EMPTY: u8 = 0x02;
/// IIR: received data available.
const IIR_RDA: u8 = 0x04;
/// IER: received data available interrupt enabled.
const IER_RDA: u8 = 0x01;
/// IER: THR empty interrupt enabled.
const IER_THR_EMPTY: u8 = 0x02;
/// The UART's receive FIFO (vm-superio's).
pub const FIFO_SIZE: usize = 64;
/// Version of the saved state's layout.
const STATE_VERSION: u8 = 1;
/// Register bytes in the saved state, after the version.
const STATE_REGS: usize = 9;

/// The trigger `vm-superio` calls on an edge: nothing to do, the level
/// comes from [`irq_level`].
#[derive(Debug, Clone, Copy)]
pub struct LevelFromState;

impl Trigger for LevelFromState {
    type E = Infallible;
    fn trigger(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The UART the plugin drives: output goes to `W`.
pub type Uart<W> = Serial<LevelFromState, NoEvents, W>;

/// A UART in its power-on state (what a PCI reset gives).
pub fn new_uart<W: std::io::Write>(out: W) -> Uart<W> {
    Serial::new(LevelFromState, out)
}

/// The INTx level: some cause pending in IIR whose interrupt IER enables.
/// (`vm-superio` keeps a THR-empty cause in IIR after the driver disables
/// it in IER; a real 16550 drops its output then, and so does this.)
pub fn irq_level(s: &SerialState) -> bool {
    let iir = s.interrupt_identification;
    let ier = s.interrupt_enable;
    iir & IIR_NONE == 0
        && ((iir & IIR_THR_EMPTY != 0 && ier & IER_THR_EMPTY != 0)
            || (iir & IIR_RDA != 0 && ier & IER_RDA != 0))
}

/// The state as bytes: a version, the nine registers, the receive FIFO's
/// length and bytes.
pub fn encode_state(s: &SerialState) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + STATE_REGS + 1 + s.in_buffer.len());
    out.push(STATE_VERSION);
    out.extend_from_slice(&[
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ]);
    // At most FIFO_SIZE (64) bytes: vm-superio never queues more.
    out.push(s.in_buffer.len().min(FIFO_SIZE) as u8);
    out.extend_from_slice(&s.in_buffer[..s.in_buffer.len().min(FIFO_SIZE)]);
    out
}

/// Parses [`encode_state`]'s bytes; a truncated, overlong, hostile or
/// other-version blob is an error.
pub fn decode_state(b: &[u8]) -> Result<SerialState, String> {
    let (&version, rest) = b.split_first().ok_or("state is empty")?;
    if version != STATE_VERSION {
        return Err(format!(
            "state version {version} is not understood (this plugin reads version {STATE_VERSION})"
        ));
    }
    if rest.len() < STATE_REGS + 1 {
        return Err(format!(
            "state is {} bytes, shorter than its {} register bytes",
            b.len(),
            2 + STATE_REGS
        ));
    }
    let (regs, rest) = rest.split_at(STATE_REGS);
    let (&fifo_len, fifo) = rest.split_first().ok_or("state has no FIFO length")?;
    let fifo_len = usize::from(fifo_len);
    if fifo_len > FIFO_SIZE {
        return Err(format!(
            "state's receive FIFO holds {fifo_len} bytes, more than the UART's {FIFO_SIZE}"
        ));
    }
    if fifo.len() != fifo_len {
        return Err(format!(
            "state's receive FIFO says {fifo_len} bytes but {} follow",
            fifo.len()
        ));
    }
    Ok(SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: fifo.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_bad_blobs_are_refused() {
        let mut s = SerialState {
            scratch: 0x5a,
            interrupt_enable: 3,
            ..SerialState::default()
        };
        s.in_buffer = b"hello".to_vec();
        let b = encode_state(&s);
        assert_eq!(decode_state(&b), Ok(s));
        assert!(decode_state(&[]).is_err());
        assert!(decode_state(&b[..5]).unwrap_err().contains("shorter"));
        let mut other = b.clone();
        other[0] = 9;
        assert!(decode_state(&other).unwrap_err().contains("version 9"));
        let mut long = b.clone();
        long[1 + STATE_REGS] = 200;
        assert!(decode_state(&long).unwrap_err().contains("more than"));
        let mut lying = b;
        lying.push(0);
        assert!(decode_state(&lying).unwrap_err().contains("follow"));
    }

    #[test]
    fn level_needs_a_cause_enabled() {
        let mut s = SerialState::default();
        assert!(!irq_level(&s));
        s.interrupt_identification = IIR_THR_EMPTY;
        assert!(!irq_level(&s), "THR empty but not enabled");
        s.interrupt_enable = IER_THR_EMPTY;
        assert!(irq_level(&s));
        s.interrupt_identification = IIR_NONE;
        assert!(!irq_level(&s));
    }
}
