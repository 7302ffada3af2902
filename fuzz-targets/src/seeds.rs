//! Hand-made starting inputs for each target: whole, valid sessions (so
//! the fuzzer starts deep in each protocol) and a few known-bad ones.
//! `cargo run -p fuzz-targets --example write_seeds` writes them into
//! `fuzz/corpus/<target>/seed-*`; the fuzzer grows the corpus from there.

use channel::mpqemu::messages::{BarAccess, ConfigAccess, Message, SyncSysmem, SysmemSlot};
use channel::vfio_user::messages::{Capabilities, Command, DeviceFeature, MigData};
use channel::vfio_user::migration::{
    DmaLoggingReport, DmaLoggingStart, DmaRange, MigDeviceState, MigState, DEVICE_FEATURE_GET,
    DEVICE_FEATURE_PROBE, DEVICE_FEATURE_SET, FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION,
    FEATURE_MIG_DEVICE_STATE,
};
use channel::vfio_user::{
    DeviceInfo, DmaMap, DmaUnmap, Header, IrqInfo, RegionAccess, RegionInfo, SetIrqs, Version,
};
use channel::vfio_user::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, FLAG_NO_REPLY,
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD,
    PCI_CONFIG_REGION_INDEX,
};

use crate::lsi_target::op;

/// A named seed of one target.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub data: Vec<u8>,
}

/// The bytes of `target`'s seed `name` (empty when there is none).
pub fn named(target: &str, name: &str) -> Vec<u8> {
    all()
        .into_iter()
        .find(|s| s.target == target && s.name == name)
        .map(|s| s.data)
        .unwrap_or_default()
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut v = Vec::new();
    for (name, data) in vfio_user_seeds() {
        v.push(Seed {
            target: "vfio_user",
            name,
            data,
        });
    }
    for (name, data) in vfio_user_client_seeds() {
        v.push(Seed {
            target: "vfio_user_client",
            name,
            data,
        });
    }
    for (name, data) in mpqemu_client_seeds() {
        v.push(Seed {
            target: "mpqemu_client",
            name,
            data,
        });
    }
    for (name, data) in mpqemu_seeds() {
        v.push(Seed {
            target: "mpqemu",
            name,
            data,
        });
    }
    for (name, data) in control_seeds() {
        v.push(Seed {
            target: "control",
            name,
            data: data.into_bytes(),
        });
    }
    for (name, data) in qmp_seeds() {
        v.push(Seed {
            target: "qmp",
            name,
            data: data.into_bytes(),
        });
    }
    for (name, data) in config_seeds() {
        v.push(Seed {
            target: "config",
            name,
            data: data.into_bytes(),
        });
    }
    for (name, data) in lsi_seeds() {
        v.push(Seed {
            target: "lsi",
            name,
            data,
        });
    }
    for (name, data) in lsi_state_seeds() {
        v.push(Seed {
            target: "lsi_state",
            name,
            data,
        });
    }
    v
}

// ---- vfio-user -----------------------------------------------------------

/// A vfio-user command; `fds` goes in the header's `error` field, which
/// the target reads as what to attach (count | kind << 3).
fn vu(out: &mut Vec<u8>, id: u16, cmd: Command, fds: u32, posted: bool, payload: &[u8]) {
    let mut h = Header::command(id, cmd, payload.len(), posted);
    h.error = fds;
    h.encode(out);
    out.extend_from_slice(payload);
}

fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

fn vu_version(out: &mut Vec<u8>) {
    let v = Version {
        major: 0,
        minor: 1,
        capabilities: Capabilities {
            max_msg_fds: Some(8),
            max_data_xfer_size: Some(1 << 20),
            ..Default::default()
        },
    };
    vu(out, 0, Command::Version, 0, false, &enc(|o| v.encode(o)));
}

fn vu_write(out: &mut Vec<u8>, id: u16, region: u32, offset: u64, data: &[u8], posted: bool) {
    let a = RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    };
    let mut p = enc(|o| a.encode(o));
    p.extend_from_slice(data);
    vu(out, id, Command::RegionWrite, 0, posted, &p);
}

fn vu_read(out: &mut Vec<u8>, id: u16, region: u32, offset: u64, count: u32) {
    let a = RegionAccess {
        offset,
        region,
        count,
    };
    vu(
        out,
        id,
        Command::RegionRead,
        0,
        false,
        &enc(|o| a.encode(o)),
    );
}

fn vu_dma_map(out: &mut Vec<u8>, id: u16, fds: u32, addr: u64, size: u64, offset: u64) {
    let m = DmaMap {
        argsz: DmaMap::LEN as u32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset,
        addr,
        size,
    };
    vu(out, id, Command::DmaMap, fds, false, &enc(|o| m.encode(o)));
}

fn vu_set_irqs(out: &mut Vec<u8>, id: u16, flags: u32, count: u32, fds: u32, data: &[u8]) {
    let s = SetIrqs {
        argsz: (SetIrqs::LEN + data.len()) as u32,
        flags,
        index: 0,
        start: 0,
        count,
    };
    let mut p = enc(|o| s.encode(o));
    p.extend_from_slice(data);
    vu(out, id, Command::SetIrqs, fds, false, &p);
}

/// Where the seeds place the LSI's BARs: registers, then SCRIPTS RAM.
const REGS_BASE: u32 = 0xe000_0000;
const SRAM_BASE: u32 = 0xe000_2000;
/// LSI registers (BAR1 offsets).
const DSP: u64 = 0x2c;
const DSA: u64 = 0x10;
const ISTAT0: u64 = 0x14;
const DSTAT: u64 = 0x0c;

