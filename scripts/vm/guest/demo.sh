# The demo inside the SR-IOV host-role guest: inventory before, prepare, inventory after.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
host_role_setup
p=/etc/vfmap/profiles.toml
section profiles cat $p
section inventory-before vfmap inventory --profiles $p
section prepare vfmap prepare --profiles $p
section inventory-after vfmap inventory --profiles $p
section check vfmap prepare --dry-run --profiles $p
exit 0
