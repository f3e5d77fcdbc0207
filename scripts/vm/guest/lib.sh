# Helpers for the guest scenario scripts (busybox sh).
#
# A sourced library: it sets no shell options for its caller. The scripts that source it start
# with `set -eu` and `set -o pipefail` themselves (busybox ash has both), and everything here
# works under them.

# wait_for_link PATH SECONDS: wait until PATH exists (drivers may probe asynchronously).
wait_for_link() {
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt "$(($2 * 10))" ]; do sleep 0.1; i=$((i + 1)); done
    [ -e "$1" ]
}

# section NAME COMMAND...: run COMMAND, framing its output and exit code for the host to parse;
# returns COMMAND's exit code (the host checks each section's code, and so do the scripts:
# under `set -e` a failing section ends the script unless its caller expects the failure).
section() {
    name=$1; shift
    echo "VFMAP-BEGIN $name"
    rc=0
    "$@" 2>&1 || rc=$?
    echo "VFMAP-END $name rc=$rc"
    return $rc
}

# host_role_setup: the SR-IOV host role (run-sriov-host): PF driver and vfio.
host_role_setup() {
    for m in nvme vfio_iommu_type1 vfio-pci; do modprobe "$m" || echo "VFMAP-WARN modprobe $m failed"; done
    wait_for_link /sys/bus/pci/devices/0000:01:00.0/driver 30 || echo "VFMAP-WARN nvme PF has no driver"
}
