# Outer guest of the test command's nested run: both end-to-end scenarios in one boot, over QMP
# (scripts/vm/nested/scenario.sh) and through libvirt (libvirt.sh), sharing the boot and the
# NVMe controllers' bring-up.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
NESTED_SCRIPTS="scenario.sh libvirt.sh" . /lib/vfmap/nested.sh
