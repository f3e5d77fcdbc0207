# The agent VM: vfmap-agent serves the virtio-serial port "vfmap"; every second the guest's
# own view is printed for the host test: devices.json and each PCI device's driver.
. /lib/vfmap/lib.sh
modprobe virtio_pci
modprobe virtio_console
mkdir -p /run/vfmap
vfmap-agent > /dev/console 2>&1 &
while true; do
    drivers=""
    for d in /sys/bus/pci/devices/*; do
        drv=$(readlink "$d/driver" 2>/dev/null)
        drivers="$drivers ${d##*/}=${drv##*/}"
    done
    echo "VFMAP-DRIVERS$drivers"
    echo "VFMAP-DEVICES $(tr -d '\n ' < /run/vfmap/devices.json 2>/dev/null)"
    sleep 1
done
