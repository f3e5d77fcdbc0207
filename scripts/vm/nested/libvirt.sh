#!/bin/bash
# The end-to-end scenario through libvirt, run inside the outer (host-role) guest under chroot of
# this machine's root: a real kernel owns an SR-IOV PF with real VFs; the real vfmap daemon
# creates them and binds them to vfio-pci; a real libvirtd (Debian's) runs the inner VM as a
# domain defined from examples/libvirt-domain.xml; vfmap registers it by name, reads its slots
# and channel from the live XML, and hot-plugs one VF per function through libvirt; the real
# agent in it binds three different drivers. Then wrong registrations, a detach, a kill -9 of
# the daemon mid-attach, a libvirtd restart, and the domain destroyed.
#
# Output: like scenario.sh ("VFMAP-STEP", "VFMAP-CHECK", "VFMAP-RESULT", the final table).
#   libvirt.sh REPO
set -Eeuo pipefail
REPO=$1
. "$REPO/scripts/vm/nested/lib.sh"
. "$REPO/scripts/vm/nested/libvirt-lib.sh"
trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap report_unfinished EXIT

# The guest's VFs (its devices but the virtio-serial controller, which libvirt put on bus 1).
guest_vfs() { guest_drivers | grep -v '=virtio-pci$' || :; }
wait_guest_vfs() { # wait_guest_vfs SECONDS BDF=DRIVER...
    local deadline=$((SECONDS + $1)); shift
    local want; want=$(printf '%s\n' "$@" | sort)
    while [ $SECONDS -lt $deadline ]; do
        [ "$(guest_vfs | sort)" = "$want" ] && return 0
        sleep 1
    done
    return 1
}
virsh_devices() { # the vfmap devices in the domain's live XML, named as vfmap names them
    local xml
    xml=$(virsh dumpxml "$DOMAIN") || return
    { grep -o "alias name='ua-vfmap-vf[0-9]*'" <<< "$xml" || :; } | sed "s/.*'ua-\(.*\)'/\1/" | sort | tr '\n' ' '
}
agree() { # agree CHECK: vfmap status, the live XML and the guest hold the same VFs
    local held plugged
    held=$(status_devices) || held="(vfmap status failed)"
    plugged=$(virsh_devices) || plugged="(virsh dumpxml failed)"
    [ "$held" = "$plugged" ] && check "$1" ok "[$held]" || check "$1" FAIL "status [$held] virsh dumpxml [$plugged]"
}

# The periodic check (which also notices stopped and undefined domains) every 2 s, not 30.
echo "reconcile_interval_ms = 2000" >> "$W/vfmap.toml"

step "starting vfmap serve on this kernel's /sys (creates the VFs, runs the card's bring_up hook on each, binds them to vfio-pci)"
start_daemon && check daemon-start ok "" || check daemon-start FAIL "see $W/daemon.log"
for vf in 0000:01:00.1 0000:01:00.2 0000:01:00.3; do
    d=$(host_driver $vf); [ "$d" = vfio-pci ] && check host-bound-$vf ok "$d" || check host-bound-$vf FAIL "driver '$d'"
done

step "starting libvirtd (Debian's libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon 2> /dev/null))"
libvirt_setup
start_libvirtd && check libvirtd ok "" || check libvirtd FAIL "$(tail -5 "$W/libvirtd.log")"
step "defining and starting the domain from examples/libvirt-domain.xml (TCG inside TCG: a few minutes)"
start_domain

step "vfmap vm add inner --libvirt inner (slots and channel from the live XML)"
if out=$(vfmap --json vm add inner --libvirt "$DOMAIN" 2> "$W/add.err") &&
    jq -e '.backend.libvirt.domain == "inner" and .slots == ["pci.2", "pci.3", "pci.4", "pci.5"]
        and .backend.libvirt.agent_socket == "'"$W/inner.agent"'"' <<< "$out" > /dev/null; then
    check vm-add ok "slots pci.2-pci.5 (pci.1 holds the virtio-serial controller), channel $W/inner.agent"
else
    check vm-add FAIL "$out $(cat "$W/add.err")"
fi
for spec in "4 nope --libvirt nope" "3 noport --libvirt $DOMAIN --port-name org.other.0" "3 busy --libvirt $DOMAIN --slot pci.1"; do
    set -- $spec
    want=$1 name=$2; shift 2
    rc=0; vfmap vm add "$name" "$@" > /dev/null 2> "$W/add.err" || rc=$?
    [ "$rc" = "$want" ] && check "vm-add-refused-$name" ok "$(cat "$W/add.err")" ||
        check "vm-add-refused-$name" FAIL "exit $rc: $(cat "$W/add.err")"
