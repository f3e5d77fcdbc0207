#!/bin/bash
# The end-to-end scenario, run inside the outer (host-role) guest under chroot of this machine's
# root: a real kernel owns an SR-IOV PF with real VFs; the real vfmap daemon creates them and
# binds them to vfio-pci; a real inner VM gets one VF per function over QMP; the real agent in
# it binds three different drivers to three same-ID VFs. Then a detach (with the scrub's check
# of the real VF's config space), a VF re-programmed at run time into another function and
# attached as it, and a kill -9 of the daemon in the middle of an attach.
#
# Output for people: "VFMAP-STEP <seconds> <what>" progress lines and the final table.
# Output for the test: "VFMAP-CHECK <name> ok|FAIL <detail>" lines and "VFMAP-RESULT PASS|FAIL".
# JSON (vfmap --json, the agent's devices.json, QMP) is read with jq, here on the outer side: the
# inner VM is busybox only and just prints its devices.json.
#   scenario.sh REPO
# -E: the ERR trap also sees a failure inside a function, to say where the script stopped.
set -Eeuo pipefail
REPO=$1
. "$REPO/scripts/vm/nested/lib.sh"
trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap report_unfinished EXIT

# Re-programming at run time (issue 15): this scenario's card may turn its crypto VF into a
# compress VF and back through a `program` hook. QEMU's NVMe VFs carry no function a hook could
# switch, so this hook stands in for a card's (a QAT service switch, an FPGA bitstream): it
# records the switch in $W/programmed.log, which the checks read. Its environment is cleared,
# so it finds the log from its own path.
cat > "$HOOKS/program-record" <<'SH'
#!/bin/sh
set -eu
echo "$VFMAP_VF $VFMAP_FROM_FUNCTION -> $VFMAP_FUNCTION" >> "$(dirname "$0")/../programmed.log"
SH
chmod 0755 "$HOOKS/program-record"
sed -i -e "/^bring_up = /a program = \"$HOOKS/program-record\"" \
    -e '/^vfs = "1"$/a programmable_to = ["compress"]' \
    -e '/^vfs = "2"$/a programmable_to = ["crypto"]' "$W/profiles.toml"

step "starting vfmap serve on this kernel's /sys (creates the VFs, runs the card's bring_up hook on each, binds them to vfio-pci)"
start_daemon && check daemon-start ok "" || check daemon-start FAIL "see $W/daemon.log"
vfmap inventory && check inventory ok "" || check inventory FAIL "vfmap inventory failed"
for vf in 0000:01:00.1 0000:01:00.2 0000:01:00.3; do
    d=$(host_driver $vf); [ "$d" = vfio-pci ] && check host-bound-$vf ok "$d" || check host-bound-$vf FAIL "driver '$d'"
done
# The profile's bring_up hook (examples/hooks/nvme-bring-up) ran in the daemon's prepare, once
# per VF, before the binds: each VF's NVMe secondary controller is online (the guest's nvme
# driver needs it). Its last word per VF, from the daemon's log: "online" or "already online".
for vf in 0000:01:00.1 0000:01:00.2 0000:01:00.3; do
    said=$(grep -a "hook: nvme-bring-up: .* card=qemu-nvme-sriov phase=bring_up vf=$vf\$" "$W/daemon.log" |
        tail -n 1 | sed 's/.*hook: nvme-bring-up: [^)]*): //; s/ card=.*//') || :
    n=$(bring_ups $vf)
    [ "$n" = 1 ] && check bring-up-$vf ok "hook ran once: $said" ||
        check bring-up-$vf FAIL "$n bring_up runs logged; $(grep -a "phase=bring_up vf=$vf" "$W/daemon.log" | tail -n 2)"
done

step "starting the VM (4 empty root ports, QMP, virtio-serial channel, vfmap-agent inside)"
start_vm
vfmap vm add inner --qmp "$W/inner.qmp" --agent "$W/inner.agent" --slot rp0 --slot rp1 --slot rp2 --slot rp3 &&
    check vm-add ok "" || check vm-add FAIL "vfmap vm add failed"

for f in storage crypto compress; do
    step "vfmap attach inner $f"
    # One row, for this function, ready, with the driver the guest must bind actually bound.
    if out=$(vfmap --json attach inner "$f" 2> "$W/attach.err") &&
        jq -e --arg f "$f" '.attached | length == 1 and .[0].function == $f and .[0].state == "ready"
            and .[0].bound_driver == .[0].guest_driver' <<< "$out" > /dev/null; then
        check attach-$f ok ""
    else
        check attach-$f FAIL "$out $(cat "$W/attach.err")"
    fi
done
if wait_guest 60 0000:01:00.0=nvme 0000:02:00.0=pci-stub 0000:03:00.0=uio_pci_generic; then
    check guest-drivers ok "$(guest_drivers | tr '\n' ' ')"
else
    check guest-drivers FAIL "$(guest_drivers | tr '\n' ' ')"
fi

# The agent's /run/vfmap/devices.json, as the guest prints it: each function bound to its driver.
devices=$(guest_line VFMAP-DEVICES)
if jq -e 'def bound(f; d): any(.[]; .function == f and .driver == d and .state == "bound");
        bound("storage"; "nvme") and bound("crypto"; "pci-stub") and bound("compress"; "uio_pci_generic")' \
        <<< "$devices" > /dev/null 2>&1; then
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
if inventory=$(vfmap --json inventory) &&
    jq -e 'any(.vfs[]; .location == "0000:01:00.2" and .vm == null and .state == null)' <<< "$inventory" > /dev/null; then
    check detach-pool ok "free"
else
    check detach-pool FAIL "not free: ${inventory:-vfmap inventory failed}"
