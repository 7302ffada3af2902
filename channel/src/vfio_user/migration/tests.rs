use super::*;
use MigState::*;

/// libvfio-user's `next_state` table (lib/migration_priv.h), row `from`,
/// column `to`, ERROR where it refuses; `None` below is "refused or
/// already there".
const LIBVFIO_USER: [[MigState; 8]; 8] = [
    [Error; 8],
    // STOP
    [
        Error, Stop, Running, StopCopy, Resuming, Error, Running, Error,
    ],
    // RUNNING
    [Error, Stop, Running, Stop, Stop, Error, PreCopy, Error],
    // STOP_COPY (its PRE_COPY entry is STOP; the spec refuses that arc)
    [Error, Stop, Stop, StopCopy, Stop, Error, Stop, Error],
    // RESUMING
    [Error, Stop, Stop, Stop, Resuming, Error, Stop, Error],
    [Error; 8],
    // PRE_COPY
    [
        Error, Running, Running, StopCopy, Running, Error, PreCopy, Error,
    ],
    [Error; 8],
];

#[test]
fn the_path_between_two_states_is_libvfio_users_but_for_stop_copy_to_pre_copy() {
    for from in MigState::ALL {
        for to in MigState::ALL {
            let theirs = LIBVFIO_USER[from as usize][to as usize];
            let want = if theirs == Error || from == to || (from, to) == (StopCopy, PreCopy) {
                None
            } else {
                Some(theirs)
            };
            assert_eq!(next_step(from, to, true), want, "{from:?} -> {to:?}");
        }
    }
}

#[test]
fn without_pre_copy_its_arcs_are_gone() {
    assert_eq!(next_step(Running, PreCopy, false), None);
    assert_eq!(next_step(Stop, PreCopy, false), None);
    assert_eq!(next_step(Running, StopCopy, false), Some(Stop));
    assert_eq!(next_step(Resuming, Running, false), Some(Stop));
    assert_eq!(next_step(StopCopy, Resuming, false), Some(Stop));
    for s in MigState::ALL {
        assert_eq!(MigState::from_u32(s as u32), Some(s));
    }
    assert_eq!(MigState::from_u32(8), None);
}

#[test]
fn feature_data_round_trips_and_bad_lengths_are_refused() {
    let st = MigDeviceState {
        device_state: 3,
        data_fd: u32::MAX,
    };
    let mut b = Vec::new();
    st.encode(&mut b);
    assert_eq!(b.len(), MigDeviceState::LEN);
    assert_eq!(MigDeviceState::parse(&b), Ok(st));
    assert!(MigDeviceState::parse(&b[..7]).is_err());

    let start = DmaLoggingStart {
        page_size: 4096,
        ranges: vec![
            DmaRange {
                iova: 0,
                length: 1 << 20,
            },
            DmaRange {
                iova: 1 << 32,
                length: 1 << 30,
            },
        ],
    };
    let mut b = Vec::new();
    start.encode(&mut b);
    assert_eq!(b.len(), 16 + 2 * 16);
    assert_eq!(DmaLoggingStart::parse(&b, 8), Ok(start));
    // More ranges than allowed, a length that does not match the count.
    assert!(DmaLoggingStart::parse(&b, 1).is_err());
    assert!(DmaLoggingStart::parse(&b[..40], 8).is_err());
    assert!(DmaLoggingStart::parse(&b[..8], 8).is_err());

    let rep = DmaLoggingReport {
        iova: 0x1000,
        length: 65 * 4096,
        page_size: 4096,
    };
    let mut b = Vec::new();
    rep.encode(&mut b);
    assert_eq!(DmaLoggingReport::parse(&b), Ok(rep));
    assert!(DmaLoggingReport::parse(&b[..23]).is_err());
    // 65 pages: two 64-bit words.
    assert_eq!(rep.bitmap_bytes(), Some(16));
    for bad in [
        DmaLoggingReport { length: 0, ..rep },
        DmaLoggingReport {
            page_size: 3000,
            ..rep
        },
        DmaLoggingReport {
            iova: u64::MAX,
            ..rep
        },
    ] {
        assert_eq!(bad.bitmap_bytes(), None, "{bad:?}");
    }
}
