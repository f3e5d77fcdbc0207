#!/bin/bash
# The attach-path benchmark through libvirt, inside the nested set-up (outer guest, chroot of
# this machine's root, Debian's libvirtd running the domain of examples/libvirt-domain.xml).
# For ROUNDS rounds, interleaved, on the same VF (crypto, 0000:01:00.2) and the same guest
# driver (pci-stub):
#   vfmap:    `vfmap attach` end to end (host bind, virsh attach-device, live XML read back,
#             the agent binds pci-stub, its answer), then `vfmap detach`;
#   baseline: the bare path by hand: `virsh attach-device --live` of the same VF's hostdev on
#             root port pci.5 and vfmap-baseline-bind in the guest doing driver_override +
#             drivers_probe on what appears behind it (no fork, 5 ms polls), then `virsh detach-device-alias` and waiting for it to go.
# Prints "VFMAP-BENCH round tool total_ms" rows.
#   libvirt-bench.sh REPO [ROUNDS]
set -Eeuo pipefail
REPO=$1
ROUNDS=${2:-5}
. "$REPO/scripts/vm/nested/lib.sh"
. "$REPO/scripts/vm/nested/libvirt-lib.sh"
trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap report_unfinished EXIT
VF=0000:01:00.2
ms() { echo "$1 $2" | awk '{printf "%.0f", ($2 - $1) * 1000}'; }
baseline_count() { awk '/^VFMAP-BASELINE-BOUND/ { n++ } END { print n + 0 }' "$W/inner.console"; }

step "starting the daemon (the VFs' controllers by its bring_up hook), libvirtd and the domain (baseline watcher on pci.5, 00:01.4)"
start_daemon || check daemon-start FAIL ""
libvirt_setup
start_libvirtd || check libvirtd FAIL "$(tail -5 "$W/libvirtd.log")"
start_domain "vfmap.baseline=1 vfmap.baseline_port=0000:00:01.4"
vfmap vm add inner --libvirt "$DOMAIN" --slot pci.2 --slot pci.3 --slot pci.4 > /dev/null ||
    check vm-add FAIL "vfmap vm add failed"
cat > "$W/baseline.xml" <<XML
<hostdev mode='subsystem' type='pci' managed='no'>
  <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x2'/></source>
  <alias name='ua-baseline'/>
  <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
</hostdev>
XML

# Round 0 is a warm-up of both paths (first-time costs: the guest's modules, libvirt's and the
# daemon's first calls), not printed.
echo "VFMAP-BENCH round tool total_ms"
for r in $(seq 0 "$ROUNDS"); do
    step "round $r: vfmap"
    t0=$EPOCHREALTIME
    vfmap attach inner crypto > /dev/null || check attach-$r FAIL ""
    t1=$EPOCHREALTIME
    [ "$r" = 0 ] || echo "VFMAP-BENCH $r vfmap $(ms "$t0" "$t1")"
    vfmap detach inner 0 > /dev/null || check detach-$r FAIL ""

    step "round $r: baseline (virsh attach-device --live + the guest binder)"
    before=$(baseline_count)
    t0=$EPOCHREALTIME
    virsh attach-device "$DOMAIN" "$W/baseline.xml" --live > /dev/null || check baseline-attach-$r FAIL ""
    for _ in $(seq 6000); do [ "$(baseline_count)" -gt "$before" ] && break; sleep 0.01; done
    t1=$EPOCHREALTIME
    [ "$(baseline_count)" -gt "$before" ] || check baseline-bound-$r FAIL "the guest never bound it"
    [ "$r" = 0 ] || echo "VFMAP-BENCH $r baseline $(ms "$t0" "$t1")"
    virsh detach-device-alias "$DOMAIN" ua-baseline --live > /dev/null || check baseline-detach-$r FAIL ""
    for _ in $(seq 600); do virsh dumpxml "$DOMAIN" | grep -q "ua-baseline" || break; sleep 0.05; done
done
# vfmap's steps with the daemon's timestamps, to see where an attach's time goes.
grep -a "assignment reserved\|assignment state\|released; VF free" "$W/daemon.log" | sed 's/^/VFMAP-LOG /' || :
stop_libvirtd
result
exit $failed