/// SCRIPTS for SCRIPTS RAM: copy the next part into guest RAM at
/// 0x1000, jump there; that part moves guest memory about and raises an
/// interrupt.
fn copy_and_run() -> Vec<u8> {
    let mut tail = Asm::default();
    tail.mem_move(0x100, 0x1000, 0x8000)
        .mem_move(0x40, 0xf_ff00, 0x2000) // across the end of a 1 MiB map
        .w(&[0xe100_0004 | 0x10 << 16, 0x8000]) // LOAD DSA from RAM
        .int(0x600d);
    let tail = tail.bytes();
    let mut head = Asm::default();
    head.mem_move(tail.len() as u32, SRAM_BASE + 0x100, 0x1000)
        .jump(0x1000);
    let mut b = head.bytes();
    b.resize(0x100, 0);
    b.extend_from_slice(&tail);
    b
}

fn vfio_user_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();

    // A whole session as a VMM runs it: negotiate, discover, map RAM,
    // wire INTx, place the BARs, run SCRIPTS that DMA into the mapped RAM
    // and interrupt, reset, unmap.
    let mut s = Vec::new();
    vu_version(&mut s);
    let info = DeviceInfo {
        argsz: DeviceInfo::LEN as u32,
        ..Default::default()
    };
    vu(
        &mut s,
        1,
        Command::DeviceGetInfo,
        0,
        false,
        &enc(|o| info.encode(o)),
    );
    for index in [0, 1, 2, 7, 9] {
        let r = RegionInfo {
            argsz: RegionInfo::LEN as u32,
            index,
            ..Default::default()
        };
        vu(
            &mut s,
            2,
            Command::DeviceGetRegionInfo,
            0,
            false,
            &enc(|o| r.encode(o)),
        );
    }
    let irq = IrqInfo {
        argsz: IrqInfo::LEN as u32,
        index: 0,
        ..Default::default()
    };
    vu(
        &mut s,
        3,
        Command::GetIrqInfo,
        0,
        false,
        &enc(|o| irq.encode(o)),
    );
    vu_dma_map(&mut s, 4, 1, 0, 1 << 20, 0); // one sealed 1 MiB memfd
    vu_set_irqs(
        &mut s,
        5,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        1,
        1 | 2 << 3,
        &[],
    );
    vu_set_irqs(
        &mut s,
        6,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK,
        1,
        1 | 2 << 3,
        &[],
    );
    vu_write(
        &mut s,
        7,
        PCI_CONFIG_REGION_INDEX,
        0x14,
        &REGS_BASE.to_le_bytes(),
        false,
    );
    vu_write(
        &mut s,
        7,
        PCI_CONFIG_REGION_INDEX,
        0x18,
        &SRAM_BASE.to_le_bytes(),
        false,
    );
    vu_write(&mut s, 7, PCI_CONFIG_REGION_INDEX, 4, &[0x07, 0x00], false);
    vu_read(&mut s, 8, PCI_CONFIG_REGION_INDEX, 0, 64);
    let scripts = copy_and_run();
    vu_write(&mut s, 9, 2, 0, &scripts, true);
    vu_read(&mut s, 10, 2, 0, 16);
    vu_write(&mut s, 11, 1, DSA, &0x9000u32.to_le_bytes(), true);
    vu_write(&mut s, 12, 1, DSP, &SRAM_BASE.to_le_bytes(), false);
    vu_read(&mut s, 13, 1, ISTAT0, 1);
    vu_read(&mut s, 14, 1, DSTAT, 1);
    vu_set_irqs(
        &mut s,
        15,
        IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_UNMASK,
        1,
        0,
        &[1],
    );
    vu_read(&mut s, 16, 0, 0, 4);
    vu(&mut s, 18, Command::DeviceReset, 0, false, &[]);
    let u = DmaUnmap {
        argsz: DmaUnmap::LEN as u32,
        flags: 0,
        addr: 0,
        size: 1 << 20,
    };
    vu(
        &mut s,
        19,
        Command::DmaUnmap,
        0,
        false,
        &enc(|o| u.encode(o)),
    );
    seeds.push(("session", s));

    // SCRIPTS that loop on memory moves into RAM the client then unmaps.
    let mut s = Vec::new();
    vu_version(&mut s);
    vu_dma_map(&mut s, 1, 1, 0, 1 << 20, 0);
    vu_write(
        &mut s,
        2,
        PCI_CONFIG_REGION_INDEX,
        0x18,
        &SRAM_BASE.to_le_bytes(),
        false,
    );
    vu_write(&mut s, 3, PCI_CONFIG_REGION_INDEX, 4, &[0x06, 0x00], false);
    let mut a = Asm::default();
    a.mem_move(0xf_0000, 0, 0x1_0000).jump(SRAM_BASE);
    vu_write(&mut s, 4, 2, 0, &a.bytes(), true);
    vu_write(&mut s, 5, 1, DSP, &SRAM_BASE.to_le_bytes(), true);
    let u = DmaUnmap {
        argsz: DmaUnmap::LEN as u32,
        flags: DMA_UNMAP_FLAG_ALL,
        addr: 0,
        size: 0,
    };
    vu(
        &mut s,
        6,
        Command::DmaUnmap,
        0,
        false,
        &enc(|o| u.encode(o)),
    );
    vu_read(&mut s, 7, 1, ISTAT0, 1);
    seeds.push(("dma-then-unmap", s));

    // A peer that lies: a small unsealed memfd mapped as 1 MiB, maps past
    // its end or overflowing, an eventfd where memory should be; then
    // SCRIPTS fetched from where the lie would be.
    let mut s = Vec::new();
    vu_version(&mut s);
    vu_dma_map(&mut s, 1, 1 | 1 << 3, 0, 1 << 20, 0);
    vu_dma_map(&mut s, 2, 1 | 1 << 3, 0, 0x1000, 0x1000);
    vu_dma_map(&mut s, 3, 1 | 2 << 3, 0x20_0000, 0x1000, 0);
    vu_dma_map(&mut s, 4, 1, u64::MAX - 0xfff, 0x1000, 0);
    vu_dma_map(&mut s, 5, 2, 0x30_0000, 0x1000, 0);
    vu_write(&mut s, 6, PCI_CONFIG_REGION_INDEX, 4, &[0x06, 0x00], false);
    vu_write(&mut s, 7, 1, DSP, &0x1800u32.to_le_bytes(), false);
    vu_read(&mut s, 8, 1, DSTAT, 1);
    seeds.push(("lying-maps", s));

    // Protocol errors: a command before VERSION; a VERSION whose
    // capabilities are not JSON; a reply sent to the server.
    let mut s = Vec::new();
    vu_read(&mut s, 1, 0, 0, 4);
    seeds.push(("before-version", s));
    let mut s = Vec::new();
    vu(
        &mut s,
        0,
        Command::Version,
        0,
        false,
        b"\0\0\x01\0{\"capabilities\":",
    );
    seeds.push(("bad-version", s));
    let mut s = Vec::new();
    vu_version(&mut s);
    let mut h = Header::command(1, Command::RegionRead, 0, false);
    h.flags = 1; // a reply
    h.encode(&mut s);
    seeds.push(("reply-to-server", s));

    // Accesses at and past the ends of regions, and every unsupported
    // command number with a header-only body.
    let mut s = Vec::new();
    vu_version(&mut s);
    vu_read(&mut s, 1, 1, 0x3fc, 8);
    vu_read(&mut s, 2, 1, u64::MAX - 1, 4);
    vu_read(&mut s, 3, 7, 0xfc, 4);
    vu_read(&mut s, 4, 2, 0, 1 << 20);
    vu_write(&mut s, 5, 5, 0, &[1, 2, 3, 4], false);
    vu_write(&mut s, 5, 0, 0x14, &[0xff], false);
    for cmd in 11..=20u16 {
        let mut h = Header::command(6, Command::Version, 0, false);
        h.cmd = cmd;
        h.encode(&mut s);
    }
    let mut h = Header::command(7, Command::RegionWrite, 0, FLAG_NO_REPLY != 0);
    h.msg_size = 12; // below the header
    h.encode(&mut s);
    seeds.push(("edges", s));

    // Migration v2: the states, the data both ways, the DMA dirty log.
    let mut s = Vec::new();
    vu_version(&mut s);
    vu(
        &mut s,
        1,
        Command::DeviceFeature,
        0,
        false,
        &feature(FEATURE_MIGRATION | DEVICE_FEATURE_GET, 16, &[]),
    );
    vu(
        &mut s,
        2,
        Command::DeviceFeature,
        0,
        false,
        &feature(
            FEATURE_MIG_DEVICE_STATE
                | DEVICE_FEATURE_PROBE
                | DEVICE_FEATURE_GET
                | DEVICE_FEATURE_SET,
            16,
            &[],
        ),
    );
    let ram = DmaMap {
        argsz: DmaMap::LEN as u32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0,
        addr: 0x1_0000_0000,
        size: 1 << 20,
    };
    vu(
        &mut s,
        3,
        Command::DmaMap,
        1,
        false,
        &enc(|o| ram.encode(o)),
    );
    let start = DmaLoggingStart {
        page_size: 4096,
        ranges: vec![DmaRange {
            iova: 0x1_0000_0000,
            length: 1 << 20,
        }],
    };
    vu(
        &mut s,
        4,
        Command::DeviceFeature,
        0,
        false,
        &feature(
            FEATURE_DMA_LOGGING_START | DEVICE_FEATURE_SET,
            64,
            &enc(|o| start.encode(o)),
        ),
    );
    let report = DmaLoggingReport {
        iova: 0x1_0000_0000,
        length: 1 << 20,
        page_size: 4096,
    };
    vu(
        &mut s,
        5,
        Command::DeviceFeature,
        0,
        false,
        &feature(
            FEATURE_DMA_LOGGING_REPORT | DEVICE_FEATURE_GET,
            4096,
            &enc(|o| report.encode(o)),
        ),
    );
    vu(
        &mut s,
        6,
        Command::DeviceFeature,
        0,
        false,
        &feature(FEATURE_DMA_LOGGING_STOP | DEVICE_FEATURE_SET, 8, &[]),
    );
    vu(
        &mut s,
        7,
        Command::DeviceFeature,
        0,
        false,
        &feature(
            FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET,
            16,
            &mig_state(MigState::StopCopy),
        ),
    );
    vu_read(&mut s, 8, 0, 0, 4); // refused while stopped
    vu(
        &mut s,
        9,
        Command::MigDataRead,
        0,
        false,
        &enc(|o| {
            MigData {
                argsz: 8 + 4096,
                size: 4096,
            }
            .encode(o)
        }),
    );
    vu(
        &mut s,
        10,
        Command::MigDataRead,
        0,
        false,
        &enc(|o| {
            MigData {
                argsz: 8 + 4096,
                size: 4096,
            }
            .encode(o)
        }),
    );
    for (id, state) in [(11, MigState::Running), (12, MigState::Resuming)] {
        vu(
            &mut s,
            id,
            Command::DeviceFeature,
            0,
            false,
            &feature(
                FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET,
                16,
                &mig_state(state),
            ),
        );
    }
    let mut data = enc(|o| {
        MigData {
            argsz: 8 + 24,
            size: 24,
        }
        .encode(o)
    });
    data.extend_from_slice(b"RHVUMIG\0\x01\0\0\0\x0alsi53c895a");
    data.truncate(8 + 24);
    vu(&mut s, 13, Command::MigDataWrite, 0, false, &data);
    vu(
        &mut s,
        14,
        Command::DeviceFeature,
        0,
        false,
        &feature(
            FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET,
            16,
            &mig_state(MigState::Running),
        ),
    );
    vu(
        &mut s,
        15,
        Command::DeviceFeature,
        0,
        false,
        &feature(FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_GET, 16, &[]),
    );
    vu(&mut s, 16, Command::DeviceReset, 0, false, &[]);
    vu_read(&mut s, 17, 0, 0, 4);
    seeds.push(("migration", s));
    seeds
}

