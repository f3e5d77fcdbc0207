# Outer (host-role) guest of the real-kubelet rig: like nested.sh (the SR-IOV PF, vfio, this
# machine's root over 9p, a tmpfs /run), then scripts/k8s/nested-kubelet.sh under chroot.
# Installed into the initramfs as /lib/vfmap/nested-k8s.sh by scripts/k8s/run-nested.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
NESTED_SCRIPT=../../k8s/nested-kubelet.sh . /lib/vfmap/nested.sh
