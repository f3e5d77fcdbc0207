# Shared by the nested scenario and the nested benchmark (sourced; runs in the outer guest,
# under chroot of this machine's root, so bash, jq, socat, nvme-cli and QEMU are this machine's).
# REPO must be set.
#
# A sourced library: it sets no shell options and no traps for its caller. The scripts that
# source it run under `set -Eeuo pipefail` with the traps described at report_unfinished;
# everything here works under those options.
. "$REPO/scripts/vm/common.sh"
# The working directory: VFMAP_NESTED_W when the outer guest runs several scenarios in one boot.
W=${VFMAP_NESTED_W:-/run/vfmap-nested}
export TMPDIR=$W
mkdir -p "$W"
# The vfmap binary (CLI and daemon): VFMAP_BIN if set (scripts/bench-nested --vfmap-at), else
# the working tree's static build; copied to the tmpfs at the start, since the working tree's
# build may be replaced during the run (a rebuild under the 9p share), which crashes a process
# running from it.
cp "${VFMAP_BIN:-$REPO/target/x86_64-unknown-linux-gnu/release/vfmap}" "$W/vfmap"
VFMAP=$W/vfmap
# The inner VMs' image: vfmap.agent_image= (the benchmarks' has the baseline binder too).
agent_image=$(sed -n 's/.*vfmap\.agent_image=\([a-z0-9.-]*\).*/\1/p' /proc/cmdline)
AGENT_INITRD=$REPO/.cache/vm/${agent_image:-agent.cpio.gz}
KVER=$(uname -r)
API=$W/api.sock
start_us=${EPOCHREALTIME/./}
failed=0
result=""
error_at=""

step() {
    local t=$((${EPOCHREALTIME/./} - start_us))
    printf 'VFMAP-STEP %d.%d %s\n' $((t / 1000000)) $((t / 100000 % 10)) "$*"
}
check() { # check NAME OK? DETAIL
    if [ "$2" = ok ]; then echo "VFMAP-CHECK $1 ok $3"; else echo "VFMAP-CHECK $1 FAIL $3"; failed=1; fi
}
# result: prints the VFMAP-RESULT line from the checks so far (with the logs' tails on failure).
result() {
    if [ "$failed" = 0 ]; then
        result=PASS
        echo "VFMAP-RESULT PASS"
    else
        result=FAIL
        echo "VFMAP-RESULT FAIL (logs: $W/daemon.log, $W/inner.console)"
        tail -30 "$W/daemon.log" 2> /dev/null || :
    fi
}
# For the scripts' traps, `trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR`
# and `trap report_unfinished EXIT`: a script that `set -e` stopped before its result says
# which command failed, and fails.
# Either way, what the script started in the background (daemon, QEMU, libvirtd) is stopped,
# so a scenario that runs next in the same guest starts clean.
report_unfinished() {
    local rc=$?
    stop_children
    [ -n "$result" ] && exit "$rc"
    check script FAIL "stopped (exit status $rc) at ${error_at:-an unknown command}"
    result
    exit $((rc ? rc : 1))
}
stop_children() {
    local jobs
    jobs=$(jobs -p)
    [ -z "$jobs" ] && return 0
    kill -9 $jobs 2> /dev/null || :
    wait $jobs 2> /dev/null || :
}
vfmap() { "$VFMAP" --socket "$API" "$@"; }

