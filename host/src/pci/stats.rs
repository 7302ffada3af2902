//! Access counters of a PCI function, by register: how many reads and
//! writes each BAR offset gets and how long the vCPU waited for the reads.
//! Kept for every function, remote or in-process, so that the two can be
//! compared on the same guest job (docs/benchmarks.md's per-I/O profile);
//! read at run time through QMP `query-device-stats`, and printed at the
//! end with `HOST_STATS=1`.
//!
//! A few dozen registers per device at most: a BTreeMap lookup per access
//! costs tens of nanoseconds against the microseconds of an exit.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

/// Counters of one register (a BAR, an offset and an access size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterCounts {
    pub reads: u64,
    pub read_time: Duration,
    pub read_max: Duration,
    pub writes: u64,
    /// Reads answered from the register's mirror in the access ring's
    /// page, without a round trip (counted in `reads` too).
    pub mirrored: u64,
}

/// Counters of one function.
#[derive(Clone, Debug, Default)]
pub struct AccessStats {
    registers: BTreeMap<(u8, u64, u8), RegisterCounts>,
    pub config_reads: u64,
    pub config_writes: u64,
}

fn key(bar: usize, offset: u64, len: usize) -> (u8, u64, u8) {
    (
        u8::try_from(bar).unwrap_or(u8::MAX),
        offset,
        u8::try_from(len).unwrap_or(u8::MAX),
    )
}

fn mean_us(total: Duration, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        total.as_secs_f64() * 1e6 / n as f64
    }
}

impl AccessStats {
    /// A BAR read that took `took` as the vCPU saw it.
    pub fn read(&mut self, bar: usize, offset: u64, len: usize, took: Duration) {
        let c = self.registers.entry(key(bar, offset, len)).or_default();
        c.reads += 1;
        c.read_time += took;
        c.read_max = c.read_max.max(took);
    }

    /// A BAR read answered from its mirror, taking `took`.
    pub fn mirrored_read(&mut self, bar: usize, offset: u64, len: usize, took: Duration) {
        self.read(bar, offset, len, took);
        if let Some(c) = self.registers.get_mut(&key(bar, offset, len)) {
            c.mirrored += 1;
        }
    }

    /// A BAR write.
    pub fn write(&mut self, bar: usize, offset: u64, len: usize) {
        self.registers
            .entry(key(bar, offset, len))
            .or_default()
            .writes += 1;
    }

    /// The counters of one register, if it was accessed.
    pub fn register(&self, bar: usize, offset: u64, len: usize) -> Option<RegisterCounts> {
        self.registers.get(&key(bar, offset, len)).copied()
    }

    /// BAR reads, their total time, and BAR writes, over all registers.
    pub fn totals(&self) -> (u64, Duration, u64) {
        self.registers
            .values()
            .fold((0, Duration::ZERO, 0), |(r, t, w), c| {
                (r + c.reads, t + c.read_time, w + c.writes)
            })
    }

    /// The mean BAR read time in microseconds.
    pub fn read_mean_us(&self) -> f64 {
        let (reads, time, _) = self.totals();
        mean_us(time, reads)
    }

    /// The QMP form (`query-device-stats`).
    pub fn to_json(&self) -> Value {
        let (reads, time, writes) = self.totals();
        let registers: Vec<Value> = self
            .registers
            .iter()
            .map(|(&(bar, offset, size), c)| {
                json!({
                    "bar": bar,
                    "offset": offset,
                    "size": size,
                    "reads": c.reads,
                    "read-mean-us": (mean_us(c.read_time, c.reads) * 10.0).round() / 10.0,
                    "read-max-us": c.read_max.as_micros() as u64,
                    "writes": c.writes,
                    "mirrored-reads": c.mirrored,
                })
            })
            .collect();
        json!({
            "config-reads": self.config_reads,
            "config-writes": self.config_writes,
            "bar-reads": reads,
            "bar-read-mean-us": (mean_us(time, reads) * 10.0).round() / 10.0,
            "bar-writes": writes,
            "registers": registers,
        })
    }

    /// `HOST_STATS` lines: one per register, busiest first.
    pub fn register_lines(&self, id: &str) -> Vec<String> {
        let mut regs: Vec<_> = self.registers.iter().collect();
        regs.sort_by_key(|(_, c)| std::cmp::Reverse(c.reads + c.writes));
        regs.iter()
            .map(|(&(bar, offset, size), c)| {
                format!(
                    "host-stats: device={id} register bar={bar} offset={offset:#x} size={size} reads={} read_mean_us={:.1} read_max_us={} writes={} mirrored_reads={}",
                    c.reads,
                    mean_us(c.read_time, c.reads),
                    c.read_max.as_micros(),
                    c.writes,
                    c.mirrored
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_register_and_sums() {
        let mut s = AccessStats::default();
        s.read(1, 0x14, 1, Duration::from_micros(10));
        s.read(1, 0x14, 1, Duration::from_micros(30));
        s.write(1, 0x14, 1);
        s.write(1, 0x2c, 4);
        let istat = s.register(1, 0x14, 1).unwrap();
        assert_eq!((istat.reads, istat.writes), (2, 1));
        assert_eq!(istat.read_max, Duration::from_micros(30));
        assert_eq!(s.totals(), (2, Duration::from_micros(40), 2));
        assert!((s.read_mean_us() - 20.0).abs() < 1e-9);
        let j = s.to_json();
        assert_eq!(j["bar-reads"], 2);
        assert_eq!(j["registers"].as_array().unwrap().len(), 2);
        assert_eq!(j["registers"][0]["read-mean-us"], 20.0);
        let lines = s.register_lines("lsi0");
        assert!(lines[0].contains("offset=0x14") && lines[0].contains("reads=2"));
    }
}
