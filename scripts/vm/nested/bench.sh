#!/bin/bash
# The attach-path benchmark inside the nested set-up (outer guest, chroot of this machine's
# root). For ROUNDS rounds, on the same VF (crypto, 0000:01:00.2) and the same guest driver
# (pci-stub):
#   vfmap:    `vfmap attach` end to end, split into stages from the daemon's state log and the
#             agent's own timings, then `vfmap detach`;
#   baseline: the bare minimum by hand: a raw QMP device_add of the VF into root port rp3 and
#             vfmap-baseline-bind in the guest doing driver_override + drivers_probe (no fork,
#             5 ms polls, a racing driver unbound), then device_del.
# With VFMAP_BENCH_AGENTS="LABEL=INITRD ..." (scripts/bench-nested --agents), agents are
# compared instead: one VM per agent, booted side by side and registered in the daemon under
# its LABEL, and each round does the vfmap attach + detach once in every VM, on the same VF,
# in alternating order (no baseline then). The tool column is then the LABEL.
# Prints "VFMAP-BENCH ..." rows and a summary line.
#   bench.sh REPO [ROUNDS]
# -E: the ERR trap also sees a failure inside a function, to say where the script stopped.
set -Eeuo pipefail
REPO=$1
ROUNDS=${2:-5}
AGENTS=${VFMAP_BENCH_AGENTS:-}
. "$REPO/scripts/vm/nested/lib.sh"
trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap report_unfinished EXIT
VF=0000:01:00.2

ms() { echo "$1 $2" | awk '{printf "%.0f", ($2 - $1) * 1000}'; }
now() { echo "${EPOCHREALTIME}"; }
last_line() { # last_line FILE A [B [C]]: FILE's last line holding every one of these strings
    awk -v a="$2" -v b="${3:-}" -v c="${4:-}" '
        index($0, a) && (b == "" || index($0, b)) && (c == "" || index($0, c)) { l = $0 }
        END { sub(/\r$/, "", l); print l }' "$1"
}
# Epoch seconds of the last daemon log line for the VF with this state ("reserved" = reservation);
# fails if there is none.
log_time() {
    local line
    if [ "$1" = reserved ]; then
        line=$(last_line "$W/daemon.log" "assignment reserved" "vf=$VF")
    else
        line=$(last_line "$W/daemon.log" "assignment state" "vf=$VF" "state=\"$1\"")
    fi
    [ -n "$line" ] && date -d "${line%% *}" +%s.%N
}
qmp() { # qmp JSON-COMMAND: one command on a fresh QMP connection; fails if QEMU answers an error
    local out
    out=$(printf '{"execute":"qmp_capabilities"}\n%s\n' "$1" | socat -t 3 - "UNIX-CONNECT:$W/inner.qmp") || return
    # No answer within socat's 3 s is not an error here: the command may still be running.
    jq -se 'all(.[]; has("error") | not)' <<< "$out" > /dev/null || { echo "QMP: $out" >&2; return 1; }
}
# The agent's timings in VM $1's console, "device_ms=N bind_ms=M" one a line (found anywhere
# in a line: the guest's own console lines can cut into the agent's).
agent_timings() { grep -ao "device_ms=[0-9]* bind_ms=[0-9]*" "$W/$1.console" || :; }
timing_count() { agent_timings "$1" | wc -l; }
baseline_count() { awk '/^VFMAP-BASELINE-BOUND/ { n++ } END { print n + 0 }' "$W/inner.console"; }

# vfmap_round ROUND VM TOOL: one `vfmap attach VM crypto` + detach, its VFMAP-BENCH row with
# TOOL in the tool column; the guest's stages from VM's console (the first agent timing
# printed since the attach began).
vfmap_round() {
    local r=$1 vm=$2 tool=$3 t0 t1 timings reserved bound plugged sent ready agent seen drv answer
    step "round $r: vfmap ($vm)"
    timings=$(timing_count "$vm")
    t0=$(now)
    vfmap attach "$vm" crypto > /dev/null || check attach-$vm-$r FAIL ""
    t1=$(now)
    if reserved=$(log_time reserved) && bound=$(log_time host_bound) && plugged=$(log_time plugged) &&
        sent=$(log_time sent) && ready=$(log_time ready); then
        # The first timing after the attach began: later ones are re-sent correspondences.
        agent=$(agent_timings "$vm" | sed -n "$((timings + 1))p")
        [ -n "$agent" ] || { echo "no new agent timing; agent lines:"; grep -a "vfmap-agent" "$W/$vm.console" | tail -4 || :; }
        seen=$(echo "$agent" | sed -n 's/.*device_ms=\([0-9]*\).*/\1/p')
        drv=$(echo "$agent" | sed -n 's/.*bind_ms=\([0-9]*\).*/\1/p')
        answer=$(( $(ms "$sent" "$ready") - ${seen:-0} - ${drv:-0} ))
        echo "VFMAP-BENCH $r $tool $(ms "$t0" "$t1") $(ms "$t0" "$reserved") $(ms "$reserved" "$bound") $(ms "$bound" "$plugged") ${seen:--} ${drv:--} $answer"
    else
        check stages-$vm-$r FAIL "a state of the attach is missing from the daemon's log"
    fi
    vfmap detach "$vm" 0 > /dev/null || check detach-$vm-$r FAIL ""
}