fi
grep -q "VF reset vf=0000:01:00.2" "$W/daemon.log" && check detach-reset ok "reset through sysfs" || check detach-reset FAIL "no reset logged"
# The scrub (issue 15): after the reset the daemon checked the real VF's config space and
# found it reset (nothing quarantined); read here from the host's sysfs, bus master is off.
quarantine=$(vfmap --json quarantine) || quarantine="(vfmap quarantine failed)"
command=$(od -An -tx2 -j4 -N2 /sys/bus/pci/devices/0000:01:00.2/config | tr -d ' \n')
if jq -e '.vfs == []' <<< "$quarantine" > /dev/null 2>&1 && [ $((0x${command:-ffff} & 4)) = 0 ]; then
    check detach-scrub ok "config space reset (command register 0x$command), nothing quarantined"
else
    check detach-scrub FAIL "command register 0x$command; quarantine: $quarantine"
fi

step "re-programming at run time: compress asked for while the only compress VF is held"
gi=$(vfmap --json inventory | jq -r '.vfs[] | select(.location == "0000:01:00.2") | .global_index') || gi=""
if out=$(vfmap --json attach inner compress 2> "$W/attach.err") &&
    jq -e '.attached[0].host_vf == "0000:01:00.2" and .attached[0].function == "compress"
        and .attached[0].bound_driver == "uio_pci_generic"' <<< "$out" > /dev/null; then
    check program-attach ok "the crypto VF re-programmed ($(tr '\n' ' ' < "$W/programmed.log")), attached as compress"
else
    check program-attach FAIL "${out:-} $(cat "$W/attach.err") hook log: $(cat "$W/programmed.log" 2> /dev/null)"
fi
if wait_guest 60 0000:01:00.0=nvme 0000:02:00.0=uio_pci_generic 0000:03:00.0=uio_pci_generic; then
    check program-guest ok "the guest bound the new function's driver: $(guest_drivers | tr '\n' ' ')"
else
    check program-guest FAIL "$(guest_drivers | tr '\n' ' ')"
fi
step "and back: detach it, re-program it into crypto"
vfmap detach inner 1 > /dev/null && check program-detach ok "" || check program-detach FAIL ""
if out=$(vfmap --json program "$gi" crypto) && jq -e '.from == "compress" and .to == "crypto"' <<< "$out" > /dev/null &&
    [ "$(vfmap --json inventory | jq -r --arg gi "$gi" '.vfs[] | select(.global_index == ($gi | tonumber)) | .function')" = crypto ]; then
    check program-back ok "VF $gi carries crypto again"
else
    check program-back FAIL "${out:-vfmap program failed}"
fi
wait_guest 60 0000:01:00.0=nvme 0000:03:00.0=uio_pci_generic || check program-detach-guest FAIL "$(guest_drivers | tr '\n' ' ')"

step "kill -9 of the daemon in the middle of an attach, then restart"
kill -9 "$DAEMON" || check daemon-alive FAIL "the daemon had stopped by itself"
wait "$DAEMON" 2> /dev/null || : # killed: its status is 137
if start_daemon VFMAP_FAILPOINT=plugged; then
    # The failpoint aborts the daemon right after it commits "plugged": the attach must fail.
    if vfmap attach inner crypto > /dev/null 2>&1; then
        check failpoint FAIL "the attach completed: the daemon did not stop at plugged"
    fi
    rc=0
    wait "$DAEMON" 2> /dev/null || rc=$?
    [ "$rc" != 0 ] && check failpoint ok "the daemon died mid-attach (status $rc)" ||
        check failpoint FAIL "the daemon exited 0"
else
    check failpoint FAIL "the daemon with the failpoint did not start"
    kill -9 "$DAEMON" 2> /dev/null || :
    wait "$DAEMON" 2> /dev/null || :
fi
start_daemon && check restart ok "" || check restart FAIL ""
# Each start ran the bring_up hook again (3 starts: the first, the failpoint's, this one) on VFs
# already up, some held by the VM: the hook must see them online and leave them alone.
runs="$(bring_ups 0000:01:00.1) $(bring_ups 0000:01:00.2) $(bring_ups 0000:01:00.3)"
again=$(grep -ac "hook: nvme-bring-up: .*: already online card=qemu-nvme-sriov phase=bring_up" "$W/daemon.log") || :
[ "$runs" = "3 3 3" ] && check bring-up-again ok "3 runs per VF, one per start; 'already online' $again times" ||
    check bring-up-again FAIL "runs per VF: $runs; $(grep -a "phase=bring_up" "$W/daemon.log" | tail -n 3)"
held=$(status_devices) || held="(vfmap status failed)"
plugged=$(qmp_devices) || plugged="(query-pci failed)"
[ "$held" = "$plugged" ] && check recovered-vs-qemu ok "[$held]" || check recovered-vs-qemu FAIL "status [$held] query-pci [$plugged]"
if wait_guest 60 0000:01:00.0=nvme 0000:03:00.0=uio_pci_generic; then
    check recovered-vs-guest ok "$(guest_drivers | tr '\n' ' ')"
else
    check recovered-vs-guest FAIL "$(guest_drivers | tr '\n' ' ')"
fi
if status=$(vfmap --json status inner) &&
    jq -e 'all(.correspondence[]; .state == "ready")' <<< "$status" > /dev/null; then
    check recovered-nothing-in-flight ok ""
else
    check recovered-nothing-in-flight FAIL "in-flight state left: ${status:-vfmap status failed}"
fi

step "final state"
echo "VFMAP-TABLE-BEGIN"
vfmap status inner || check final-status FAIL "vfmap status failed"
echo "guest's own view: $(guest_drivers | tr '\n' ' ')"
echo "VFMAP-TABLE-END"
result
exit $failed
