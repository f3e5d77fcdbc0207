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
set -u
REPO=$1
W=/tmp/vfmap
mkdir -p "$W"
VFMAP=$REPO/target/x86_64-unknown-linux-gnu/release/vfmap
AGENT_INITRD=$REPO/.cache/vm/agent.cpio.gz
KVER=$(uname -r)
API=$W/api.sock
start_us=${EPOCHREALTIME/./}
failed=0

step() {
    local t=$((${EPOCHREALTIME/./} - start_us))
    printf 'VFMAP-STEP %d.%d %s\n' $((t / 1000000)) $((t / 100000 % 10)) "$*"
}
check() { # check NAME OK? DETAIL
    if [ "$2" = ok ]; then echo "VFMAP-CHECK $1 ok $3"; else echo "VFMAP-CHECK $1 FAIL $3"; failed=1; fi
}
vfmap() { "$VFMAP" --socket "$API" "$@"; }
# The guest's latest complete driver line (the console may be mid-line; lines end in \r).
guest_drivers() { grep -a "^VFMAP-DRIVERS" "$W/inner.console" | tail -2 | head -1 | tr -d '\r' | tr ' ' '\n' | grep -v '^0000:00:' | grep '='; }
wait_guest() { # wait_guest SECONDS BDF=DRIVER...: until the guest's devices are exactly these
    local deadline=$((SECONDS + $1)); shift
    local want; want=$(printf '%s\n' "$@" | sort)
    while [ $SECONDS -lt $deadline ]; do
        [ "$(guest_drivers | sort)" = "$want" ] && return 0
        sleep 1
    done
    return 1
}
host_driver() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)" 2>/dev/null; }
qmp_devices() { # the vfmap devices QEMU has, from query-pci
    printf '{"execute":"qmp_capabilities"}\n{"execute":"query-pci"}\n' |
        socat -t 5 - "UNIX-CONNECT:$W/inner.qmp" | grep -o '"qdev_id": *"vfmap-vf[0-9]*"' | grep -o 'vfmap-vf[0-9]*' | sort | tr '\n' ' '
}
status_devices() { # the devices the daemon says the VM holds, ready
    vfmap --json status inner | tr '{' '\n' | grep '"state":"ready"' | grep -o '"global_index":[0-9]*' |
        sed 's/"global_index":/vfmap-vf/' | sort | tr '\n' ' '
}
start_daemon() { "$VFMAP" serve --config "$W/vfmap.toml" 2>> "$W/daemon.log" & DAEMON=$!; for _ in $(seq 200); do [ -S "$API" ] && vfmap vm list > /dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

cat > "$W/profiles.toml" <<'TOML'
# QEMU's emulated NVMe PF (1b36:0010): its VFs report the PF's ID; the profile says what each does.
[[card]]
name = "qemu-nvme-sriov"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[[card.function]]
name = "storage"
description = "NVMe controller"
vfs = "0"
guest_driver = "nvme"
[[card.function]]
name = "crypto"
description = "stands in for a crypto engine"
vfs = "1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
description = "stands in for a compression engine"
vfs = "2"
guest_driver = "uio_pci_generic"
TOML
cat > "$W/vfmap.toml" <<TOML
profiles = ["$W/profiles.toml"]
state_dir = "$W/state"
socket = "$API"
agent_timeout_ms = 120000
qmp_timeout_ms = 60000
TOML

step "starting vfmap serve on this kernel's /sys (creates the VFs, binds them to vfio-pci)"
start_daemon || { check daemon-start FAIL "see $W/daemon.log"; }
vfmap inventory
for vf in 0000:01:00.1 0000:01:00.2 0000:01:00.3; do
    d=$(host_driver $vf); [ "$d" = vfio-pci ] && check host-bound-$vf ok "$d" || check host-bound-$vf FAIL "driver '$d'"
done

step "bringing the emulated VFs' NVMe secondary controllers online (card-specific, nvme-cli)"
for c in 1 2 3; do
    nvme virt-mgmt /dev/nvme0 -c $c -r 0 -a 8 -n 2 > /dev/null &&
        nvme virt-mgmt /dev/nvme0 -c $c -r 1 -a 8 -n 1 > /dev/null &&
        nvme virt-mgmt /dev/nvme0 -c $c -r 0 -a 9 -n 0 > /dev/null || check controller-$c FAIL "virt-mgmt"
done

step "starting the VM (4 empty root ports, QMP, virtio-serial channel, vfmap-agent inside)"
qemu-system-x86_64 -accel tcg -machine q35 -cpu max -m 256 -smp 1 -display none -no-reboot -monitor none \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$AGENT_INITRD" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 vfmap.mode=agent" \
    -qmp "unix:$W/inner.qmp,server=on,wait=off" \
    -device pcie-root-port,id=rp0,chassis=1,bus=pcie.0,addr=0x3.0,multifunction=on \
    -device pcie-root-port,id=rp1,chassis=2,bus=pcie.0,addr=0x3.1 \
    -device pcie-root-port,id=rp2,chassis=3,bus=pcie.0,addr=0x3.2 \
    -device pcie-root-port,id=rp3,chassis=4,bus=pcie.0,addr=0x3.3 \
    -device virtio-serial-pci -chardev "socket,id=vfmap,path=$W/inner.agent,server=on,wait=off" \
    -device virtserialport,chardev=vfmap,name=vfmap -serial "file:$W/inner.console" &
for _ in $(seq 600); do grep -qa "serving on" "$W/inner.console" 2>/dev/null && break; sleep 0.5; done
grep -qa "serving on" "$W/inner.console" && check agent-up ok "" || check agent-up FAIL "no agent in the VM"
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

step "vfmap detach inner 1 (crypto)"
vfmap detach inner 1 && check detach ok "" || check detach FAIL ""
if wait_guest 60 0000:01:00.0=nvme 0000:03:00.0=uio_pci_generic; then
    check detach-guest ok "gone from the guest"
else
    check detach-guest FAIL "$(guest_drivers | tr '\n' ' ')"
fi
d=$(host_driver 0000:01:00.2); [ "$d" = vfio-pci ] && check detach-host ok "back on vfio-pci, reset" || check detach-host FAIL "driver '$d'"
vfmap --json inventory | grep -q '"location":"0000:01:00.2"[^}]*"vm":null' && check detach-pool ok "free" || check detach-pool FAIL "not free"

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
