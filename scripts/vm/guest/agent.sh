# The agent VM: vfmap-agent serves the virtio-serial port "org.vfmap.0" (and, with [metadata] in its
# config, the config drive's devices); every second the guest's own view is printed for the
# host test: devices.json and each PCI device's driver.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
modprobe virtio_pci
modprobe virtio_console
# The disk driver of a config drive (metadata mode); what udev would load in a full system.
modprobe virtio_blk
mkdir -p /run/vfmap
# The agent runs for the VM's life; should it ever stop, its exit code is reported.
(
    rc=0
    vfmap-agent > /dev/console 2>&1 || rc=$?
    echo "VFMAP-AGENT-EXIT $rc"
) &
# Benchmark baseline (vfmap.baseline=1): the bare minimum by hand, with no vfmap involved:
# vfmap-baseline-bind (in the image for the benchmarks) binds pci-stub to whatever appears
# behind root port 03.3 (or the ports of vfmap.baseline_port=, comma-separated) with
# driver_override + drivers_probe, polling every 5 ms without forking, and unbinding a driver
# that took the device first.
if grep -q "vfmap.baseline=1" /proc/cmdline; then
    # The root ports watched: vfmap.baseline_port= (the libvirt domain's differ), else 03.3.
    port=$(sed -n 's/.*vfmap\.baseline_port=\([0-9a-f:.,]*\).*/\1/p' /proc/cmdline)
    modprobe pci-stub
    if [ -x /bin/vfmap-baseline-bind ]; then
        /bin/vfmap-baseline-bind "${port:-0000:00:03.3}" pci-stub &
    else
        echo "VFMAP-BASELINE-MISSING /bin/vfmap-baseline-bind is not in this image"
    fi
fi
# The benchmarks (vfmap.bench=1) read neither view: the loop below forks a dozen processes a
# second, which in a nested TCG guest with one vCPU takes CPU time from what is measured.
if grep -q "vfmap.bench=1" /proc/cmdline; then
    while true; do sleep 3600; done
fi
while true; do
    drivers=""
    for d in /sys/bus/pci/devices/*; do
        drv=$(readlink "$d/driver" 2> /dev/null) || drv=""
        drivers="$drivers ${d##*/}=${drv##*/}"
    done
    echo "VFMAP-DRIVERS$drivers"
    # Flattened to one line; the host reads it with a JSON parser.
    devices=$(tr -d '\n ' < /run/vfmap/devices.json 2> /dev/null) || devices=""
    echo "VFMAP-DEVICES $devices"
    sleep 1
done