/// A DEVICE_FEATURE payload.
fn feature(flags: u32, argsz: u32, data: &[u8]) -> Vec<u8> {
    let mut p = enc(|o| DeviceFeature { argsz, flags }.encode(o));
    p.extend_from_slice(data);
    p
}

fn mig_state(state: MigState) -> Vec<u8> {
    enc(|o| {
        MigDeviceState {
            device_state: state as u32,
            data_fd: u32::MAX,
        }
        .encode(o)
    })
}

// ---- vfio-user, the client's side ----------------------------------------

/// A reply to `cmd` (its id is made the request's by the peer: the seeds
/// start with an odd byte).
fn vu_reply(out: &mut Vec<u8>, cmd: Command, payload: &[u8]) {
    Header::command(0, cmd, payload.len(), false)
        .reply(payload.len())
        .encode(out);
    out.extend_from_slice(payload);
}

/// Good replies to the client session's calls, in its order, up to the
/// first `upto` of them.
fn client_replies(upto: usize) -> Vec<u8> {
    let mut replies: Vec<(Command, Vec<u8>)> = Vec::new();
    let caps = Capabilities {
        max_msg_fds: Some(8),
        max_data_xfer_size: Some(1 << 20),
        ..Default::default()
    };
    replies.push((
        Command::Version,
        enc(|o| {
            Version {
                major: 0,
                minor: 1,
                capabilities: caps,
            }
            .encode(o)
        }),
    ));
    replies.push((
        Command::DeviceGetInfo,
        enc(|o| {
            DeviceInfo {
                argsz: 16,
                flags: 3,
                num_regions: 9,
                num_irqs: 5,
            }
            .encode(o)
        }),
    ));
    for index in 0..9u32 {
        let size = match index {
            0 => 4096,
            7 => 256,
            _ => 0,
        };
        replies.push((
            Command::DeviceGetRegionInfo,
            enc(|o| {
                RegionInfo {
                    argsz: 32,
                    flags: 3,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                }
                .encode(o)
            }),
        ));
    }
    for index in 0..5u32 {
        replies.push((
            Command::GetIrqInfo,
            enc(|o| {
                IrqInfo {
                    argsz: 16,
                    flags: 1,
                    index,
                    count: u32::from(index == 0),
                }
                .encode(o)
            }),
        ));
    }
    let mut cfg = enc(|o| {
        RegionAccess {
            offset: 0,
            region: PCI_CONFIG_REGION_INDEX,
            count: 256,
        }
        .encode(o)
    });
    cfg.extend_from_slice(&[0x11; 256]);
    replies.push((Command::RegionRead, cfg));
    let mut bar = enc(|o| {
        RegionAccess {
            offset: 0x10,
            region: 0,
            count: 4,
        }
        .encode(o)
    });
    bar.extend_from_slice(&[1, 2, 3, 4]);
    replies.push((Command::RegionRead, bar));
    replies.push((
        Command::RegionWrite,
        enc(|o| {
            RegionAccess {
                offset: 0,
                region: 0,
                count: 4,
            }
            .encode(o)
        }),
    ));
    replies.push((Command::DmaMap, Vec::new()));
    replies.push((Command::SetIrqs, Vec::new()));
    replies.push((
        Command::DeviceFeature,
        feature(
            FEATURE_MIGRATION | DEVICE_FEATURE_GET,
            16,
            &1u64.to_le_bytes(),
        ),
    ));
    replies.push((
        Command::DeviceFeature,
        feature(
            FEATURE_MIGRATION | DEVICE_FEATURE_GET | DEVICE_FEATURE_PROBE,
            8,
            &[],
        ),
    ));
    replies.push((
        Command::DeviceFeature,
        feature(
            FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_GET,
            16,
            &mig_state(MigState::Running),
        ),
    ));
    replies.push((
        Command::DeviceFeature,
        feature(
            FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET,
            16,
            &mig_state(MigState::StopCopy),
        ),
    ));
    let mut data = enc(|o| {
        MigData {
            argsz: 18,
            size: 10,
        }
        .encode(o)
    });
    data.extend_from_slice(&[7; 10]);
    replies.push((Command::MigDataRead, data));
    replies.push((
        Command::DeviceFeature,
        feature(
            FEATURE_MIG_DEVICE_STATE | DEVICE_FEATURE_SET,
            16,
            &mig_state(MigState::Resuming),
        ),
    ));
    replies.push((Command::MigDataWrite, Vec::new()));
    let start = DmaLoggingStart {
        page_size: 4096,
        ranges: vec![DmaRange {
            iova: 0,
            length: 1 << 20,
        }],
    };
    replies.push((
        Command::DeviceFeature,
        feature(
            FEATURE_DMA_LOGGING_START | DEVICE_FEATURE_SET,
            40,
            &enc(|o| start.encode(o)),
        ),
    ));
    let report = DmaLoggingReport {
        iova: 0,
        length: 1 << 20,
        page_size: 4096,
    };
    let mut rep = enc(|o| report.encode(o));
    rep.extend_from_slice(&[0x81; 32]);
    replies.push((
        Command::DeviceFeature,
        feature(FEATURE_DMA_LOGGING_REPORT | DEVICE_FEATURE_GET, 64, &rep),
    ));
    replies.push((
        Command::DeviceFeature,
        feature(FEATURE_DMA_LOGGING_STOP | DEVICE_FEATURE_SET, 8, &[]),
    ));
    replies.push((
        Command::DmaUnmap,
        enc(|o| {
            DmaUnmap {
                argsz: 24,
                flags: 0,
                addr: 0,
                size: 1 << 20,
            }
            .encode(o)
        }),
    ));
    replies.push((Command::DeviceReset, Vec::new()));
    let mut out = vec![1u8];
    for (cmd, payload) in replies.into_iter().take(upto) {
        vu_reply(&mut out, cmd, &payload);
    }
    out
}

