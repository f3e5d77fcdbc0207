#!/bin/bash
# The end-to-end scenario, run inside the outer (host-role) guest under chroot of this machine's
# root: a real kernel owns an SR-IOV PF with real VFs; the real vfmap daemon creates them and
# binds them to vfio-pci; a real inner VM gets one VF per function over QMP; the real agent in
# it binds three different drivers to three same-ID VFs. Then a detach, and a kill -9 of the
# daemon in the middle of an attach.
#
# Output for people: "VFMAP-STEP <seconds> <what>" progress lines and the final table.
# Output for the test: "VFMAP-CHECK <name> ok|FAIL <detail>" lines and "VFMAP-RESULT PASS|FAIL".
#   scenario.sh REPO
REPO=$1
. "$REPO/scripts/vm/nested/lib.sh"
step "starting vfmap serve on this kernel's /sys (creates the VFs, binds them to vfio-pci)"
start_daemon || { check daemon-start FAIL "see $W/daemon.log"; }
vfmap inventory
for vf in 0000:01:00.1 0000:01:00.2 0000:01:00.3; do
    d=$(host_driver $vf); [ "$d" = vfio-pci ] && check host-bound-$vf ok "$d" || check host-bound-$vf FAIL "driver '$d'"
done

step "bringing the emulated VFs' NVMe secondary controllers online (card-specific, nvme-cli)"
controllers_online

step "starting the VM (4 empty root ports, QMP, virtio-serial channel, vfmap-agent inside)"
start_vm
vfmap vm add inner --qmp "$W/inner.qmp" --agent "$W/inner.agent" --slot rp0 --slot rp1 --slot rp2 --slot rp3

for f in storage crypto compress; do
    step "vfmap attach inner $f"
    out=$(vfmap --json attach inner $f 2>&1)
    echo "$out" | grep -q '"state":"ready"' && check attach-$f ok "" || check attach-$f FAIL "$out"
done
if wait_guest 60 0000:01:00.0=nvme 0000:02:00.0=pci-stub 0000:03:00.0=uio_pci_generic; then
    check guest-drivers ok "$(guest_drivers | tr '\n' ' ')"
else
    check guest-drivers FAIL "$(guest_drivers | tr '\n' ' ')"
fi

devices=$(grep -a "^VFMAP-DEVICES" "$W/inner.console" | tail -2 | head -1 | tr -d '\r')
if echo "$devices" | grep -q '"function":"storage"[^}]*"driver":"nvme"' &&
    echo "$devices" | grep -q '"function":"crypto"[^}]*"driver":"pci-stub"' &&
    echo "$devices" | grep -q '"function":"compress"[^}]*"driver":"uio_pci_generic"'; then
    check devices-json ok "the agent's /run/vfmap/devices.json lists all three"
else
    check devices-json FAIL "$devices"
fi

step "vfmap detach inner 1 (crypto)"
vfmap detach inner 1 && check detach ok "" || check detach FAIL ""
if wait_guest 60 0000:01:00.0=nvme 0000:03:00.0=uio_pci_generic; then
    check detach-guest ok "gone from the guest"
else
    check detach-guest FAIL "$(guest_drivers | tr '\n' ' ')"
fi
d=$(host_driver 0000:01:00.2); [ "$d" = vfio-pci ] && check detach-host ok "back on vfio-pci, reset" || check detach-host FAIL "driver '$d'"
vfmap --json inventory | grep -q '"location":"0000:01:00.2"[^}]*"vm":null' && check detach-pool ok "free" || check detach-pool FAIL "not free"
grep -q "VF reset vf=0000:01:00.2" "$W/daemon.log" && check detach-reset ok "reset through sysfs" || check detach-reset FAIL "no reset logged"

step "kill -9 of the daemon in the middle of an attach, then restart"
kill -9 "$DAEMON"; wait "$DAEMON" 2> /dev/null
VFMAP_FAILPOINT=plugged "$VFMAP" serve --config "$W/vfmap.toml" 2>> "$W/daemon.log" & DAEMON=$!
for _ in $(seq 200); do [ -S "$API" ] && vfmap vm list > /dev/null 2>&1 && break; sleep 0.1; done
vfmap attach inner crypto > /dev/null 2>&1
wait "$DAEMON" 2> /dev/null # the failpoint aborts it right after committing "plugged"
start_daemon && check restart ok "" || check restart FAIL ""
held=$(status_devices); plugged=$(qmp_devices)
[ "$held" = "$plugged" ] && check recovered-vs-qemu ok "[$held]" || check recovered-vs-qemu FAIL "status [$held] query-pci [$plugged]"
if wait_guest 60 0000:01:00.0=nvme 0000:03:00.0=uio_pci_generic; then
    check recovered-vs-guest ok "$(guest_drivers | tr '\n' ' ')"
else
    check recovered-vs-guest FAIL "$(guest_drivers | tr '\n' ' ')"
fi
vfmap --json status inner | grep -q '"state":"\(reserved\|host_bound\|plugged\|sent\|releasing\)"' &&
    check recovered-nothing-in-flight FAIL "in-flight state left" || check recovered-nothing-in-flight ok ""

step "final state"
echo "VFMAP-TABLE-BEGIN"
vfmap status inner
echo "guest's own view: $(guest_drivers | tr '\n' ' ')"
echo "VFMAP-TABLE-END"
[ $failed = 0 ] && echo "VFMAP-RESULT PASS" || { echo "VFMAP-RESULT FAIL (logs: $W/daemon.log, $W/inner.console)"; tail -30 "$W/daemon.log"; }
exit $failed
