# Captures the PCI part of this real kernel's sysfs into a tarball printed as base64, to be
# committed as a golden fixture: attribute files copied, symlinks recreated with their real
# relative targets. VFs are enabled with autoprobe off, VF0 bound to vfio-pci, VF1 to pci-stub.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
host_role_setup
pf=/sys/bus/pci/devices/0000:01:00.0
echo 0 > $pf/sriov_drivers_autoprobe
echo 3 > $pf/sriov_numvfs
modprobe pci-stub
echo vfio-pci > /sys/bus/pci/devices/0000:01:00.1/driver_override
echo 0000:01:00.1 > /sys/bus/pci/drivers_probe
echo pci-stub > /sys/bus/pci/devices/0000:01:00.2/driver_override
echo 0000:01:00.2 > /sys/bus/pci/drivers_probe

out=/tmp/cap
for link in /sys/bus/pci/devices/*; do
    name=${link##*/}
    real=$(readlink -f "$link")
    mkdir -p "$out$real" "$out/sys/bus/pci/devices"
    ln -s "$(readlink "$link")" "$out/sys/bus/pci/devices/$name"
    for a in vendor device subsystem_vendor subsystem_device class numa_node driver_override \
             sriov_totalvfs sriov_numvfs sriov_offset sriov_stride sriov_vf_device \
             sriov_drivers_autoprobe sriov_vf_total_msix; do
        # An attribute that exists but cannot be read is captured as an empty file.
        [ -f "$real/$a" ] && { cat "$real/$a" > "$out$real/$a" 2>/dev/null || :; }
    done
    for l in driver iommu_group physfn "$real"/virtfn*; do
        l=${l##*/}
        if [ -L "$real/$l" ]; then ln -s "$(readlink "$real/$l")" "$out$real/$l"; fi
    done
done
# Each bound device's link in its driver's directory (the other side of its `driver` link).
for l in /sys/bus/pci/drivers/*/????:??:??.?; do
    [ -L "$l" ] || continue
    mkdir -p "$out${l%/*}"
    ln -s "$(readlink "$l")" "$out$l"
done
# git keeps no empty directory: mark the ones driver/iommu_group links point to.
for d in /sys/bus/pci/drivers/* /sys/kernel/iommu_groups/*; do mkdir -p "$out$d"; : > "$out$d/.gitkeep"; done
: > "$out/sys/bus/pci/drivers_probe"
uname -r > "$out/sys/CAPTURED-FROM-KERNEL"

echo "VFMAP-BEGIN capture"
tar -C "$out/sys" -cf - . | gzip -9 | base64
echo "VFMAP-END capture rc=0"