fn vfio_user_client_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = vec![
        ("session", client_replies(usize::MAX)),
        ("setup", client_replies(16)),
    ];
    // Replies whose ids are left as they are: the first mismatch breaks
    // the client.
    let mut raw = client_replies(4);
    raw[0] = 0;
    seeds.push(("unpatched", raw));
    seeds
}

// ---- mpqemu --------------------------------------------------------------

/// An mpqemu message with `fds` in the header padding (count | kind << 4).
fn mq(out: &mut Vec<u8>, m: &Message, fds: u8) {
    let start = out.len();
    m.encode(out);
    out[start + 4] = fds;
}

/// Good `RET`s to the mpqemu client session's calls, in its order.
fn mpqemu_client_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut rets: Vec<Option<u64>> = vec![
        Some(0x0012_1000), // vendor and device
        Some(0),           // BAR0
        Some(0),           // its sizing write
        Some(0xffff_f000), // its size
        Some(0),           // its placement
        Some(0x1234_5678), // a register
        Some(u64::MAX),    // eight bytes
        Some(0),           // a write
    ];
    rets.extend(std::iter::repeat_n(Some(0), 12)); // the posted writes
    rets.push(Some(0xbeef)); // an I/O read
    rets.push(None); // reset
    let mut session = Vec::new();
    for v in &rets {
        mq(&mut session, &Message::Ret(*v), 0);
    }
    // Failures where values should be, and a message that is not a RET.
    let mut odd = Vec::new();
    for v in [Some(1), Some(u64::MAX), None] {
        mq(&mut odd, &Message::Ret(v), 0);
    }
    mq(&mut odd, &Message::DeviceReset, 0);
    // A RET that claims more payload than it carries.
    let mut short = Vec::new();
    mq(&mut short, &Message::Ret(Some(7)), 0);
    short[8] = 0xff;
    vec![("session", session), ("odd", odd), ("short", short)]
}