done
[ "$(vfmap --json vm list | jq -r '[.vms[].name] | join(" ")')" = inner ] &&
    check vm-add-refused-nothing ok "only inner registered" || check vm-add-refused-nothing FAIL "$(vfmap vm list)"

for f in storage crypto compress; do
    step "vfmap attach inner $f (virsh attach-device through libvirt)"
    if out=$(vfmap --json attach inner "$f" 2> "$W/attach.err") &&
        jq -e --arg f "$f" '.attached | length == 1 and .[0].function == $f and .[0].state == "ready"
            and .[0].bound_driver == .[0].guest_driver' <<< "$out" > /dev/null; then
        check attach-$f ok ""
    else
        check attach-$f FAIL "$out $(cat "$W/attach.err")"
    fi
done
if wait_guest_vfs 60 0000:02:00.0=nvme 0000:03:00.0=pci-stub 0000:04:00.0=uio_pci_generic; then
    check guest-drivers ok "$(guest_vfs | tr '\n' ' ')"
else
    check guest-drivers FAIL "$(guest_vfs | tr '\n' ' ')"
fi
agree attached-vs-virsh
xml=$(virsh dumpxml "$DOMAIN")
n=$(grep -c "<hostdev mode='subsystem' type='pci' managed='no'>" <<< "$xml" || :)
[ "$n" = 3 ] && check hostdevs-unmanaged ok "3 hostdevs managed='no'" || check hostdevs-unmanaged FAIL "$n"
virsh dumpxml --inactive "$DOMAIN" | grep -q "ua-vfmap" && check live-only FAIL "in the persistent definition" ||
    check live-only ok "not in the persistent definition"

step "vfmap detach inner 1 (crypto; virsh detach-device-alias, then the live XML re-read)"
vfmap detach inner 1 && check detach ok "" || check detach FAIL ""
if wait_guest_vfs 60 0000:02:00.0=nvme 0000:04:00.0=uio_pci_generic; then
    check detach-guest ok "gone from the guest"
else
    check detach-guest FAIL "$(guest_vfs | tr '\n' ' ')"
fi
virsh dumpxml "$DOMAIN" | grep -q "<source>" && : # (other hostdevs stay)
[ "$(virsh_devices)" = "$(status_devices)" ] && check detach-virsh ok "[$(virsh_devices)]" || check detach-virsh FAIL "[$(virsh_devices)]"
d=$(host_driver 0000:01:00.2); [ "$d" = vfio-pci ] && check detach-host ok "back on vfio-pci" || check detach-host FAIL "driver '$d'"
if inventory=$(vfmap --json inventory) &&
    jq -e 'any(.vfs[]; .location == "0000:01:00.2" and .vm == null and .state == null)' <<< "$inventory" > /dev/null; then
    check detach-pool ok "free"
else
    check detach-pool FAIL "not free: ${inventory:-vfmap inventory failed}"
fi
grep -q "VF reset vf=0000:01:00.2" "$W/daemon.log" && check detach-reset ok "reset through sysfs" || check detach-reset FAIL "no reset logged"

# kill -9 at each step an attach or a detach commits (VFMAP_FAILPOINT aborts right after the
# commit), then a restart: recovery completes or rolls back, and vfmap, the live XML and the
# guest agree, with nothing left in flight.
crypto_index() { vfmap --json status inner | jq -r '.correspondence[] | select(.function == "crypto") | .local_index'; }
for fp in host_bound plugged sent releasing; do
    [ $fp = releasing ] && what="a detach" || what="an attach"
    step "kill -9 of the daemon at '$fp' (in $what), then restart"
    kill -9 "$DAEMON" 2> /dev/null || check daemon-alive-$fp FAIL "the daemon had stopped by itself"
    wait "$DAEMON" 2> /dev/null || :
    if start_daemon VFMAP_FAILPOINT=$fp; then
        if [ $fp = releasing ]; then
            [ -n "$(crypto_index)" ] || vfmap attach inner crypto > /dev/null 2>&1 ||
                check failpoint-$fp FAIL "the attach before the detach failed"
            vfmap detach inner "$(crypto_index)" > /dev/null 2>&1 &&
                check failpoint-$fp FAIL "the detach completed: the daemon did not stop at $fp"
        else
            vfmap attach inner crypto > /dev/null 2>&1 &&
                check failpoint-$fp FAIL "the attach completed: the daemon did not stop at $fp"
        fi
        rc=0
        wait "$DAEMON" 2> /dev/null || rc=$?
        [ "$rc" != 0 ] && check failpoint-$fp ok "the daemon died at $fp (status $rc)" ||
            check failpoint-$fp FAIL "the daemon exited 0"
    else
        check failpoint-$fp FAIL "the daemon with the failpoint did not start"
        kill -9 "$DAEMON" 2> /dev/null || :
        wait "$DAEMON" 2> /dev/null || :
    fi
    start_daemon && check restart-$fp ok "" || check restart-$fp FAIL ""
    agree recovered-$fp-vs-virsh
    if status=$(vfmap --json status inner) && jq -e 'all(.correspondence[]; .state == "ready")' <<< "$status" > /dev/null; then
        check recovered-$fp-nothing-in-flight ok "$(jq -c '[.correspondence[] | .function]' <<< "$status")"
    else
        check recovered-$fp-nothing-in-flight FAIL "in-flight state left: ${status:-vfmap status failed}"
    fi
    # The guest holds what vfmap says: storage and compress, and crypto if recovery completed.
    want=(0000:02:00.0=nvme 0000:04:00.0=uio_pci_generic)
    [ -n "$(crypto_index)" ] && want+=(0000:03:00.0=pci-stub)
    if wait_guest_vfs 60 "${want[@]}"; then
        check recovered-$fp-vs-guest ok "$(guest_vfs | tr '\n' ' ')"
    else
        check recovered-$fp-vs-guest FAIL "$(guest_vfs | tr '\n' ' '), vfmap: ${want[*]}"
    fi
