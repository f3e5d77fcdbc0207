# Outer (host-role) guest of the nested scenario: the SR-IOV PF and vfio here, the machine's own
# root over 9p (read-only) for QEMU and the host binaries, writable paths on a tmpfs, then the
# scenario script from the repository runs under chroot.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
host_role_setup
modprobe virtio_pci
modprobe 9pnet_virtio
modprobe 9p
repo=$(sed -n 's/.*vfmap\.repo=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /host || { echo "VFMAP-FAIL mounting the host root over 9p"; exit 1; }
for d in proc sys dev; do mount --bind /$d /host/$d; done
# Writable state on a tmpfs under /run: not over /tmp, which may hold the repository itself.
mount -t tmpfs run /host/run
rounds=$(sed -n 's/.*vfmap\.rounds=\([0-9]*\).*/\1/p' /proc/cmdline)
# vfmap.agents=LABEL=INITRD,... (scripts/bench-nested --agents): the agents the benchmark
# compares, for bench.sh as VFMAP_BENCH_AGENTS, space-separated.
agents=$(sed -n 's/.*vfmap\.agents=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
# vfmap.bin=PATH (scripts/bench-nested --vfmap-at): the vfmap binary to run, for lib.sh.
vfmap_bin=$(sed -n 's/.*vfmap\.bin=\([^ ]*\).*/\1/p' /proc/cmdline)
# NESTED_SCRIPTS (nested-all.sh): several scenarios in this one boot, in order, each in its own
# working directory after a "VFMAP-SCENARIO NAME" line; all run, and any failure fails.
rc=0
for script in ${NESTED_SCRIPTS:-${NESTED_SCRIPT:-scenario.sh}}; do
    w=/run/vfmap-nested
    if [ -n "${NESTED_SCRIPTS:-}" ]; then
        echo "VFMAP-SCENARIO ${script%.sh}"
        w=$w-${script%.sh}
    fi
    VFMAP_NESTED_W=$w VFMAP_BIN=$vfmap_bin VFMAP_BENCH_AGENTS=$agents \
        chroot /host /bin/bash "$repo/scripts/vm/nested/$script" "$repo" ${rounds:-5} || rc=$?
done
exit $rc