fn mq_bar(addr: u64, val: u64, size: u32) -> BarAccess {
    BarAccess {
        addr,
        val,
        size,
        memory: true,
    }
}

fn mpqemu_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let regs = u64::from(REGS_BASE);
    let sram = u64::from(SRAM_BASE);
    let cfg = |addr: u32, val: u32, len: i32| ConfigAccess { addr, val, len };
    let mut seeds = Vec::new();

    // A session as QEMU's x-pci-proxy-dev runs it: RAM, INTx, BAR sizing
    // and placement, SCRIPTS written to SCRIPTS RAM and started.
    let mut s = Vec::new();
    let ram = SyncSysmem {
        regions: vec![SysmemSlot {
            gpa: 0,
            size: 1 << 20,
            offset: 0,
        }],
    };
    mq(&mut s, &Message::SyncSysmem(ram), 1);
    mq(&mut s, &Message::SetIrqfd, 2 | 2 << 4);
    mq(&mut s, &Message::PciCfgRead(cfg(0, 0, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x14, u32::MAX, 4)), 0);
    mq(&mut s, &Message::PciCfgRead(cfg(0x14, 0, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x10, 0xc001, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x14, REGS_BASE, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x18, SRAM_BASE, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x04, 0x0007, 2)), 0);
    for (i, w) in copy_and_run().chunks(4).enumerate() {
        let mut b = [0u8; 4];
        b[..w.len()].copy_from_slice(w);
        let v = u64::from(u32::from_le_bytes(b));
        mq(
            &mut s,
            &Message::BarWrite(mq_bar(sram + 4 * i as u64, v, 4)),
            0,
        );
    }
    mq(&mut s, &Message::BarWrite(mq_bar(regs + DSA, 0x9000, 4)), 0);
    mq(&mut s, &Message::BarWrite(mq_bar(regs + DSP, sram, 4)), 0);
    mq(&mut s, &Message::BarRead(mq_bar(regs + ISTAT0, 0, 1)), 0);
    mq(&mut s, &Message::BarRead(mq_bar(regs + DSTAT, 0, 1)), 0);
    let io = BarAccess {
        addr: 0xc000 + ISTAT0,
        val: 0,
        size: 1,
        memory: false,
    };
    mq(&mut s, &Message::BarRead(io), 0);
    mq(&mut s, &Message::PciCfgRead(cfg(0x06, 0, 2)), 0);
    mq(&mut s, &Message::DeviceReset, 0);
    seeds.push(("session", s));

    // RAM in several regions, some lying, replaced by a second SYNC while
    // SCRIPTS copy across it.
    let mut s = Vec::new();
    let slots = |n: u64| SyncSysmem {
        regions: (0..n)
            .map(|i| SysmemSlot {
                gpa: i << 20,
                size: if i == 2 { 1 << 30 } else { 1 << 20 },
                offset: 0,
            })
            .collect(),
    };
    mq(&mut s, &Message::SyncSysmem(slots(3)), 3);
    mq(&mut s, &Message::SyncSysmem(slots(2)), 2 | 1 << 4);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x14, REGS_BASE, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0x04, 0x06, 2)), 0);
    mq(
        &mut s,
        &Message::BarWrite(mq_bar(regs + DSP, 0xf_fff8, 4)),
        0,
    );
    mq(&mut s, &Message::SyncSysmem(slots(1)), 1 | 3 << 4);
    mq(&mut s, &Message::BarRead(mq_bar(regs + DSTAT, 0, 1)), 0);
    seeds.push(("sysmem", s));

    // Refusals: accesses no BAR decodes, odd sizes, config past 256 bytes,
    // a RET sent to the device, an unknown command.
    let mut s = Vec::new();
    mq(&mut s, &Message::BarRead(mq_bar(0x1000, 0, 4)), 0);
    mq(&mut s, &Message::BarRead(mq_bar(regs, 0, 3)), 0);
    mq(&mut s, &Message::PciCfgRead(cfg(0xfe, 0, 4)), 0);
    mq(&mut s, &Message::PciCfgWrite(cfg(0, 0, 5)), 0);
    mq(&mut s, &Message::SetIrqfd, 1 | 2 << 4);
    mq(&mut s, &Message::Ret(Some(0)), 0);
    seeds.push(("refusals", s));
    let mut s = Vec::new();
    s.extend_from_slice(&99i32.to_ne_bytes());
    s.extend_from_slice(&[0; 4]);
    s.extend_from_slice(&0u64.to_ne_bytes());
    seeds.push(("unknown-command", s));
    seeds
}

