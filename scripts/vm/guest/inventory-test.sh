# Real-kernel test of `vfmap prepare` and `vfmap inventory` against this guest's real /sys.
# Each step's output is framed by VFMAP-BEGIN/VFMAP-END lines for the host test to check.
. /lib/vfmap/lib.sh
host_role_setup
p=/etc/vfmap/profiles.toml
section inventory-before vfmap --json inventory --profiles $p
section prepare vfmap prepare --profiles $p
section prepare-again vfmap --json prepare --profiles $p
section inventory vfmap --json inventory --profiles $p
section inventory-text vfmap inventory --profiles $p
section dev-vfio ls /dev/vfio
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
section refused vfmap prepare --profiles /tmp/fewer.toml
section inventory-after-refusal vfmap --json inventory --profiles $p
exit 0