# guest_line TAG: the rest of the guest's latest complete "TAG ..." console line (the line
# being written may be cut short, so the one before it when there are two; lines end in \r).
guest_line() {
    [ -e "$W/inner.console" ] || return 0
    awk -v tag="$1" '{ sub(/\r$/, "") }
        substr($0, 1, length(tag)) == tag { n++; prev = last; last = substr($0, length(tag) + 1) }
        END { line = n > 1 ? prev : last; sub(/^ /, "", line); print line }' "$W/inner.console"
}
# guest_drivers: BDF=DRIVER per line for the guest's devices behind its root ports.
guest_drivers() {
    guest_line VFMAP-DRIVERS | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /=/ && $i !~ /^0000:00:/) print $i }'
}
wait_guest() { # wait_guest SECONDS BDF=DRIVER...: until the guest's devices are exactly these
    local deadline=$((SECONDS + $1)); shift
    local want; want=$(printf '%s\n' "$@" | sort)
    while [ $SECONDS -lt $deadline ]; do
        [ "$(guest_drivers | sort)" = "$want" ] && return 0
        sleep 1
    done
    return 1
}
host_driver() { # the host driver bound to BDF, or nothing
    local link
    link=$(readlink "/sys/bus/pci/devices/$1/driver" 2> /dev/null) || return 0
    echo "${link##*/}"
}
qmp_qdev_ids() { # every device id QEMU lists in query-pci, one per line
    local out
    out=$(printf '{"execute":"qmp_capabilities"}\n{"execute":"query-pci"}\n' |
        socat -t 5 - "UNIX-CONNECT:$W/inner.qmp") || return
    # QMP answers one JSON document per line: greeting, capabilities, then query-pci's list of
    # buses (devices behind bridges are nested in them).
    jq -r 'select(.return | type == "array") | .return | .. | objects | .qdev_id? // empty' <<< "$out"
}
qmp_devices() { # the vfmap devices QEMU has, from query-pci
    local ids
    ids=$(qmp_qdev_ids) || return
    { grep '^vfmap-vf[0-9]*$' <<< "$ids" || :; } | sort | tr '\n' ' '
}
status_devices() { # the devices the daemon says the VM holds, ready, named as QEMU names them
    local doc
    doc=$(vfmap --json status inner) || return
    jq -r '.correspondence[] | select(.state == "ready") | "vfmap-vf\(.global_index)"' <<< "$doc" | sort | tr '\n' ' '
}
# start_daemon [VAR=VALUE...]: `vfmap serve` in the background with these variables set (its pid
# in DAEMON); returns 0 once it answers, 1 if it does not within 60 s (its first start runs the
# card's bring_up hook on each VF first: about 15 nvme-cli calls, over half a second each here).
start_daemon() {
    env "$@" "$VFMAP" serve --config "$W/vfmap.toml" 2>> "$W/daemon.log" &
    DAEMON=$!
    for _ in $(seq 600); do
        [ -S "$API" ] && vfmap vm list > /dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

# The card's bring_up hook, examples/hooks/nvme-bring-up: the daemon's prepare runs it for each
# VF after creating the VFs and before binding them (docs/hooks.md). Copied from the repository
# (9p, owned by this machine's users) to the tmpfs like the vfmap binary, as a hook must be:
# owned by root, mode 0755, in directories only root writes (/run itself is sticky, like /tmp).
HOOKS=$W/hooks
chmod go-w "$W"
install -d -m 0755 "$HOOKS"
install -m 0755 "$REPO/examples/hooks/nvme-bring-up" "$HOOKS/nvme-bring-up"

cat > "$W/profiles.toml" <<TOML
# QEMU's emulated NVMe PF (1b36:0010): its VFs report the PF's ID; the profile says what each does.
[[card]]
name = "qemu-nvme-sriov"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[card.hooks]
bring_up = "$HOOKS/nvme-bring-up"   # brings each VF's NVMe secondary controller online
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


# Brings the emulated VFs' NVMe secondary controllers online by hand, with the hook the daemon's
# prepare runs (the profile above names it, so the scenarios here do not need this; for a
# caller whose daemon ran without it). Idempotent, as the hook is: a controller already online
# is left alone.
controllers_online() {
    local n
    for n in 0 1 2; do
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            VFMAP_PHASE=bring_up VFMAP_CARD=qemu-nvme-sriov VFMAP_PF=0000:01:00.0 \
            VFMAP_VF=0000:01:00.$((n + 1)) VFMAP_VF_NUMBER=$n VFMAP_SYSFS_ROOT=/sys \
            "$HOOKS/nvme-bring-up" bring_up 2>> "$W/controllers.log" ||
            check controller-$((n + 1)) FAIL "nvme-bring-up: $(tail -n 1 "$W/controllers.log")"
    done
}
# bring_ups VF: how many bring_up hook runs for VF the daemon's log shows done.
bring_ups() { grep -ac "hook done card=qemu-nvme-sriov phase=bring_up vf=$1 " "$W/daemon.log" || :; }

# launch_vm NAME INITRD [EXTRA_KERNEL_ARGS]: starts (in the background, without waiting) a VM
# with 4 empty root ports (VM_PORTS if set, up to 8), QMP, the channel and the agent from INITRD (the same pieces as
# scripts/vm/run-agent-vm, from common.sh). Its files are $W/NAME.qmp, $W/NAME.agent (the
# channel's socket) and $W/NAME.console.
launch_vm() {
    local name=$1 initrd=$2 devices=()
    vm_root_ports devices "${VM_PORTS:-4}"
    vm_agent_channel devices "$W/$name.agent"
    qemu-system-x86_64 -accel tcg -machine q35 -cpu max -m 256 -smp 1 -display none -no-reboot -monitor none \
        -kernel "/boot/vmlinuz-$KVER" -initrd "$initrd" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 vfmap.mode=agent ${3:-}" \
        -qmp "unix:$W/$name.qmp,server=on,wait=off" \
        "${devices[@]}" -serial "file:$W/$name.console" &
    echo $! > "$W/$name.pid"
}
# await_agent NAME CHECK [SECONDS]: waits (300 s unless told) until the agent in VM NAME serves
# its port; check CHECK ok or FAIL.
await_agent() {
    local deadline=$((SECONDS + ${3:-300}))
    until grep -qa "serving on" "$W/$1.console" 2> /dev/null || [ $SECONDS -ge $deadline ]; do sleep 0.5; done
    grep -qa "serving on" "$W/$1.console" 2> /dev/null && { check "$2" ok ""; return; }
    check "$2" FAIL "no agent in the VM $1 ($(kill -0 "$(cat "$W/$1.pid")" 2> /dev/null && echo "QEMU running" || echo "QEMU gone"))"
    tail -n 8 "$W/$1.console" 2> /dev/null | sed "s/^/$1 console: /" || :
    dmesg 2> /dev/null | grep -i "out of memory\|killed process\|oom" | tail -n 3 || :
}
# start_vm [EXTRA_KERNEL_ARGS]: the VM "inner" with the agent of $AGENT_INITRD; returns when the
# agent serves its port.
start_vm() {
    launch_vm inner "$AGENT_INITRD" "${1:-}"
    await_agent inner agent-up
}
