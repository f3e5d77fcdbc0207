# Shared by the nested scenario and the nested benchmark (sourced; runs in the outer guest,
# under chroot of this machine's root). REPO must be set.
set -u
W=/run/vfmap-nested
export TMPDIR=$W
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


# Brings the emulated VFs' NVMe secondary controllers online (card-specific bring-up).
controllers_online() {
    for c in 1 2 3; do
        nvme virt-mgmt /dev/nvme0 -c $c -r 0 -a 8 -n 2 > /dev/null &&
            nvme virt-mgmt /dev/nvme0 -c $c -r 1 -a 8 -n 1 > /dev/null &&
            nvme virt-mgmt /dev/nvme0 -c $c -r 0 -a 9 -n 0 > /dev/null || check controller-$c FAIL "virt-mgmt"
    done
}

# start_vm [EXTRA_KERNEL_ARGS]: the VM with 4 empty root ports, QMP, the channel and the agent;
# returns when the agent serves its port.
start_vm() {
    qemu-system-x86_64 -accel tcg -machine q35 -cpu max -m 256 -smp 1 -display none -no-reboot -monitor none \
        -kernel "/boot/vmlinuz-$KVER" -initrd "$AGENT_INITRD" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 vfmap.mode=agent ${1:-}" \
        -qmp "unix:$W/inner.qmp,server=on,wait=off" \
        -device pcie-root-port,id=rp0,chassis=1,bus=pcie.0,addr=0x3.0,multifunction=on \
        -device pcie-root-port,id=rp1,chassis=2,bus=pcie.0,addr=0x3.1 \
        -device pcie-root-port,id=rp2,chassis=3,bus=pcie.0,addr=0x3.2 \
        -device pcie-root-port,id=rp3,chassis=4,bus=pcie.0,addr=0x3.3 \
        -device virtio-serial-pci -chardev "socket,id=vfmap,path=$W/inner.agent,server=on,wait=off" \
        -device virtserialport,chardev=vfmap,name=vfmap -serial "file:$W/inner.console" &
    for _ in $(seq 600); do grep -qa "serving on" "$W/inner.console" 2>/dev/null && break; sleep 0.5; done
    grep -qa "serving on" "$W/inner.console" && check agent-up ok "" || check agent-up FAIL "no agent in the VM"
}
