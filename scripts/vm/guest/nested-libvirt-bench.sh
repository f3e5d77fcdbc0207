# Outer guest of the libvirt benchmark: like nested.sh, then scripts/vm/nested/libvirt-bench.sh.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
NESTED_SCRIPT=libvirt-bench.sh . /lib/vfmap/nested.sh
