# Outer guest of the nested libvirt scenario: like nested.sh, then
# scripts/vm/nested/libvirt.sh.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
NESTED_SCRIPT=libvirt.sh . /lib/vfmap/nested.sh
