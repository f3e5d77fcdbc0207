#!/bin/bash
# The attach-path benchmark inside the nested set-up (outer guest, chroot of this machine's
# root). For ROUNDS rounds, on the same VF (crypto, 0000:01:00.2) and the same guest driver
# (pci-stub):
#   vfmap:    `vfmap attach` end to end, split into stages from the daemon's state log and the
#             agent's own timings, then `vfmap detach`;
#   baseline: the bare minimum by hand: a raw QMP device_add of the VF into root port rp3 and a
#             guest shell doing driver_override + drivers_probe, then device_del.
# Prints "VFMAP-BENCH ..." rows and a summary line.
#   bench.sh REPO [ROUNDS]
# -E: the ERR trap also sees a failure inside a function, to say where the script stopped.
set -Eeuo pipefail
REPO=$1
ROUNDS=${2:-5}
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
baseline_count() { awk '/^VFMAP-BASELINE-BOUND/ { n++ } END { print n + 0 }' "$W/inner.console"; }

step "starting the daemon, the VFs' controllers and the VM (with the baseline watcher on rp3)"
start_daemon || check daemon-start FAIL ""
controllers_online
start_vm "vfmap.baseline=1"
vfmap vm add inner --qmp "$W/inner.qmp" --agent "$W/inner.agent" --slot rp0 --slot rp1 --slot rp2 > /dev/null ||
    check vm-add FAIL "vfmap vm add failed"

echo "VFMAP-BENCH round tool total_ms reserve_ms host_bind_ms device_add_ms guest_sees_ms driver_bound_ms answer_ms"
for r in $(seq "$ROUNDS"); do
    step "round $r: vfmap"
    t0=$(now)
    vfmap attach inner crypto > /dev/null || check attach-$r FAIL ""
    t1=$(now)
    if reserved=$(log_time reserved) && bound=$(log_time host_bound) && plugged=$(log_time plugged) &&
        sent=$(log_time sent) && ready=$(log_time ready); then
        agent=$(last_line "$W/inner.console" "vfmap-agent: timing local_index=0 ")
        [ -n "$agent" ] || { echo "no agent timing; agent lines:"; grep -a "vfmap-agent" "$W/inner.console" | tail -4 || :; }
        seen=$(echo "$agent" | sed -n 's/.*device_ms=\([0-9]*\).*/\1/p')
        drv=$(echo "$agent" | sed -n 's/.*bind_ms=\([0-9]*\).*/\1/p')
        answer=$(( $(ms "$sent" "$ready") - ${seen:-0} - ${drv:-0} ))
        echo "VFMAP-BENCH $r vfmap $(ms "$t0" "$t1") $(ms "$t0" "$reserved") $(ms "$reserved" "$bound") $(ms "$bound" "$plugged") ${seen:--} ${drv:--} $answer"
    else
        check stages-$r FAIL "a state of the attach is missing from the daemon's log"
    fi
    vfmap detach inner 0 > /dev/null || check detach-$r FAIL ""

    step "round $r: baseline (raw QMP device_add + shell driver_override/drivers_probe)"
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
        check baseline-$r FAIL "the guest shell did not bind the device"
        grep -a "BASELINE\|timing\|VFMAP-DRIVERS" "$W/inner.console" | tail -5 || :
        break
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
done
result
