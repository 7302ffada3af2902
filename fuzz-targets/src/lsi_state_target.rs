//! The LSI53C895A controller's `restore_state`: what a restarted device
//! process (and, later, a migration) feeds it, a blob another process
//! wrote. A blob the controller refuses must leave it exactly as it was;
//! one it takes must leave a controller that works: its registers read,
//! its SCRIPTS run within their budget, and it saves a state it takes
//! back.

use std::time::Duration;

use plugin_api::harness::TestBench;

pub(crate) use crate::lsi_target::controller;
use crate::timed;

fn save(tb: &mut TestBench) -> Vec<u8> {
    match tb.function().save_state() {
        Ok(s) => s,
        Err(e) => panic!("save_state: {}", e.message),
    }
}

/// Restores `data` into a fresh controller and checks the outcome.
pub fn lsi_state(data: &[u8]) {
    let mut tb = controller();
    let before = save(&mut tb);
    match timed("restore_state", || tb.function().restore_state(data)) {
        Err(_) => assert!(
            save(&mut tb) == before,
            "a refused state changed the controller"
        ),
        Ok(()) => {
            let regs = tb.bar_address(1);
            for off in (0..0x100).step_by(4) {
                timed("register read", || tb.mmio_read(regs + off, 4));
            }
            let _ = tb.wait_idle(Duration::from_millis(2));
            let again = save(&mut tb);
            if let Err(e) = timed("restore_state", || tb.function().restore_state(&again)) {
                panic!("the controller refuses its own state: {}", e.message);
            }
        }
    }
    if let Some(why) = tb.failure() {
        panic!("the controller failed: {why}");
    }
    timed("shutdown", || drop(tb));
}

/// Whether a fresh controller takes `data` (the seeds' check).
pub fn lsi_state_verdict(data: &[u8]) -> Result<(), String> {
    let mut tb = controller();
    let r = tb
        .function()
        .restore_state(data)
        .map_err(|e| e.message.to_string());
    drop(tb);
    r
}
