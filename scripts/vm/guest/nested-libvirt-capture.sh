# Outer guest for scripts/capture-libvirt-fixtures: like nested.sh, then
# scripts/vm/nested/libvirt-capture.sh.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
NESTED_SCRIPT=libvirt-capture.sh . /lib/vfmap/nested.sh