done
# Back to storage and compress only, for what follows.
[ -z "$(crypto_index)" ] || vfmap detach inner "$(crypto_index)" > /dev/null || check detach-crypto FAIL ""

step "restarting libvirtd while idle"
before=$(status_devices)
stop_libvirtd
start_libvirtd && check libvirtd-restart ok "" || check libvirtd-restart FAIL "$(tail -5 "$W/libvirtd.log")"
[ "$(status_devices)" = "$before" ] && check libvirtd-restart-status ok "[$before]" || check libvirtd-restart-status FAIL "[$(status_devices)] was [$before]"
agree libvirtd-restart-vs-virsh
if out=$(vfmap --json attach inner crypto 2> "$W/attach.err") && jq -e '.attached[0].state == "ready"' <<< "$out" > /dev/null; then
    check attach-after-libvirtd-restart ok ""
else
    check attach-after-libvirtd-restart FAIL "$out $(cat "$W/attach.err")"
fi
agree attach-after-restart-vs-virsh

step "final state"
echo "VFMAP-TABLE-BEGIN"
vfmap status inner || check final-status FAIL "vfmap status failed"
echo "guest's own view: $(guest_vfs | tr '\n' ' ')"
echo "VFMAP-TABLE-END"

step "virsh destroy inner: its VFs come back to the pool by themselves"
virsh destroy "$DOMAIN" > /dev/null && check destroy ok "" || check destroy FAIL ""
all_free() { vfmap --json inventory | jq -e 'all(.vfs[]; .vm == null)' > /dev/null 2>&1; }
for _ in $(seq 60); do all_free && break; sleep 1; done
all_free && check destroyed-pool ok "every VF free, without a command" ||
    check destroyed-pool FAIL "$(vfmap --json inventory | jq -c '[.vfs[] | {location, vm, state}]')"
for vf in 0000:01:00.1 0000:01:00.2 0000:01:00.3; do
    d=$(host_driver $vf); [ "$d" = vfio-pci ] || check destroyed-host-$vf FAIL "driver '$d'"
done
vfmap --json vm list | jq -e '.vms[0].name == "inner"' > /dev/null &&
    check destroyed-still-registered ok "" || check destroyed-still-registered FAIL "$(vfmap vm list)"

step "virsh start inner: the link comes back, and an attach works"
: > "$W/inner.console"
virsh start "$DOMAIN" > /dev/null && check restart-domain ok "" || check restart-domain FAIL ""
wait_agent_up
if out=$(vfmap --json attach inner compress 2> "$W/attach.err") && jq -e '.attached[0].state == "ready"' <<< "$out" > /dev/null; then
    check attach-after-domain-restart ok ""
else
    check attach-after-domain-restart FAIL "$out $(cat "$W/attach.err")"
fi
agree domain-restart-vs-virsh

step "virsh destroy + undefine inner: vfmap forgets it by itself"
virsh destroy "$DOMAIN" > /dev/null || :
virsh undefine "$DOMAIN" > /dev/null && check undefine ok "" || check undefine FAIL ""
forgotten() { vfmap --json vm list | jq -e '.vms == []' > /dev/null 2>&1; }
for _ in $(seq 60); do forgotten && break; sleep 1; done
forgotten && all_free && check undefined-forgotten ok "no VM, every VF free" ||
    check undefined-forgotten FAIL "$(vfmap vm list)"
stop_libvirtd
result
exit $failed
