#![allow(clippy::unwrap_used)]
//! Disk-level tests on real temporary image files, through the interface the
//! controller uses: plan(), then the data phase, then execute().

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::{
    status, Backend, BlockError, CommandPlan, Completion, DataDirection, DriveConfig, ScsiDisk,
    Sense, SenseKey,
};

const BS: usize = 512;

struct Image {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// An image of `blocks` blocks where byte i holds `pattern(i)`.
fn image(blocks: usize) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    let data: Vec<u8> = (0..blocks * BS).map(pattern).collect();
    f.write_all(&data).unwrap();
    Image { _dir: dir, path }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn cfg(path: &Path) -> DriveConfig {
    DriveConfig {
        id: Some("d0".into()),
        file: path.to_path_buf(),
        scsi_id: 0,
        lun: 0,
        read_only: false,
        direct: false,
        serial: Some("SN-0001".into()),
        block_size: None,
        delay_us: 0,
    }
}

fn open(img: &Image) -> ScsiDisk {
    ScsiDisk::open(&cfg(&img.path), Path::new("/")).unwrap()
}

/// Runs a command as a controller would: plan, transfer, execute. Checks
/// the plan's contract on the way.
fn run_lun(disk: &ScsiDisk, lun: u8, cdb: &[u8], data_out: &[u8]) -> Completion {
    match disk.plan(lun, cdb) {
        CommandPlan::Complete(c) => {
            assert_eq!(
                c.status,
                status::CHECK_CONDITION,
                "plan completes only failures"
            );
            assert!(c.sense.is_some());
            c
        }
        CommandPlan::Transfer { dir, len } => {
            assert_eq!(dir == DataDirection::None, len == 0);
            if dir == DataDirection::Out {
                assert_eq!(data_out.len(), len, "data out length for {cdb:02x?}");
            }
            let c = disk.execute(lun, cdb, data_out);
            if c.is_good() {
                let expect = if dir == DataDirection::In { len } else { 0 };
                assert_eq!(c.data_in.len(), expect, "data in length for {cdb:02x?}");
                assert!(c.sense.is_none());
            }
            c
        }
    }
}

fn run(disk: &ScsiDisk, cdb: &[u8], data_out: &[u8]) -> Completion {
    run_lun(disk, 0, cdb, data_out)
}

fn good(disk: &ScsiDisk, cdb: &[u8], data_out: &[u8]) -> Vec<u8> {
    let c = run(disk, cdb, data_out);
    assert!(c.is_good(), "{cdb:02x?} failed: {:?}", c.sense);
    c.data_in
}

fn sense_of(c: &Completion) -> (SenseKey, u8, u8) {
    assert_eq!(c.status, status::CHECK_CONDITION);
    let s = c.sense.unwrap();
    (s.key, s.asc, s.ascq)
}

fn expect_sense(disk: &ScsiDisk, cdb: &[u8], data_out: &[u8], want: Sense) {
    let c = run(disk, cdb, data_out);
    assert_eq!(sense_of(&c), (want.key, want.asc, want.ascq), "{cdb:02x?}");
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

const TUR: [u8; 6] = [0; 6];
const READ_CAPACITY_10: [u8; 10] = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const SYNC_CACHE_10: [u8; 10] = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn read_capacity16(alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn request_sense() -> Vec<u8> {
    vec![0x03, 0, 0, 0, 18, 0]
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

/// `delay-us` makes every data operation wait at least that long, and
/// changes nothing else: the data still lands and reads back.
#[test]
fn a_delayed_drive_is_slow_but_right() {
    let img = image(64);
    let mut c = cfg(&img.path);
    c.delay_us = 20_000;
    let disk = ScsiDisk::open(&c, Path::new("/")).unwrap();
    let data: Vec<u8> = (0..1024).map(pattern).collect();
    let t = std::time::Instant::now();
    good(&disk, &write10(3, 2), &data);
    let back = good(&disk, &read10(3, 2), &[]);
    assert!(t.elapsed() >= std::time::Duration::from_millis(40));
    assert_eq!(back, data);
    assert_eq!(
        &std::fs::read(&img.path).unwrap()[3 * 512..5 * 512],
        &data[..]
    );
}

#[test]
fn write10_lands_in_the_file_byte_for_byte() {
    let img = image(64);
    let disk = open(&img);
    let data: Vec<u8> = (0..4 * BS).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    good(&disk, &write10(10, 4), &data);
    let host = std::fs::read(&img.path).unwrap();
    assert_eq!(&host[10 * BS..14 * BS], &data[..]);
    // Neighbours untouched.
    assert_eq!(host[10 * BS - 1], pattern(10 * BS - 1));
    assert_eq!(host[14 * BS], pattern(14 * BS));
    assert_eq!(host.len(), 64 * BS);
}

#[test]
fn read16_returns_host_written_data() {
    let img = image(64);
    let disk = open(&img);
    let got = good(&disk, &rw16(0x88, 7, 9), &[]);
    let want: Vec<u8> = (7 * BS..16 * BS).map(pattern).collect();
    assert_eq!(got, want);
    // READ(10) and READ(12) agree.
    assert_eq!(good(&disk, &read10(7, 9), &[]), want);
    let mut r12 = [0u8; 12];
    r12[0] = 0xa8;
    r12[5] = 7;
    r12[9] = 9;
    assert_eq!(good(&disk, &r12, &[]), want);
}

#[test]
fn read6_zero_length_means_256_blocks() {
    let img = image(300);
    let disk = open(&img);
    let got = good(&disk, &[0x08, 0, 0, 2, 0, 0], &[]);
    assert_eq!(got.len(), 256 * BS);
    assert_eq!(got[0], pattern(2 * BS));
    // WRITE(6) round trip.
    let data = vec![0xc3u8; 256 * BS];
    good(&disk, &[0x0a, 0, 0, 40, 0, 0], &data);
    assert_eq!(good(&disk, &[0x08, 0, 0, 40, 0, 0], &[]), data);
    // 256 blocks from LBA 100 runs past the end of a 300-block disk.
    expect_sense(
        &disk,
        &[0x08, 0, 0, 100, 0, 0],
        &[],
        Sense::lba_out_of_range(),
    );
}

#[test]
fn out_of_range_lba() {
    let img = image(64);
    let disk = open(&img);
    expect_sense(&disk, &read10(64, 1), &[], Sense::lba_out_of_range());
    expect_sense(&disk, &read10(63, 2), &[], Sense::lba_out_of_range());
    expect_sense(&disk, &write10(100, 1), &[], Sense::lba_out_of_range());
    // LBA + length overflowing u64.
    expect_sense(
        &disk,
        &rw16(0x88, u64::MAX, 2),
        &[],
        Sense::lba_out_of_range(),
    );
    expect_sense(
        &disk,
        &rw16(0x8a, u64::MAX - 1, 4),
        &[],
        Sense::lba_out_of_range(),
    );
    expect_sense(&disk, &rw16(0x8f, 65, 0), &[], Sense::lba_out_of_range());
    // The last block is fine; a zero-length read at the end too.
    assert_eq!(good(&disk, &read10(63, 1), &[]).len(), BS);
    assert!(good(&disk, &read10(64, 0), &[]).is_empty());
    // REQUEST SENSE reports it afterwards.
    expect_sense(&disk, &read10(64, 1), &[], Sense::lba_out_of_range());
    let s = good(&disk, &request_sense(), &[]);
    assert_eq!(s.len(), 18);
    assert_eq!((s[0], s[2], s[12], s[13]), (0x70, 0x05, 0x21, 0x00));
    // ... once.
    let s = good(&disk, &request_sense(), &[]);
    assert_eq!((s[2], s[12]), (0x00, 0x00));
}

#[test]
fn oversized_transfer_is_refused_before_allocating() {
    let img = image(64);
    let disk = open(&img);
    // Within the medium check first: a huge length past the end is out of range.
    expect_sense(
        &disk,
        &rw16(0x88, 0, u32::MAX),
        &[],
        Sense::lba_out_of_range(),
    );
    // A large disk (sparse file) and a length over MAX_TRANSFER_BYTES.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap();
    f.set_len(1 << 30).unwrap();
    let disk = open(&img);
    let blocks = (block::MAX_TRANSFER_BYTES / BS) as u32;
    assert!(matches!(
        disk.plan(0, &rw16(0x88, 0, blocks)),
        CommandPlan::Transfer {
            dir: DataDirection::In,
            len
        } if len == block::MAX_TRANSFER_BYTES
    ));
    expect_sense(
        &disk,
        &rw16(0x88, 0, blocks + 1),
        &[],
        Sense::invalid_field_in_cdb(),
    );
    expect_sense(
        &disk,
        &rw16(0x8a, 0, blocks + 1),
        &[],
        Sense::invalid_field_in_cdb(),
    );
}

#[test]
fn read_only_drive_refuses_writes() {
    let img = image(64);
    let mut c = cfg(&img.path);
    c.read_only = true;
    let disk = ScsiDisk::open(&c, Path::new("/")).unwrap();
    let data = vec![1u8; BS];
    expect_sense(&disk, &write10(0, 1), &data, Sense::write_protected());
    expect_sense(&disk, &rw16(0x8a, 0, 1), &data, Sense::write_protected());
    expect_sense(
        &disk,
        &[0x0a, 0, 0, 0, 1, 0],
        &data,
        Sense::write_protected(),
    );
    expect_sense(
        &disk,
        &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &data,
        Sense::write_protected(),
    );
    expect_sense(
        &disk,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &[0; 24],
        Sense::write_protected(),
    );
    assert_eq!(
        sense_of(&disk.execute(0, &write10(0, 1), &data)).0,
        SenseKey::DataProtect
    );
    // The file is unchanged; reads work; the WP bit is set in MODE SENSE.
    assert_eq!(std::fs::read(&img.path).unwrap()[0], pattern(0));
    assert_eq!(good(&disk, &read10(0, 1), &[])[0], pattern(0));
    let ms = good(&disk, &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(ms[2] & 0x80, 0x80);
    // Flushing a read-only disk is harmless.
    good(&disk, &SYNC_CACHE_10, &[]);
    // No provisioning advertised.
    let rc = good(&disk, &read_capacity16(32), &[]);
    assert_eq!(rc[14] & 0x80, 0);
    assert!(matches!(
        disk.resize(128 * BS as u64),
        Err(BlockError::ReadOnly)
    ));
}

#[test]
fn unit_attention_after_reset() {
    let img = image(64);
    let disk = open(&img);
    good(&disk, &TUR, &[]);
    disk.reset();
    assert_eq!(disk.request_sense(), Sense::power_on_reset());
    // INQUIRY and REPORT LUNS do not consume it.
    good(&disk, &inquiry(false, 0, 36), &[]);
    let mut rl = [0u8; 12];
    rl[0] = 0xa0;
    rl[9] = 16;
    good(&disk, &rl, &[]);
    // The next other command reports it, once.
    expect_sense(&disk, &read10(0, 1), &[], Sense::power_on_reset());
    good(&disk, &read10(0, 1), &[]);
    good(&disk, &TUR, &[]);
    // REQUEST SENSE reports and clears a pending one.
    disk.reset();
    let s = good(&disk, &request_sense(), &[]);
    assert_eq!((s[2], s[12], s[13]), (0x06, 0x29, 0x00));
    good(&disk, &TUR, &[]);
}

#[test]
fn reset_restores_write_cache_default() {
    let img = image(64);
    let disk = open(&img);
    let mut ms = good(&disk, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]);
    ms[0] = 0;
    ms[4 + 2] &= !0x04;
    good(&disk, &[0x15, 0x10, 0, 0, ms.len() as u8, 0], &ms);
    assert!(!disk.write_cache_enabled());
    disk.reset();
    assert!(disk.write_cache_enabled());
}

#[test]
fn unit_attention_after_resize_then_new_capacity() {
    let img = image(64);
    let disk = open(&img);
    let rc = good(&disk, &READ_CAPACITY_10, &[]);
    assert_eq!(rc, [0, 0, 0, 63, 0, 0, 2, 0]);
    disk.resize(128 * BS as u64).unwrap();
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 128 * BS as u64);
    expect_sense(&disk, &READ_CAPACITY_10, &[], Sense::capacity_changed());
    let rc = good(&disk, &READ_CAPACITY_10, &[]);
    assert_eq!(u32::from_be_bytes(rc[0..4].try_into().unwrap()), 127);
    let rc = good(&disk, &read_capacity16(32), &[]);
    assert_eq!(rc.len(), 32);
    assert_eq!(u64::from_be_bytes(rc[0..8].try_into().unwrap()), 127);
    assert_eq!(u32::from_be_bytes(rc[8..12].try_into().unwrap()), 512);
    assert_eq!(disk.capacity_blocks(), 128);
    // The new blocks are usable.
    good(&disk, &write10(127, 1), &[9u8; BS]);
    // Shrinking puts the old end out of range.
    disk.resize(32 * BS as u64).unwrap();
    expect_sense(&disk, &TUR, &[], Sense::capacity_changed());
    expect_sense(&disk, &read10(40, 1), &[], Sense::lba_out_of_range());
    // Sizes that are not whole blocks are refused.
    assert!(matches!(
        disk.resize(1000),
        Err(BlockError::InvalidSize { .. })
    ));
    assert!(matches!(
        disk.resize(0),
        Err(BlockError::InvalidSize { .. })
    ));
}

#[test]
fn reset_and_resize_both_reported() {
    let img = image(64);
    let disk = open(&img);
    disk.resize(128 * BS as u64).unwrap();
    disk.resize(256 * BS as u64).unwrap();
    // Same unit attention raised twice is reported once.
    expect_sense(&disk, &TUR, &[], Sense::capacity_changed());
    good(&disk, &TUR, &[]);
    disk.resize(64 * BS as u64).unwrap();
    disk.reset();
    // Reset supersedes older unit attentions.
    expect_sense(&disk, &TUR, &[], Sense::power_on_reset());
    good(&disk, &TUR, &[]);
}

#[test]
fn read_capacity_pmi_and_truncation() {
    let img = image(64);
    let disk = open(&img);
    let mut c = READ_CAPACITY_10;
    c[5] = 5;
    expect_sense(&disk, &c, &[], Sense::invalid_field_in_cdb());
    c[8] = 1;
    assert_eq!(good(&disk, &c, &[]).len(), 8);
    for alloc in [0u32, 1, 8, 12, 13, 31, 32, 1000] {
        let d = good(&disk, &read_capacity16(alloc), &[]);
        assert_eq!(d.len(), (alloc as usize).min(32));
    }
    let d = good(&disk, &read_capacity16(32), &[]);
    // 4 KiB physical blocks: exponent 3 for 512-byte logical blocks.
    assert_eq!(d[13] & 0x0f, 3);
    // Thin provisioning advertised on a writable raw file.
    assert_eq!(d[14] & 0x80, 0x80);
}

#[test]
fn read_capacity10_saturates_on_huge_disks() {
    let img = image(1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap();
    // 2^32 + 8 blocks of 512 bytes (sparse).
    f.set_len(((1u64 << 32) + 8) * 512).unwrap();
    let disk = open(&img);
    let d = good(&disk, &READ_CAPACITY_10, &[]);
    assert_eq!(&d[0..4], &[0xff; 4]);
    let d = good(&disk, &read_capacity16(32), &[]);
    assert_eq!(
        u64::from_be_bytes(d[0..8].try_into().unwrap()),
        (1u64 << 32) + 7
    );
    // READ(16) beyond 2^32 works.
    let r = good(&disk, &rw16(0x88, (1u64 << 32) + 7, 1), &[]);
    assert_eq!(r, vec![0u8; 512]);
}

#[test]
fn synchronize_cache_succeeds() {
    let img = image(64);
    let disk = open(&img);
    good(&disk, &write10(0, 1), &[7u8; BS]);
    good(&disk, &SYNC_CACHE_10, &[]);
    let mut c = SYNC_CACHE_10;
    c[1] = 0x02; // IMMED
    c[5] = 10;
    c[8] = 4;
    good(&disk, &c, &[]);
    good(&disk, &rw16(0x91, 0, 64), &[]);
    expect_sense(&disk, &rw16(0x91, 60, 10), &[], Sense::lba_out_of_range());
    assert_eq!(std::fs::read(&img.path).unwrap()[..BS], [7u8; BS]);
}

#[test]
fn unknown_opcode() {
    let img = image(64);
    let disk = open(&img);
    for cdb in [
        vec![0x04u8, 0, 0, 0, 0, 0],
        vec![0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0xff; 16],
        vec![],
    ] {
        expect_sense(&disk, &cdb, &[], Sense::invalid_opcode());
    }
    let s = good(&disk, &request_sense(), &[]);
    assert_eq!((s[2], s[12], s[13]), (0x05, 0x20, 0x00));
    // SERVICE ACTION IN with another service action: invalid field.
    let mut c = read_capacity16(32);
    c[1] = 0x12;
    expect_sense(&disk, &c, &[], Sense::invalid_field_in_cdb());
}

#[test]
fn inquiry_standard() {
    let img = image(64);
    let disk = open(&img);
    let d = good(&disk, &inquiry(false, 0, 255), &[]);
    assert_eq!(d.len(), 36);
    assert_eq!(d[0], 0x00);
    assert_eq!(usize::from(d[4]) + 5, d.len());
    assert_eq!(&d[8..16], b"RUSTVMM ");
    assert_eq!(&d[16..25], b"SCSI DISK");
    for alloc in [0u16, 1, 5, 35, 36, 37, 1024] {
        let d = good(&disk, &inquiry(false, 0, alloc), &[]);
        assert_eq!(d.len(), usize::from(alloc).min(36));
    }
    expect_sense(
        &disk,
        &inquiry(false, 0x80, 255),
        &[],
        Sense::invalid_field_in_cdb(),
    );
}

#[test]
fn inquiry_vpd_pages() {
    let img = image(64);
    let disk = open(&img);
    let list = good(&disk, &inquiry(true, 0x00, 255), &[]);
    assert_eq!(list[1], 0x00);
    let n = usize::from(u16::from_be_bytes([list[2], list[3]]));
    assert_eq!(list.len(), 4 + n);
    let pages = list[4..].to_vec();
    assert_eq!(pages, [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    // Every listed page answers with a consistent length; no other does.
    for page in 0..=255u8 {
        let c = run(&disk, &inquiry(true, page, 1024), &[]);
        if pages.contains(&page) {
            assert!(c.is_good(), "page {page:#x}");
            let d = c.data_in;
            assert_eq!(d[0], 0x00);
            assert_eq!(d[1], page);
            let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
            assert_eq!(d.len(), 4 + len, "page {page:#x}");
        } else {
            assert_eq!(
                sense_of(&c),
                (SenseKey::IllegalRequest, 0x24, 0x00),
                "page {page:#x}"
            );
        }
    }
    // Serial.
    let d = good(&disk, &inquiry(true, 0x80, 255), &[]);
    assert_eq!(&d[4..], b"SN-0001");
    // Device identification: NAA then T10 vendor id, walking designators.
    let d = good(&disk, &inquiry(true, 0x83, 255), &[]);
    let mut types = Vec::new();
    let mut p = 4;
    while p < d.len() {
        let len = usize::from(d[p + 3]);
        types.push((d[p] & 0x0f, d[p + 1] & 0x3f));
        if d[p + 1] & 0x0f == 3 {
            assert_eq!(len, 8);
            assert_eq!(d[p + 4] >> 4, 3, "NAA locally assigned");
        }
        if d[p + 1] & 0x0f == 1 {
            assert_eq!(&d[p + 4..p + 4 + len], b"RUSTVMM SN-0001");
        }
        p += 4 + len;
    }
    assert_eq!(p, d.len());
    assert_eq!(types, [(1, 3), (2, 1)]);
    // Block limits.
    let d = good(&disk, &inquiry(true, 0xb0, 255), &[]);
    assert_eq!(d.len(), 64);
    let max_xfer = u32::from_be_bytes(d[8..12].try_into().unwrap());
    assert_eq!(max_xfer as usize * BS, block::MAX_TRANSFER_BYTES);
    assert_eq!(
        u32::from_be_bytes(d[24..28].try_into().unwrap()),
        block::MAX_UNMAP_DESCRIPTORS
    );
    // Non-rotating.
    let d = good(&disk, &inquiry(true, 0xb1, 255), &[]);
    assert_eq!(u16::from_be_bytes([d[4], d[5]]), 1);
    // Provisioning: UNMAP and WRITE SAME(10/16) with UNMAP.
    let d = good(&disk, &inquiry(true, 0xb2, 255), &[]);
    assert_eq!(d[5] & 0xe0, 0xe0);
    // Truncation.
    for alloc in [0u16, 3, 4, 10, 63, 64, 65] {
        let d = good(&disk, &inquiry(true, 0xb0, alloc), &[]);
        assert_eq!(d.len(), usize::from(alloc).min(64));
    }
}

#[test]
fn mode_sense_lengths_and_truncation() {
    let img = image(64);
    let disk = open(&img);
    // Full lengths per request; then every allocation length gives
    // min(alloc, full) and the header length field matches the full data.
    for (page, dbd) in [
        (0x3f, false),
        (0x3f, true),
        (0x08, false),
        (0x0a, true),
        (0x01, false),
    ] {
        let six = [0x1a, if dbd { 0x08 } else { 0 }, page, 0, 255, 0];
        let full = good(&disk, &six, &[]);
        assert_eq!(usize::from(full[0]) + 1, full.len());
        assert_eq!(usize::from(full[3]), if dbd { 0 } else { 8 });
        for alloc in 0..=255u8 {
            let mut c = six;
            c[4] = alloc;
            let d = good(&disk, &c, &[]);
            assert_eq!(d.len(), usize::from(alloc).min(full.len()));
            assert_eq!(&d[..], &full[..d.len()]);
        }
        for llbaa in [false, true] {
            let mut ten = [0x5a, 0, page, 0, 0, 0, 0, 0x10, 0, 0];
            ten[1] = if dbd { 0x08 } else { 0 } | if llbaa { 0x10 } else { 0 };
            let full10 = good(&disk, &ten, &[]);
            assert_eq!(
                usize::from(u16::from_be_bytes([full10[0], full10[1]])) + 2,
                full10.len()
            );
            let bd = usize::from(u16::from_be_bytes([full10[6], full10[7]]));
            assert_eq!(
                bd,
                if dbd {
                    0
                } else if llbaa {
                    16
                } else {
                    8
                }
            );
            // The pages are the same in both forms.
            assert_eq!(&full10[8 + bd..], &full[4 + usize::from(full[3])..]);
            for alloc in [0u16, 1, 2, 7, 8, 9, 20, 40] {
                ten[7..9].copy_from_slice(&alloc.to_be_bytes());
                let d = good(&disk, &ten, &[]);
                assert_eq!(d.len(), usize::from(alloc).min(full10.len()));
            }
        }
    }
    // Caching page reflects the write cache.
    let d = good(&disk, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!((d[4], d[5], d[6] & 0x04), (0x08, 0x12, 0x04));
    // Saved values and unknown pages.
    expect_sense(
        &disk,
        &[0x1a, 0, 0xc8, 0, 255, 0],
        &[],
        Sense::saving_params_not_supported(),
    );
    expect_sense(
        &disk,
        &[0x1a, 0, 0x1c, 0, 255, 0],
        &[],
        Sense::invalid_field_in_cdb(),
    );
}

#[test]
fn mode_select_changes_write_cache() {
    let img = image(64);
    let disk = open(&img);
    assert!(disk.write_cache_enabled());
    // Linux's way: MODE SENSE the caching page, flip WCE, MODE SELECT it.
    let mut ms = good(&disk, &[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]);
    ms[0] = 0;
    ms[1] = 0;
    ms[8 + 2] &= !0x04;
    let len = ms.len() as u8;
    good(&disk, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, len, 0], &ms);
    assert!(!disk.write_cache_enabled());
    let d = good(&disk, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!(d[6] & 0x04, 0);
    // Write-through writes still work (flushed each time).
    good(&disk, &write10(1, 1), &[3u8; BS]);
    // Changing a field that is not changeable is refused, state unchanged.
    let mut bad = ms.clone();
    bad[8 + 2] |= 0x04 | 0x01;
    expect_sense(
        &disk,
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0, len, 0],
        &bad,
        Sense::invalid_field_in_param_list(),
    );
    assert!(!disk.write_cache_enabled());
    // SP=1 is refused; an empty list is fine.
    expect_sense(
        &disk,
        &[0x15, 0x11, 0, 0, 0, 0],
        &[],
        Sense::invalid_field_in_cdb(),
    );
    good(&disk, &[0x15, 0x10, 0, 0, 0, 0], &[]);
    // A list shorter than the CDB announced.
    let c = disk.execute(0, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, len, 0], &ms[..4]);
    assert_eq!(sense_of(&c), (SenseKey::IllegalRequest, 0x1a, 0x00));
}

#[test]
fn short_data_out_is_a_data_phase_error() {
    let img = image(64);
    let disk = open(&img);
    let c = disk.execute(0, &write10(0, 2), &[0u8; BS]);
    assert_eq!(sense_of(&c), (SenseKey::AbortedCommand, 0x4b, 0x00));
    assert_eq!(std::fs::read(&img.path).unwrap()[0], pattern(0));
}

#[test]
fn fua_write_and_verify() {
    let img = image(64);
    let disk = open(&img);
    let mut w = write10(3, 1);
    w[1] = 0x08;
    good(&disk, &w, &[0xeeu8; BS]);
    assert_eq!(std::fs::read(&img.path).unwrap()[3 * BS], 0xee);
    let mut v = read10(0, 64);
    v[0] = 0x2f;
    good(&disk, &v, &[]);
    v[5] = 1;
    expect_sense(&disk, &v, &[], Sense::lba_out_of_range());
    v[1] = 0x06;
    expect_sense(&disk, &v, &[], Sense::invalid_field_in_cdb());
    good(&disk, &rw16(0x8f, 10, 54), &[]);
    // BYTCHK=01b: the initiator's data is compared with the medium.
    let mut v = read10(3, 1);
    v[0] = 0x2f;
    v[1] = 0x02;
    good(&disk, &v, &[0xeeu8; BS]);
    let mut other = vec![0xeeu8; BS];
    other[100] = 0;
    let c = run(&disk, &v, &other);
    assert_eq!(sense_of(&c), (SenseKey::Miscompare, 0x1d, 0x00));
    assert_eq!(c.sense.unwrap().info, Some(100));
    let mut v16 = rw16(0x8f, 3, 1);
    v16[1] = 0x02;
    good(&disk, &v16, &[0xeeu8; BS]);
}

#[test]
fn write_and_verify() {
    let img = image(64);
    let disk = open(&img);
    let data = vec![0x3cu8; 2 * BS];
    let mut c = write10(5, 2);
    c[0] = 0x2e;
    good(&disk, &c, &data);
    c[1] = 0x02; // BYTCHK=01b: compare too
    good(&disk, &c, &data);
    assert_eq!(
        &std::fs::read(&img.path).unwrap()[5 * BS..7 * BS],
        &data[..]
    );
    let mut c16 = rw16(0x8e, 63, 2);
    expect_sense(&disk, &c16, &data, Sense::lba_out_of_range());
    c16[13] = 1;
    good(&disk, &c16, &data[..BS]);
}

#[test]
fn start_stop_unit() {
    let img = image(64);
    let disk = open(&img);
    good(&disk, &[0x1b, 0, 0, 0, 0x00, 0], &[]);
    good(&disk, &[0x1b, 1, 0, 0, 0x01, 0], &[]);
    good(&disk, &read10(0, 1), &[]);
    expect_sense(
        &disk,
        &[0x1b, 0, 0, 0, 0x02, 0],
        &[],
        Sense::invalid_field_in_cdb(),
    );
}

#[test]
fn write_same_and_unmap() {
    let img = image(64);
    let disk = open(&img);
    // WRITE SAME(10): a pattern block written over 5 blocks.
    let block: Vec<u8> = (0..BS).map(|i| i as u8).collect();
    good(&disk, &[0x41, 0, 0, 0, 0, 2, 0, 0, 5, 0], &block);
    let host = std::fs::read(&img.path).unwrap();
    for b in 2..7 {
        assert_eq!(&host[b * BS..(b + 1) * BS], &block[..]);
    }
    assert_eq!(host[7 * BS], pattern(7 * BS));
    // WRITE SAME(16) with UNMAP and NDOB: zeros.
    let mut ws16 = rw16(0x93, 8, 8);
    ws16[1] = 0x09;
    good(&disk, &ws16, &[]);
    let host = std::fs::read(&img.path).unwrap();
    assert!(host[8 * BS..16 * BS].iter().all(|&b| b == 0));
    assert_eq!(host.len(), 64 * BS);
    // WRITE SAME(10) UNMAP with non-zero data writes the data.
    good(&disk, &[0x41, 0x08, 0, 0, 0, 20, 0, 0, 1, 0], &block);
    assert_eq!(
        &std::fs::read(&img.path).unwrap()[20 * BS..21 * BS],
        &block[..]
    );
    expect_sense(
        &disk,
        &[0x41, 0, 0, 0, 0, 60, 0, 0, 5, 0],
        &block,
        Sense::lba_out_of_range(),
    );

    // UNMAP two ranges. LBPRZ is 0, so the content is not checked, only that
    // the command succeeds and the file keeps its size.
    let mut list = vec![0u8; 8];
    list[0..2].copy_from_slice(&38u16.to_be_bytes());
    list[2..4].copy_from_slice(&32u16.to_be_bytes());
    for (lba, n) in [(32u64, 8u32), (48, 16)] {
        list.extend_from_slice(&lba.to_be_bytes());
        list.extend_from_slice(&n.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
    }
    good(
        &disk,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, list.len() as u8, 0],
        &list,
    );
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 64 * BS as u64);
    // A descriptor past the end: nothing is unmapped.
    let mut bad = list.clone();
    bad[8 + 16..8 + 24].copy_from_slice(&60u64.to_be_bytes());
    expect_sense(
        &disk,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, bad.len() as u8, 0],
        &bad,
        Sense::lba_out_of_range(),
    );
    // Malformed header.
    let mut bad = list.clone();
    bad[2..4].copy_from_slice(&100u16.to_be_bytes());
    expect_sense(
        &disk,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, bad.len() as u8, 0],
        &bad,
        Sense::param_list_length_error(),
    );
    // Empty parameter list.
    good(&disk, &[0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
}

#[test]
fn other_luns() {
    let img = image(64);
    let disk = open(&img);
    let d = good_lun(&disk, 1, &inquiry(false, 0, 255));
    assert_eq!(d[0], 0x7f);
    assert_eq!(d.len(), 36);
    let mut rl = [0u8; 12];
    rl[0] = 0xa0;
    rl[9] = 255;
    let d = good_lun(&disk, 3, &rl);
    assert_eq!(d, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let d = good_lun(&disk, 1, &request_sense());
    assert_eq!((d[2], d[12]), (0x05, 0x25));
    let c = run_lun(&disk, 1, &read10(0, 1), &[]);
    assert_eq!(sense_of(&c), (SenseKey::IllegalRequest, 0x25, 0x00));
    let c = run_lun(&disk, 7, &TUR, &[]);
    assert_eq!(sense_of(&c), (SenseKey::IllegalRequest, 0x25, 0x00));
    // LUN 0's state is untouched, and a pending unit attention stays there.
    disk.reset();
    run_lun(&disk, 1, &TUR, &[]);
    expect_sense(&disk, &TUR, &[], Sense::power_on_reset());
}

fn good_lun(disk: &ScsiDisk, lun: u8, cdb: &[u8]) -> Vec<u8> {
    let c = run_lun(disk, lun, cdb, &[]);
    assert!(c.is_good(), "{:?}", c.sense);
    c.data_in
}

#[test]
fn report_luns_truncation() {
    let img = image(64);
    let disk = open(&img);
    for alloc in [0u32, 4, 8, 15, 16, 100] {
        let mut rl = [0u8; 12];
        rl[0] = 0xa0;
        rl[6..10].copy_from_slice(&alloc.to_be_bytes());
        let d = good(&disk, &rl, &[]);
        assert_eq!(d.len(), (alloc as usize).min(16));
    }
}

#[test]
fn request_sense_truncation() {
    let img = image(64);
    let disk = open(&img);
    expect_sense(&disk, &read10(1000, 1), &[], Sense::lba_out_of_range());
    let d = good(&disk, &[0x03, 0, 0, 0, 8, 0], &[]);
    assert_eq!(d.len(), 8);
    // Descriptor format requested: not supported.
    expect_sense(
        &disk,
        &[0x03, 1, 0, 0, 18, 0],
        &[],
        Sense::invalid_field_in_cdb(),
    );
}

#[test]
fn relative_path_block_size_and_odd_sizes() {
    let img = image(64);
    let dir = img.path.parent().unwrap();
    let mut c = cfg(Path::new("disk.img"));
    let disk = ScsiDisk::open(&c, dir).unwrap();
    assert_eq!(disk.capacity_blocks(), 64);
    assert_eq!(disk.block_size(), 512);
    // 4 KiB blocks: 64 * 512 bytes = 8 blocks.
    c.block_size = Some(4096);
    let disk = ScsiDisk::open(&c, dir).unwrap();
    assert_eq!(disk.capacity_blocks(), 8);
    let d = good(&disk, &READ_CAPACITY_10, &[]);
    assert_eq!(d, [0, 0, 0, 7, 0, 0, 0x10, 0]);
    assert_eq!(good(&disk, &read10(1, 1), &[]).len(), 4096);
    c.block_size = Some(1000);
    assert!(matches!(
        ScsiDisk::open(&c, dir),
        Err(BlockError::InvalidBlockSize(1000))
    ));
    c.block_size = None;
    c.lun = 1;
    assert!(matches!(
        ScsiDisk::open(&c, dir),
        Err(BlockError::UnsupportedLun(1))
    ));
    c.lun = 0;
    c.file = "missing.img".into();
    assert!(matches!(
        ScsiDisk::open(&c, dir),
        Err(BlockError::Open { .. })
    ));
    // A size that is not a whole number of blocks is rounded down.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap();
    f.set_len(64 * BS as u64 + 100).unwrap();
    let disk = ScsiDisk::open(&cfg(&img.path), Path::new("/")).unwrap();
    assert_eq!(disk.capacity_blocks(), 64);
    expect_sense(&disk, &read10(64, 1), &[], Sense::lba_out_of_range());
    // Smaller than a block: refused.
    f.set_len(100).unwrap();
    assert!(matches!(
        ScsiDisk::open(&cfg(&img.path), Path::new("/")),
        Err(BlockError::TooSmall { .. })
    ));
}

#[test]
fn default_serial_is_stable_and_printable() {
    let img = image(8);
    let mut c = cfg(&img.path);
    c.serial = None;
    c.id = None;
    let a = ScsiDisk::open(&c, Path::new("/")).unwrap();
    let b = ScsiDisk::open(&c, Path::new("/")).unwrap();
    assert_eq!(a.serial(), b.serial());
    assert!(!a.serial().is_empty());
    assert!(a.serial().bytes().all(|b| b.is_ascii_graphic()));
    c.id = Some("boot disk".into());
    assert_eq!(
        ScsiDisk::open(&c, Path::new("/")).unwrap().serial(),
        "bootdisk"
    );
}

#[test]
fn direct_io_round_trip() {
    let img = image(64);
    let mut c = cfg(&img.path);
    c.direct = true;
    let disk = match ScsiDisk::open(&c, Path::new("/")) {
        Ok(d) => d,
        Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("O_DIRECT unsupported here; skipping");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // Aligned (4 KiB at 4 KiB) and unaligned (one 512-byte block) writes.
    let a: Vec<u8> = (0..4096).map(|i| (i * 3) as u8).collect();
    good(&disk, &write10(8, 8), &a);
    good(&disk, &write10(17, 1), &[0x77; BS]);
    good(&disk, &SYNC_CACHE_10, &[]);
    let host = std::fs::read(&img.path).unwrap();
    assert_eq!(&host[8 * BS..16 * BS], &a[..]);
    assert_eq!(&host[17 * BS..18 * BS], &[0x77; BS]);
    assert_eq!(good(&disk, &read10(8, 8), &[]), a);
    let r = good(&disk, &read10(16, 2), &[]);
    assert_eq!(
        r[..BS],
        (16 * BS..17 * BS).map(pattern).collect::<Vec<_>>()[..]
    );
    assert_eq!(r[BS..], [0x77; BS]);
}

#[test]
fn shared_between_threads() {
    let img = image(256);
    let disk = Arc::new(open(&img));
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                for i in 0..16u32 {
                    let lba = u32::from(t) * 64 + i * 4;
                    let data = vec![t.wrapping_add(i as u8); 4 * BS];
                    let c = disk.execute(0, &write10(lba, 4), &data);
                    assert!(c.is_good());
                    let r = disk.execute(0, &read10(lba, 4), &[]);
                    assert_eq!(r.data_in, data);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let host = std::fs::read(&img.path).unwrap();
    assert_eq!(host[(64 + 4) * BS], 1 + 1);
}

/// A backend whose I/O fails on demand.
struct Faulty {
    fail: Arc<AtomicBool>,
    /// Reads return the first byte inverted (silent corruption).
    corrupt: Arc<AtomicBool>,
    data: std::sync::Mutex<Vec<u8>>,
}

impl Backend for Faulty {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        if self.corrupt.load(Ordering::SeqCst) {
            buf[0] = !buf[0];
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn resize(&self, new_size: u64) -> io::Result<()> {
        self.data.lock().unwrap().resize(new_size as usize, 0);
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn supports_discard(&self) -> bool {
        false
    }
}

#[test]
fn medium_errors_on_io_failure() {
    let fail = Arc::new(AtomicBool::new(false));
    let corrupt = Arc::new(AtomicBool::new(false));
    let backend = Faulty {
        corrupt: Arc::clone(&corrupt),
        fail: Arc::clone(&fail),
        data: std::sync::Mutex::new(vec![0u8; 64 * BS]),
    };
    let disk = ScsiDisk::with_backend("faulty".into(), Box::new(backend), 512, "F1").unwrap();
    good(&disk, &read10(5, 1), &[]);
    // No discard support: UNMAP is not there, and no LBPME/LBPU.
    expect_sense(
        &disk,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &[0; 24],
        Sense::invalid_opcode(),
    );
    let d = good(&disk, &inquiry(true, 0xb2, 255), &[]);
    assert_eq!(d[5], 0);
    // WRITE SAME with UNMAP falls back to writing zeros.
    good(&disk, &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 2, 0], &[0u8; BS]);
    fail.store(true, Ordering::SeqCst);
    let c = run(&disk, &read10(5, 1), &[]);
    assert_eq!(sense_of(&c), (SenseKey::MediumError, 0x11, 0x00));
    assert_eq!(c.sense.unwrap().info, Some(5));
    let fixed = c.sense.unwrap().to_fixed();
    assert_eq!(fixed[0], 0xf0);
    assert_eq!(&fixed[3..7], &[0, 0, 0, 5]);
    let c = run(&disk, &write10(9, 1), &[0u8; BS]);
    assert_eq!(sense_of(&c), (SenseKey::MediumError, 0x0c, 0x00));
    let c = run(&disk, &SYNC_CACHE_10, &[]);
    assert_eq!(sense_of(&c), (SenseKey::MediumError, 0x0c, 0x00));
    // STOP writes the cache back, unless NO_FLUSH.
    let c = run(&disk, &[0x1b, 0, 0, 0, 0x00, 0], &[]);
    assert_eq!(sense_of(&c), (SenseKey::MediumError, 0x0c, 0x00));
    good(&disk, &[0x1b, 0, 0, 0, 0x04, 0], &[]);
    good(&disk, &[0x1b, 0, 0, 0, 0x01, 0], &[]);
    fail.store(false, Ordering::SeqCst);
    good(&disk, &write10(9, 1), &[0u8; BS]);
    // WRITE AND VERIFY with BYTCHK notices data that does not read back.
    corrupt.store(true, Ordering::SeqCst);
    let mut wv = write10(9, 1);
    wv[0] = 0x2e;
    wv[1] = 0x02;
    let c = run(&disk, &wv, &[0u8; BS]);
    assert_eq!(sense_of(&c), (SenseKey::Miscompare, 0x1d, 0x00));
    assert_eq!(c.sense.unwrap().info, Some(0));
    wv[1] = 0;
    good(&disk, &wv, &[0u8; BS]);
}

/// Guest-controlled CDBs and data never panic, whatever they hold.
#[test]
fn random_cdbs_never_panic() {
    let img = image(64);
    let disk = open(&img);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let ops = [
        0x00u8, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x1a, 0x1b, 0x25, 0x28, 0x2a, 0x2f, 0x35, 0x41, 0x42,
        0x55, 0x5a, 0x88, 0x8a, 0x8f, 0x91, 0x93, 0x9e, 0xa0, 0xa8, 0xaa,
    ];
    let mut goods = 0;
    for i in 0..20000 {
        let len = (next() % 17) as usize;
        let mut cdb: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(b) = cdb.first_mut() {
            *b = ops[(next() % ops.len() as u64) as usize];
        }
        // Bias lengths towards the small, valid range now and then.
        if i % 2 == 0 && cdb.len() >= 10 {
            cdb[2..6].fill(0);
            cdb[6] = 0;
        }
        let out_len = (next() % 1200) as usize;
        let out: Vec<u8> = (0..out_len).map(|_| next() as u8).collect();
        let lun = if i % 50 == 0 { 1 } else { 0 };
        let _ = disk.plan(lun, &cdb);
        let c = disk.execute(lun, &cdb, &out);
        assert!(c.status == status::GOOD || c.status == status::CHECK_CONDITION);
        if c.is_good() {
            goods += 1;
        }
        if i % 1000 == 0 {
            disk.reset();
        }
    }
    eprintln!("{goods} of 20000 random commands succeeded");
    assert!(goods > 500, "only {goods} random commands succeeded");
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 64 * BS as u64);
}

/// The commands Linux's sd driver sends when it attaches a disk after the
/// controller's bus reset, in order, with the lengths it uses.
#[test]
fn linux_attach_sequence() {
    let img = image(2048);
    let disk = open(&img);
    disk.reset();
    // scsi_probe_lun: INQUIRY 36, then the full length it announced.
    let inq = good(&disk, &inquiry(false, 0, 36), &[]);
    let n = usize::from(inq[4]) + 5;
    assert_eq!(good(&disk, &inquiry(false, 0, n as u16), &[]).len(), n);
    assert_eq!(inq[0] & 0x1f, 0, "direct access");
    assert_eq!(inq[2], 5, "SPC-3: REPORT LUNS will be used");
    assert_ne!(inq[7] & 0x02, 0, "tagged queuing");
    // REPORT LUNS (scsi_report_lun_scan), unit attention still pending.
    let mut rl = [0u8; 12];
    rl[0] = 0xa0;
    rl[6..10].copy_from_slice(&512u32.to_be_bytes());
    assert_eq!(good(&disk, &rl, &[])[3], 8);
    // sd_spinup_disk: TEST UNIT READY gets the reset, then is ready.
    expect_sense(&disk, &TUR, &[], Sense::power_on_reset());
    good(&disk, &TUR, &[]);
    // sd_read_capacity: READ CAPACITY(16) first on SPC-3 devices.
    let rc = good(&disk, &read_capacity16(32), &[]);
    assert_eq!(u64::from_be_bytes(rc[0..8].try_into().unwrap()), 2047);
    // sd_read_write_protect_flag: MODE SENSE(6) 3Fh with 4 bytes, then all.
    let hdr = good(&disk, &[0x1a, 0, 0x3f, 0, 4, 0], &[]);
    assert_eq!(hdr.len(), 4);
    assert_eq!(hdr[2] & 0x80, 0, "not write protected");
    let all = good(&disk, &[0x1a, 0, 0x3f, 0, hdr[0] + 1, 0], &[]);
    assert_eq!(all.len(), usize::from(hdr[0]) + 1);
    // sd_read_cache_type: MODE SENSE(6) page 8, header first, then the page;
    // walk the pages as sd does.
    let hdr = good(&disk, &[0x1a, 0, 0x08, 0, 4, 0], &[]);
    let len = usize::from(hdr[0]) + 1;
    let d = good(&disk, &[0x1a, 0, 0x08, 0, len as u8, 0], &[]);
    let off = 4 + usize::from(d[3]);
    assert_eq!(d[off] & 0x3f, 8);
    assert_ne!(d[off + 2] & 0x04, 0, "write back cache");
    assert_ne!(d[2] & 0x10, 0, "DPOFUA");
    // VPD: supported pages, then the block limits, characteristics and
    // provisioning pages sd reads when listed.
    let pages = good(&disk, &inquiry(true, 0, 255), &[]);
    for p in [0xb0u8, 0xb1, 0xb2, 0x83, 0x80] {
        assert!(pages[4..].contains(&p));
        good(&disk, &inquiry(true, p, 255), &[]);
    }
    // ... and a page it probes that is not there (ATA information).
    assert!(!pages[4..].contains(&0x89));
    // The partition table read.
    assert_eq!(good(&disk, &read10(0, 8), &[]).len(), 8 * BS);
}