# baseline_round ROUND: the raw QMP device_add into the VM "inner"'s rp3, the guest binder's
# bind, its row, then device_del; returns 1 when the guest did not bind (the rounds stop).
baseline_round() {
    local r=$1 before t0 t1 qmp_pid deadline ids
    step "round $r: baseline (raw QMP device_add + driver_override/drivers_probe in the guest)"
    before=$(baseline_count)
    t0=$(now)
    qmp "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"vfio-pci\",\"host\":\"$VF\",\"id\":\"base$r\",\"bus\":\"rp3\",\"addr\":\"0\"}}" &
    qmp_pid=$!
    deadline=$((SECONDS + 60))
    until [ "$(baseline_count)" -gt "$before" ] || [ $SECONDS -ge $deadline ]; do sleep 0.02; done
    t1=$(now)
    # Only the QMP client: the daemon and the VM are background jobs too.
    wait "$qmp_pid" || check baseline-device_add-$r FAIL "QEMU refused the device_add"
    if [ "$(baseline_count)" -le "$before" ]; then
        check baseline-$r FAIL "the guest's binder did not bind the device"
        grep -a "BASELINE\|timing\|VFMAP-DRIVERS" "$W/inner.console" | tail -5 || :
        return 1
    fi
    echo "VFMAP-BENCH $r baseline $(ms "$t0" "$t1") - - - - - -"
    # Unplug, then wait until QEMU no longer lists it (the guest takes seconds to release the
    # slot; QEMU ends a QMP session whose client half-closes, so poll instead of awaiting the event).
    qmp "{\"execute\":\"device_del\",\"arguments\":{\"id\":\"base$r\"}}" || check unplug-$r FAIL "QEMU refused the device_del"
    deadline=$((SECONDS + 60))
    while ! ids=$(qmp_qdev_ids) || grep -qx "base$r" <<< "$ids"; do
        if [ $SECONDS -ge $deadline ]; then check unplug-$r FAIL "base$r still plugged"; break; fi
        sleep 0.5
    done
}

header() { echo "VFMAP-BENCH round tool total_ms reserve_ms host_bind_ms device_add_ms guest_sees_ms driver_bound_ms answer_ms"; }

# bench_baseline: the default benchmark, vfmap against the bare baseline in one VM.
bench_baseline() {
    local r
    step "starting the daemon, the VFs' controllers and the VM (with the baseline watcher on rp3)"
    start_daemon || check daemon-start FAIL ""
    controllers_online
    start_vm "vfmap.baseline=1"
    vfmap vm add inner --qmp "$W/inner.qmp" --agent "$W/inner.agent" --slot rp0 --slot rp1 --slot rp2 > /dev/null ||
        check vm-add FAIL "vfmap vm add failed"
    header
    for r in $(seq "$ROUNDS"); do
        vfmap_round "$r" inner vfmap
        baseline_round "$r" || break
    done
}

# bench_agents: one VM per agent of $AGENTS, booted side by side; a warm-up attach in each
# (round "w": the first one after boot includes the channel's first correspondence), then each
# round attaches in every VM, in the listed order on odd rounds and the reverse on even ones.
bench_agents() {
    local spec vm r i names=()
    step "starting the daemon, the VFs' controllers and one VM per agent ($AGENTS)"
    start_daemon || check daemon-start FAIL ""
    controllers_online
    for spec in $AGENTS; do
        names+=("${spec%%=*}")
        launch_vm "${spec%%=*}" "${spec#*=}"
    done
    for vm in "${names[@]}"; do
        await_agent "$vm" "agent-up-$vm" 900
        vfmap vm add "$vm" --qmp "$W/$vm.qmp" --agent "$W/$vm.agent" --slot rp0 --slot rp1 --slot rp2 > /dev/null ||
            check "vm-add-$vm" FAIL "vfmap vm add failed"
    done
    header
    for vm in "${names[@]}"; do vfmap_round w "$vm" "$vm"; done
    for r in $(seq "$ROUNDS"); do
        if [ $((r % 2)) = 1 ]; then
            for vm in "${names[@]}"; do vfmap_round "$r" "$vm" "$vm"; done
        else
            for ((i = ${#names[@]} - 1; i >= 0; i--)); do vfmap_round "$r" "${names[i]}" "${names[i]}"; done
        fi
    done
}

if [ -n "$AGENTS" ]; then bench_agents; else bench_baseline; fi
result
