# Real-kernel test of `vfmap prepare` and `vfmap inventory` against this guest's real /sys.
# Each step's output is framed by VFMAP-BEGIN/VFMAP-END lines for the host test to check.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
host_role_setup
p=/etc/vfmap/profiles.toml
section inventory-before vfmap --json inventory --profiles $p
section prepare vfmap prepare --profiles $p
section prepare-again vfmap --json prepare --profiles $p
section inventory vfmap --json inventory --profiles $p
section inventory-text vfmap inventory --profiles $p
section dev-vfio ls /dev/vfio
# `vfmap doctor` on the prepared host must be all green: intel-iommu with interrupt remapping,
# vfio loaded, the card, its VF count and IOMMU groups, every driver of the profile.
rc=0
section doctor vfmap doctor --profiles $p > /tmp/doctor.txt || rc=$?
cat /tmp/doctor.txt
if [ "$rc" != 0 ] || ! grep -q '^ready: 0 errors, 0 warnings' /tmp/doctor.txt; then
    echo "VFMAP-WARN doctor is not all green (exit $rc)"
    exit 1
fi
cat > /tmp/fewer.toml <<'TOML'
[[card]]
name = "qemu-nvme-sriov"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 2
[[card.function]]
name = "storage"
vfs = "0-1"
guest_driver = "nvme"
TOML
# Refused, with exit code 3 (the host test checks the message too).
rc=0
section refused vfmap prepare --profiles /tmp/fewer.toml || rc=$?
[ "$rc" = 3 ] || { echo "VFMAP-WARN the refused prepare exited $rc, not 3"; exit 1; }
section inventory-after-refusal vfmap --json inventory --profiles $p
exit 0