// ---- control -------------------------------------------------------------

fn control_seeds() -> Vec<(&'static str, String)> {
    vec![
        (
            "session",
            [
                r#"{"id": 1, "op": "ping"}"#,
                r#"{"id": 2, "op": "device-control", "device": "lsi0", "control": "drive-add", "args": {"scsi-id": 0, "file": "disk"}}"#,
                r#"{"id": 3, "op": "device-control", "device": "lsi0", "control": "drive-list", "args": null}"#,
                r#"{"id": 4, "op": "device-control", "device": "lsi0", "control": "drive-resize", "args": {"scsi-id": 0, "size": 131072}}"#,
                r#"{"id": 5, "op": "device-control", "device": "lsi0", "control": "stats"}"#,
                r#"{"id": 6, "op": "device-control", "device": "lsi0", "control": "drive-del", "args": {"scsi-id": 0}}"#,
                r#"{"id": 7, "op": "device-control", "device": "lsi0", "control": "drive-add", "args": {"scsi-id": 3, "file": "disk", "read-only": true, "block-size": 4096, "serial": "x"}}"#,
                r#"{"id": 8, "op": "device-del", "device": "lsi0"}"#,
                r#"{"id": 9, "op": "ping"}"#,
                "",
            ]
            .join("\n"),
        ),
        (
            "device-add",
            [
                r#" {"id": 1, "op": "device-add", "device": "d1", "plugin": "dma-example", "kind": null, "slot": 7, "settings": "max-transfer = 4096\n"}"#,
                r#"{"id": 2, "op": "device-add", "device": "d2", "plugin": "nothing", "slot": 8}"#,
                "\t{\"id\": 3, \"op\": \"device-add\", \"device\": \"d3\", \"plugin\": \"x\", \"slot\": 9}",
                r#" {"id": 4, "op": "device-add", "device": "lsi0", "plugin": "lsi53c895a", "slot": 300}"#,
                r#" {"id": 5, "op": "ping"}"#,
                "\r{\"id\": 6, \"op\": \"ring-setup\", \"device\": \"lsi0\"}",
                "\r{\"id\": 7, \"op\": \"ring-setup\", \"device\": \"lsi0\"}",
                "{\"id\": 8, \"op\": \"ring-setup\", \"device\": \"lsi0\"}",
                "",
            ]
            .join("\n"),
        ),
        (
            "malformed",
            [
                "not json",
                "{}",
                r#"{"id": "x", "op": 3}"#,
                r#"{"id": 1, "op": "device-control", "device": "lsi0", "control": "drive-add", "args": {"scsi-id": 7, "file": "missing"}}"#,
                r#"{"id": 2, "op": "device-control", "device": "lsi0", "control": "nothing"}"#,
                r#"{"id": 3, "op": "device-del", "device": "nobody"}"#,
                r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["#,
                r#"{"id": 4, "op": "ping""#,
            ]
            .join("\n"),
        ),
    ]
}

// ---- config --------------------------------------------------------------

fn qmp_seeds() -> Vec<(&'static str, String)> {
    let neg = r#"{"execute": "qmp_capabilities"}"#;
    vec![
        (
            "session",
            format!(
                "{neg}\n{}\n{}\n{}\n{}\n{}\n{}\n",
                r#"{"execute": "query-commands", "id": 1}"#,
                r#"{"execute": "device_add", "arguments": {"driver": "lsi53c895a", "id": "x", "addr": "0x6"}, "id": "two"}"#,
                r#"{"execute": "block_resize", "arguments": {"device": "vd0", "size": 1048576}}"#,
                r#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 300, "max-bandwidth": -1}}"#,
                r#"{"execute": "echo", "arguments": {"a": [1, {"b": null}], "c": "é"}}"#,
                r#"{"execute": "fail"}"#,
            ),
        ),
        (
            "before-negotiation",
            r#"{"execute": "query-version"}{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#.to_string(),
        ),
        (
            "bad",
            format!(
                "{neg}{}{}{}{}",
                r#"{"execute": 7}"#,
                r#"{"execute": "block_resize", "arguments": {"size": "big"}}"#,
                r#"[1, 2, {"x": }"#,
                r#"{"execute": "device_add", "arguments": {"driver": "d", "nope": 1}}"#,
            ),
        ),
    ]
}

fn config_seeds() -> Vec<(&'static str, String)> {
    vec![
        (
            "whole",
            r#"[vm]
memory = "512M"
vcpus = 2
kernel = "vmlinuz"
initrd = "initrd.img"
cmdline = "console=ttyS0"
console-log = "console.log"
qmp = "qmp.sock"
on-reboot = "exit"

[[remote]]
id = "storage"
log = "storage.log"
protocol = "mpqemu"
plugin-dirs = ["plugins", "/opt/plugins"]
heartbeat-ms = 100
timeout-ms = 2000
sandbox = false

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4
[[device.drive]]
file = "disk.img"
scsi-id = 0
read-only = true
block-size = 4096

[[device]]
id = "dma0"
in-process = true
plugin = "plugins/libdma_example.so"
kind = "dma-example"
slot = 5
max-transfer = 4096
"#
            .into(),
        ),
        (
            "devices-only",
            "[[remote]]\nid = \"r\"\nsocket = \"/run/vm/r\"\n\n[[device]]\nid = \"d\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = 31\n".into(),
        ),
        (
            "errors",
            "[vm]\nmemory = \"12Q\"\nkernel = 3\n[[device]]\nid = \"bad id!\"\nslot = 0\nremote = \"x\"\nin-process = true\n".into(),
        ),
    ]
}

// ---- LSI -----------------------------------------------------------------

/// LSI SCRIPTS, as the controller's own tests write them.
#[derive(Default)]
struct Asm(Vec<u32>);

impl Asm {
    fn w(&mut self, words: &[u32]) -> &mut Self {
        self.0.extend_from_slice(words);
        self
    }
    fn select_atn(&mut self, id: u32) -> &mut Self {
        self.w(&[0x4100_0000 | id << 16, 0])
    }
    fn mov(&mut self, phase: u32, count: u32, addr: u32) -> &mut Self {
        self.w(&[0x0800_0000 | phase << 24 | count, addr])
    }
    fn wait_disconnect(&mut self) -> &mut Self {
        self.w(&[0x4800_0000, 0])
    }
    fn wait_reselect(&mut self) -> &mut Self {
        self.w(&[0x5000_0000, 0])
    }
    fn int(&mut self, v: u32) -> &mut Self {
        self.w(&[0x9808_0000, v])
    }
    fn jump(&mut self, to: u32) -> &mut Self {
        self.w(&[0x8008_0000, to])
    }
    fn mem_move(&mut self, count: u32, src: u32, dst: u32) -> &mut Self {
        self.w(&[0xc000_0000 | count, src, dst])
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

const SCRIPT: u16 = 0x1000;
const MSGS: u16 = 0x9000;
const CDB: u16 = 0x9100;
const STAT: u16 = 0x9200;
const BUF: u32 = 0xa000;

/// LSI input ops.
#[derive(Default)]
struct Prog(Vec<u8>);

impl Prog {
    fn ram(&mut self, addr: u16, bytes: &[u8]) -> &mut Self {
        for (i, chunk) in bytes.chunks(255).enumerate() {
            self.0.push(op::RAM_WRITE_LOW);
            self.0
                .extend_from_slice(&(addr + 255 * i as u16).to_le_bytes());
            self.0.push(chunk.len() as u8);
            self.0.extend_from_slice(chunk);
        }
        self
    }
    fn reg32(&mut self, off: u16, v: u32) -> &mut Self {
        self.0.push(op::REG_WRITE);
        self.0.extend_from_slice(&off.to_le_bytes());
        self.0.push(2); // 4 bytes
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn reg8(&mut self, off: u16, v: u8) -> &mut Self {
        self.0.push(op::REG_WRITE);
        self.0.extend_from_slice(&off.to_le_bytes());
        self.0.push(0);
        self.0.extend_from_slice(&u32::from(v).to_le_bytes());
        self
    }
    fn read8(&mut self, off: u16) -> &mut Self {
        self.0.push(op::REG_READ);
        self.0.extend_from_slice(&off.to_le_bytes());
        self.0.push(0);
        self
    }
    fn start(&mut self, asm: &Asm) -> &mut Self {
        let b = asm.bytes();
        self.0.push(op::START_SCRIPTS);
        self.0.extend_from_slice(&SCRIPT.to_le_bytes());
        self.0.push((b.len() / 4) as u8);
        self.0.extend_from_slice(&b);
        self
    }
    fn wait(&mut self, ms: u8) -> &mut Self {
        self.0.push(op::WAIT);
        self.0.push(ms);
        self
    }
    fn host(&mut self, sub: u8, arg: u32) -> &mut Self {
        self.0.push(op::HOST);
        self.0.push(sub);
        self.0.extend_from_slice(&arg.to_le_bytes());
        self
    }
    /// After SCRIPTS: read the interrupt status as a driver does.
    fn status(&mut self) -> &mut Self {
        self.wait(15)
            .read8(0x14)
            .read8(0x0c)
            .read8(0x42)
            .read8(0x43)
    }
}

/// An untagged command that needs no disconnect (INQUIRY and the like).
fn immediate(cdb: &[u8], data_in: u32) -> Vec<u8> {
    let mut a = Asm::default();
    a.select_atn(0)
        .mov(6, 1, u32::from(MSGS))
        .mov(2, cdb.len() as u32, u32::from(CDB));
    if data_in > 0 {
        a.mov(1, data_in, BUF);
    }
    a.mov(3, 1, u32::from(STAT))
        .mov(7, 1, u32::from(MSGS) + 8)
        .wait_disconnect()
        .int(0x600d);
    let mut p = Prog::default();
    p.ram(MSGS, &[0x80]).ram(CDB, cdb).start(&a).status();
    p.0
}

/// A tagged READ or WRITE with disconnect and reselection.
fn tagged(cdb: &[u8], dir_in: bool, len: u32, tag: u8) -> Vec<u8> {
    tagged_to(0, cdb, dir_in, len, tag)
}

/// [`tagged`] to target `id`.
fn tagged_to(id: u32, cdb: &[u8], dir_in: bool, len: u32, tag: u8) -> Vec<u8> {
    let mut a = Asm::default();
    a.select_atn(id)
        .mov(6, 3, u32::from(MSGS))
        .mov(2, cdb.len() as u32, u32::from(CDB));
    if !dir_in {
        a.mov(0, len, BUF);
    }
    a.mov(7, 1, u32::from(MSGS) + 0x10)
        .mov(7, 1, u32::from(MSGS) + 0x11)
        .wait_disconnect()
        .wait_reselect()
        .mov(7, 1, u32::from(MSGS) + 0x12)
        .mov(7, 2, u32::from(MSGS) + 0x13);
    if dir_in {
        a.mov(1, len, BUF);
    }
    a.mov(3, 1, u32::from(STAT))
        .mov(7, 1, u32::from(MSGS) + 0x15)
        .wait_disconnect()
        .int(0x600d);
    let mut p = Prog::default();
    p.ram(MSGS, &[0xc0, 0x20, tag])
        .ram(CDB, cdb)
        .ram(BUF as u16, &[0x5a; 64])
        .start(&a)
        .status();
    p.0
}

fn lsi_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = vec![
        ("inquiry", immediate(&[0x12, 0, 0, 0, 36, 0], 36)),
        ("inquiry-vpd", immediate(&[0x12, 1, 0x83, 0, 0xff, 0], 255)),
        (
            "read-capacity",
            immediate(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8),
        ),
        ("test-unit-ready", immediate(&[0, 0, 0, 0, 0, 0], 0)),
        ("request-sense", immediate(&[0x03, 0, 0, 0, 18, 0], 18)),
        ("mode-sense", immediate(&[0x1a, 0, 0x3f, 0, 0xff, 0], 255)),
        (
            "read10",
            tagged(&[0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0], true, 1024, 3),
        ),
        (
            "write10",
            tagged(&[0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0], false, 512, 4),
        ),
        (
            "write-read-only",
            tagged_to(1, &[0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0], false, 512, 5),
        ),
    ];

    // SCRIPTS that loop forever, and a loop of large memory moves: the
    // budget must cut them into slices off the register write.
    let mut a = Asm::default();
    a.jump(u32::from(SCRIPT));
    let mut p = Prog::default();
    p.start(&a).wait(10).read8(0x14).reg8(0x14, 0x80).wait(5);
    seeds.push(("endless-loop", p.0));
    let mut a = Asm::default();
    a.mem_move(0xff_ffff, 0, 0x20_0000).jump(u32::from(SCRIPT));
    let mut p = Prog::default();
    p.start(&a).wait(15).read8(0x14).host(1, 0);
    seeds.push(("move-loop", p.0));

    // SCRIPTS that write the chip's own registers through its BAR (DMA
    // aimed at itself) and self-modifying SCRIPTS.
    let mut a = Asm::default();
    a.mem_move(4, u32::from(MSGS), 0xe000_002c) // DSP, through BAR1
        .mem_move(8, u32::from(MSGS), u32::from(SCRIPT))
        .int(1);
    let mut p = Prog::default();
    p.ram(MSGS, &[0, 0x10, 0, 0, 0, 0, 0, 0]).start(&a).status();
    seeds.push(("self-dma", p.0));

    // A command whose data phase is longer than the transfer, a reset in
    // the middle of a command, a drive removed under it.
    let mut p = Prog(tagged(
        &[0x28, 0, 0, 0, 0, 0, 0, 0x40, 0, 0],
        true,
        0x8_0000,
        6,
    ));
    p.reg8(0x14, 0x40)
        .reg8(0x14, 0)
        .host(4, 0)
        .host(0, 0)
        .status();
    seeds.push(("reset-mid-command", p.0));
    let mut p = Prog::default();
    p.reg32(0x10, 0x8000)
        .reg8(0x3b, 0x10) // single step
        .start(&{
            let mut a = Asm::default();
            a.select_atn(3).int(2);
            a
        })
        .reg8(0x3b, 0x14)
        .status()
        .host(3, 0x10_0000);
    seeds.push(("single-step-absent-target", p.0));
    seeds
}

// ---- LSI state blobs -------------------------------------------------------

/// A fresh controller's state, and the same with commands on its bus in
/// each state a restore treats differently (edited as JSON: a state saved
/// from a running controller would depend on its worker's timing).
fn lsi_state_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut tb = crate::lsi_state_target::controller();
    let fresh = match tb.function().save_state() {
        Ok(s) => s,
        Err(e) => panic!("save_state: {}", e.message),
    };
    drop(tb);
    let base: serde_json::Value = match serde_json::from_slice(&fresh) {
        Ok(v) => v,
        Err(e) => panic!("the LSI state is not JSON: {e}"),
    };
    let request = |seq: u64, cdb: &str, dir: &str, len: usize, data: &str, state: &str| {
        serde_json::json!({
            "seq": seq, "target": 0, "lun": 0, "tag": 3, "cdb": cdb, "dir": dir,
            "len": len, "data": data, "pos": 0, "status": 0, "state": state,
        })
    };
    let read10 = "28000000000400000100";
    let write10 = "2a000000000800000100";
    let with = |run: &str, queue: Vec<serde_json::Value>| {
        let mut v = base.clone();
        v["run-state"] = run.into();
        v["bus"]["next-seq"] = (queue.len() as u64).into();
        v["bus"]["queue"] = queue.into();
        v.to_string().into_bytes()
    };
    let mut seeds = vec![
        ("fresh", fresh.clone()),
        (
            "read-ready",
            with(
                "wait-reselect",
                vec![request(1, read10, "in", 512, &"5a".repeat(512), "ready")],
            ),
        ),
        (
            "read-executing",
            with(
                "wait-reselect",
                vec![request(1, read10, "in", 512, "", "executing")],
            ),
        ),
        (
            "write-executing",
            with(
                "paused",
                vec![request(1, write10, "out", 512, "", "executing")],
            ),
        ),
    ];
    seeds.push(("truncated", fresh[..fresh.len() / 2].to_vec()));
    seeds
}
