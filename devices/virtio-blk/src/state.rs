//! The device's state as a versioned blob: the common configuration the
//! driver wrote (features, status, each queue's set-up), the ISR, and for
//! each queue where the device is in its rings. Little-endian, fixed
//! layout:
//!
//! ```text
//! magic "VBLK" | version u8 | driver_features u64 | status u8 |
//! config_generation u8 | isr u8 | msix_config u16 | queue count u16 |
//! per queue: size u16, ready u8, desc u64, avail u64, used u64,
//!            msix_vector u16, next_avail u16, next_used u16
//! ```
//!
//! The device's own features and queue count come from its settings, not
//! from the blob: a blob saved with other ones is refused.

use crate::queue::SplitQueue;
use crate::transport::{status, QueueConfig, Transport, NO_VECTOR};

const MAGIC: &[u8; 4] = b"VBLK";
pub const VERSION: u8 = 1;
const QUEUE_BYTES: usize = 2 + 1 + 8 * 3 + 2 + 2 + 2;
const HEAD_BYTES: usize = 4 + 1 + 8 + 1 + 1 + 1 + 2 + 2;

/// What [`decode`] found.
#[derive(Debug)]
pub struct Saved {
    pub transport: Transport,
    /// Empty when the driver had not set DRIVER_OK (the worker sets the
    /// rings up then).
    pub rings: Vec<SplitQueue>,
}

pub fn encode(t: &Transport, rings: &[SplitQueue]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEAD_BYTES + QUEUE_BYTES * t.queues.len());
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.extend_from_slice(&t.driver_features.to_le_bytes());
    b.extend_from_slice(&[t.status, t.config_generation, t.isr]);
    b.extend_from_slice(&t.msix_config.to_le_bytes());
    b.extend_from_slice(&(t.queues.len() as u16).to_le_bytes());
    for (i, q) in t.queues.iter().enumerate() {
        let (next_avail, next_used) = rings.get(i).map_or((0, 0), |r| (r.next_avail, r.next_used));
        b.extend_from_slice(&q.size.to_le_bytes());
        b.push(u8::from(q.ready));
        b.extend_from_slice(&q.desc.to_le_bytes());
        b.extend_from_slice(&q.avail.to_le_bytes());
        b.extend_from_slice(&q.used.to_le_bytes());
        b.extend_from_slice(&q.msix_vector.to_le_bytes());
        b.extend_from_slice(&next_avail.to_le_bytes());
        b.extend_from_slice(&next_used.to_le_bytes());
    }
    b
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        if self.0.len() < N {
            return Err("the state is truncated".into());
        }
        let (a, rest) = self.0.split_at(N);
        self.0 = rest;
        a.try_into()
            .map_err(|_| "the state is truncated".to_string())
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// Checks `blob` against the device as it is now (`now`: its features,
/// queue count and largest queue) and returns the state to take.
pub fn decode(blob: &[u8], now: &Transport) -> Result<Saved, String> {
    let mut r = Reader(blob);
    if &r.take::<4>()? != MAGIC {
        return Err("not a virtio-blk state".into());
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(format!(
            "virtio-blk state version {version}; this plugin reads version {VERSION}"
        ));
    }
    let mut t = now.clone();
    t.reset();
    t.driver_features = r.u64()?;
    if t.driver_features & !t.device_features != 0 {
        return Err(format!(
            "the state's features {:#x} are not all offered by this device ({:#x})",
            t.driver_features, t.device_features
        ));
    }
    t.status = r.u8()?;
    t.config_generation = r.u8()?;
    t.isr = r.u8()? & 3;
    let vector = |v: u16| -> Result<u16, String> {
        if v == NO_VECTOR || v < now.msix_vectors {
            Ok(v)
        } else {
            Err(format!(
                "MSI-X vector {v}; this device has {}",
                now.msix_vectors
            ))
        }
    };
    t.msix_config = vector(r.u16()?)?;
    let n = usize::from(r.u16()?);
    if n != t.queues.len() {
        return Err(format!(
            "the state has {n} queues; this device has {}",
            t.queues.len()
        ));
    }
    let mut rings = Vec::with_capacity(n);
    for q in t.queues.iter_mut() {
        let size = r.u16()?;
        if size > now.max_queue_size || (size != 0 && !size.is_power_of_two()) {
            return Err(format!("a queue of {size} entries"));
        }
        *q = QueueConfig {
            size,
            ready: r.u8()? != 0,
            desc: r.u64()?,
            avail: r.u64()?,
            used: r.u64()?,
            msix_vector: vector(r.u16()?)?,
        };
        let mut ring = SplitQueue::new(*q);
        ring.next_avail = r.u16()?;
        ring.next_used = r.u16()?;
        rings.push(ring);
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the state", r.0.len()));
    }
    if t.status & status::DRIVER_OK == 0 {
        rings.clear();
    }
    Ok(Saved {
        transport: t,
        rings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Transport {
        Transport::new(1 << 9, 2, 256, 3)
    }

    #[test]
    fn round_trip_and_refusals() {
        let mut t = device();
        t.driver_features = (1 << 9) | crate::transport::F_VERSION_1;
        t.status = 15;
        t.isr = 1;
        t.queues[1] = QueueConfig {
            size: 64,
            ready: true,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            msix_vector: 2,
        };
        let mut rings: Vec<SplitQueue> = t.queues.iter().map(|q| SplitQueue::new(*q)).collect();
        rings[1].next_avail = 7;
        rings[1].next_used = 5;
        let blob = encode(&t, &rings);
        let s = decode(&blob, &device()).unwrap();
        assert_eq!(s.transport.queues, t.queues);
        assert_eq!(s.transport.driver_features, t.driver_features);
        assert_eq!((s.rings[1].next_avail, s.rings[1].next_used), (7, 5));

        for cut in 0..blob.len() {
            assert!(decode(&blob[..cut], &device()).is_err(), "cut at {cut}");
        }
        let mut other = blob.clone();
        other[4] = 9;
        assert!(decode(&other, &device()).unwrap_err().contains("version 9"));
        let one_queue = Transport::new(1 << 9, 1, 256, 3);
        assert!(decode(&blob, &one_queue).unwrap_err().contains("2 queues"));
        let fewer_features = Transport::new(0, 2, 256, 3);
        assert!(decode(&blob, &fewer_features)
            .unwrap_err()
            .contains("features"));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(decode(&longer, &device()).is_err());
        let mut bad_size = blob;
        // Queue 1's size (after the head and queue 0).
        let at = HEAD_BYTES + QUEUE_BYTES;
        bad_size[at..at + 2].copy_from_slice(&100u16.to_le_bytes());
        assert!(decode(&bad_size, &device()).is_err());
    }
}
