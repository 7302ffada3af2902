//! The guest side of the x-pci-proxy-dev ↔ remote-host (dma-example)
//! tests, shared by `mpqemu_proxy` (TCG) and `mpqemu_nested` (KVM in L1):
//! a busybox job that finds 1234:11e9 in /sys/bus/pci, binds it to
//! `uio_pci_generic`, reads and writes its registers with `devmem`, runs a
//! DMA between two buffers in the low 1 MiB (the only RAM Debian's
//! `STRICT_DEVMEM` lets `devmem` map; the kernel keeps it reserved) and
//! waits up to `$IRQ_WAIT` s (default 10) for the interrupt on `/dev/uio0`.

/// Kernel modules of the job.
pub const MODULES: &[&str] = &["uio", "uio_pci_generic"];

pub const JOB: &str = r#"
d=""
for p in /sys/bus/pci/devices/*; do
  echo "PCI $(basename $p) $(cat $p/vendor) $(cat $p/device)"
  if [ "$(cat $p/vendor) $(cat $p/device)" = "0x1234 0x11e9" ]; then d=$p; fi
done
[ -n "$d" ] || { echo "NO-DEVICE"; exit 1; }
echo "DMAEX $(basename $d) irq $(cat $d/irq)"
res=$(head -n 1 $d/resource)
echo "RES0 $res"
base=$(echo $res | cut -d' ' -f1)
echo "1234 11e9" > /sys/bus/pci/drivers/uio_pci_generic/new_id
[ -c /dev/uio0 ] && echo "UIO-BOUND"
# Memory decoding (uio enabled the device) and bus mastering.
cmd=$(od -An -tu1 -j4 -N1 $d/config)
printf "\\$(printf %o $((cmd | 6)))" | dd of=$d/config bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
echo "CMD $(od -An -tx2 -j4 -N2 $d/config)"
echo "ID $(devmem $base 32)"
devmem $((base + 8)) 32 0x5a5a1234
echo "SCRATCH $(devmem $((base + 8)) 32)"
devmem $((base + 4)) 32 0x0f0f0f0f
echo "LIVENESS $(devmem $((base + 4)) 32)"
i=0
for v in 0x11223344 0x55667788 0x99aabbcc 0xddeeff00; do
  devmem $((0x20000 + i * 4)) 32 $v
  devmem $((0x30000 + i * 4)) 32 0
  i=$((i + 1))
done
devmem $((base + 0x40)) 32 0x20000
devmem $((base + 0x44)) 32 0
devmem $((base + 0x48)) 32 0x30000
devmem $((base + 0x4c)) 32 0
devmem $((base + 0x50)) 32 16
# Unmask the uio interrupt, then start the DMA with its interrupt.
printf '\001\000\000\000' > /dev/uio0
devmem $((base + 0x58)) 32 5
ev=$(timeout ${IRQ_WAIT:-10} dd if=/dev/uio0 bs=4 count=1 2>/dev/null | od -An -tu4)
echo "UIO-EVENT ${ev:-none}"
echo "DMA-RESULT $(devmem $((base + 0x5c)) 32)"
echo "IRQ-STATUS $(devmem $((base + 0x24)) 32)"
echo "DST $(devmem 0x30000 32) $(devmem 0x30004 32) $(devmem 0x30008 32) $(devmem 0x3000c 32)"
devmem $((base + 0x2c)) 32 0x100
echo "IRQ-STATUS-AFTER-ACK $(devmem $((base + 0x24)) 32)"
grep -i uio /proc/interrupts
"#;

/// Checks the job output (lower-cased by the caller): ids, BAR0 size,
/// registers, the DMA, and (with `irq`) the interrupt.
pub fn check(out: &str, irq: bool, log: &dyn Fn() -> String) {
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- guest output ---\n{out}\n--- remote-host log ---\n{}",
            log()
        )
    };
    if !out
        .lines()
        .any(|l| l.starts_with("pci ") && l.ends_with(" 0x1234 0x11e9"))
    {
        fail("the guest does not list 1234:11e9 in /sys/bus/pci");
    }
    let res0: Vec<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("res0 "))
        .unwrap_or_else(|| fail("no BAR0 resource"))
        .split_whitespace()
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect();
    if res0.len() < 2 || res0[1] - res0[0] + 1 != 0x1000 {
        fail("BAR0 is not 4 KiB");
    }
    for (want, what) in [
        ("uio-bound", "uio_pci_generic did not bind"),
        ("id 0xd3a00001", "BAR0 ID register through the proxy"),
        ("scratch 0x5a5a1234", "SCRATCH write/read"),
        ("liveness 0xf0f0f0f0", "LIVENESS write/read"),
        ("dma-result 0x00000000", "DMA result"),
        ("irq-status 0x00000100", "DMA-done interrupt cause"),
        (
            "dst 0x11223344 0x55667788 0x99aabbcc 0xddeeff00",
            "the DMA copied the buffer in guest RAM",
        ),
        ("irq-status-after-ack 0x00000000", "IRQ_ACK"),
    ] {
        if !out.contains(want) {
            fail(what);
        }
    }
    let event = out
        .lines()
        .find_map(|l| l.strip_prefix("uio-event "))
        .unwrap_or("none")
        .trim();
    if irq && event == "none" {
        fail("no interrupt reached the guest (/dev/uio0)");
    }
}
