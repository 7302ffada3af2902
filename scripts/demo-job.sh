# The demo guest's job: find the disk behind the (remote) LSI controller,
# show what the driver saw, and use the disk: a file system that survives a
# remount, then raw direct I/O.
i=0
while [ ! -b /dev/sda ] && [ $i -lt 600 ]; do
    [ -e /sys/block/sda/dev ] && mknod /dev/sda b $(cut -d: -f1 /sys/block/sda/dev) $(cut -d: -f2 /sys/block/sda/dev)
    sleep 0.1; i=$((i+1))
done
[ -b /dev/sda ] || { echo "no /dev/sda"; dmesg | tail -30; exit 1; }
dmesg | grep -e 'sym0' -e 'sd 0:'
echo "sda: $(( $(cat /sys/block/sda/size) / 2048 )) MiB"
mke2fs -q -F /dev/sda >/dev/null || exit 2
mkdir -p /mnt && mount -t ext2 /dev/sda /mnt || exit 3
echo "hello from the guest, $(date)" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random bs=64k count=32 2>/dev/null
sum=$(md5sum /mnt/random | cut -d' ' -f1)
umount /mnt && echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/sda /mnt || exit 4
cat /mnt/hello.txt
[ "$(md5sum /mnt/random | cut -d' ' -f1)" = "$sum" ] && echo "file system: 2 MiB file read back intact ($sum)" || exit 5
umount /mnt
dd if=/dev/sda of=/dev/null bs=64k count=256 iflag=direct 2>&1 | tail -1
echo "demo: done"
