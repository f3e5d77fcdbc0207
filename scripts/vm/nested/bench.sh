#!/bin/bash
# The attach-path benchmark inside the nested set-up (outer guest, chroot of this machine's
# root). The bench's profile gives the card's three same-ID VFs (0000:01:00.1-3) one function,
# "bench", with one guest driver (pci-stub), so that one request can ask for all three
# (`--count 3` takes VFs of one function). ROUNDS rounds, each running these shapes once, in an
# order rotated by one every round:
#   vfmap-1:    `vfmap attach inner bench` end to end, split into stages from the daemon's state
#               log and the agent's own timings, then `vfmap detach`;
#   vfmap-3:    `vfmap attach inner bench --count 3`, one pipelined request, split the same way;
#   vfmap-3x1:  three one-VF `vfmap attach inner bench` requests, one after another (total only);
#   baseline-1: the bare minimum by hand: a raw QMP device_add of a VF into root port rp3 and
#               vfmap-baseline-bind in the guest doing driver_override + drivers_probe (no fork,
#               5 ms polls, a racing driver unbound), then device_del;
#   baseline-3: the same for the three VFs, into rp3, rp4 and rp5 (three device_adds on one QMP
#               session, one binder loop watching the three ports), until all three are bound.
# The inner VM has 6 root ports (vfmap's rp0-rp2, the baseline's rp3-rp5) and no periodic view
# loop in its console (vfmap.bench=1).
# With VFMAP_BENCH_AGENTS="LABEL=INITRD ..." (scripts/bench-nested --agents), agents are
# compared instead: one VM per agent, booted side by side and registered in the daemon under
# its LABEL, and each round does the vfmap attach + detach of one crypto VF once in every VM,
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
# The card's VFs (VF 0, 1, 2), and the function attached: "bench" (all three) by default,
# "crypto" (VF 1) when comparing agents.
VFS=(0000:01:00.1 0000:01:00.2 0000:01:00.3)
FUNCTION=bench

ms() { echo "$1 $2" | awk '{printf "%.0f", ($2 - $1) * 1000}'; }
now() { echo "${EPOCHREALTIME}"; }
last_line() { # last_line FILE A [B [C]]: FILE's last line holding every one of these strings
    awk -v a="$2" -v b="${3:-}" -v c="${4:-}" '
        index($0, a) && (b == "" || index($0, b)) && (c == "" || index($0, c)) { l = $0 }
        END { sub(/\r$/, "", l); print l }' "$1"
}
# Epoch seconds of the daemon's last log line for this state ("reserved" = reservation,
# "answered" = the agent's answer received); fails if there is none. Attaches run one at a
# time, so the last line is the current request's (all its VFs share each step's commit).
log_time() {
    local line
    case $1 in
        reserved) line=$(last_line "$W/daemon.log" "assignment reserved") ;;
        answered) line=$(last_line "$W/daemon.log" "agent answered") ;;
        *) line=$(last_line "$W/daemon.log" "assignment state" "state=\"$1\"") ;;
    esac
    [ -n "$line" ] && date -d "${line%% *}" +%s.%N
}
qmp() { # qmp JSON-COMMAND: one command on a fresh QMP connection; fails if QEMU answers an error
    local out
    out=$(printf '{"execute":"qmp_capabilities"}\n%s\n' "$1" | socat -t 3 - "UNIX-CONNECT:$W/inner.qmp") || return
    # No answer within socat's 3 s is not an error here: the command may still be running.
    jq -se 'all(.[]; has("error") | not)' <<< "$out" > /dev/null || { echo "QMP: $out" >&2; return 1; }
}
qmp_many() { # qmp_many JSON-COMMAND...: the commands in order on one QMP session; fails on an error
    local out
    out=$({ echo '{"execute":"qmp_capabilities"}'; printf '%s\n' "$@"; } | socat -t 3 - "UNIX-CONNECT:$W/inner.qmp") || return
    jq -se 'all(.[]; has("error") | not)' <<< "$out" > /dev/null || { echo "QMP: $out" >&2; return 1; }
}
# The agent's per-entry timings in VM $1's console, "device_ms=N bind_ms=M" one a line (found
# anywhere in a line: the guest's own console lines can cut into the agent's).
agent_timings() { grep -ao "device_ms=[0-9]* bind_ms=[0-9]*" "$W/$1.console" || :; }
timing_count() { agent_timings "$1" | wc -l; }
# The agent's per-apply timings (agents since issue 14 item 4), one a line:
# "entries=N seen_ms=A bound_ms=B applied_ms=C" (all from receiving the correspondence: the
# last device found, the last driver bound, the result published).
apply_timings() { grep -ao "timing apply entries=[0-9]* seen_ms=[0-9]* bound_ms=[0-9]* applied_ms=[0-9]*" "$W/$1.console" | sed 's/^timing apply //' || :; }
apply_count() { apply_timings "$1" | wc -l; }
field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<< "$2"; }
baseline_count() { awk '/^VFMAP-BASELINE-BOUND/ { n++ } END { print n + 0 }' "$W/inner.console"; }

# detach_all VM COUNT ROUND: detaches local indexes 0..COUNT-1, one after another.
detach_all() {
    local i
    for ((i = 0; i < $2; i++)); do
        vfmap detach "$1" "$i" > /dev/null || check "detach-$1-$3-$i" FAIL ""
    done
}

# vfmap_round ROUND VM TOOL [COUNT]: one `vfmap attach VM $FUNCTION --count COUNT` + detach, its
# VFMAP-BENCH row with TOOL in the tool column. The guest's stages come from VM's console: the
# first apply timing printed since the attach began (an older agent without it: the first
# per-entry timing). The answer is sent -> ready less the guest's work until the last driver
# was bound, split into the agent's publishing (bound -> published), the commit of ready
# (answer received -> ready) and the channel's two ways (the rest).
vfmap_round() {
    local r=$1 vm=$2 tool=$3 n=${4:-1} t0 t1 timings applies reserved bound plugged sent answered ready
    local apply agent seen drv work answer post="-" commit="-" channel="-"
    step "round $r: $tool ($vm)"
    timings=$(timing_count "$vm")
    applies=$(apply_count "$vm")
    t0=$(now)
    vfmap attach "$vm" "$FUNCTION" --count "$n" > /dev/null || check attach-$vm-$r-$tool FAIL ""
    t1=$(now)
    if reserved=$(log_time reserved) && bound=$(log_time host_bound) && plugged=$(log_time plugged) &&
        sent=$(log_time sent) && ready=$(log_time ready); then
        apply=$(apply_timings "$vm" | sed -n "$((applies + 1))p")
        if [ -n "$apply" ]; then
            seen=$(field seen_ms "$apply")
            work=$(field bound_ms "$apply")
            drv=$((work - seen))
            post=$(( $(field applied_ms "$apply") - work ))
        else
            # The first timing after the attach began: later ones are re-sent correspondences.
            agent=$(agent_timings "$vm" | sed -n "$((timings + 1))p")
            [ -n "$agent" ] || { echo "no new agent timing; agent lines:"; grep -a "vfmap-agent" "$W/$vm.console" | tail -4 || :; }
            seen=$(field device_ms "$agent")
            drv=$(field bind_ms "$agent")
            work=$(( ${seen:-0} + ${drv:-0} ))
        fi
        answer=$(( $(ms "$sent" "$ready") - work ))
        if answered=$(log_time answered) && [ "$(ms "$sent" "$answered")" -ge 0 ]; then
            commit=$(ms "$answered" "$ready")
            [ "$post" = - ] || channel=$((answer - post - commit))
        fi
        echo "VFMAP-BENCH $r $tool $(ms "$t0" "$t1") $(ms "$t0" "$reserved") $(ms "$reserved" "$bound") $(ms "$bound" "$plugged") ${seen:--} ${drv:--} $answer $channel $post $commit"
    else
        check stages-$vm-$r FAIL "a state of the attach is missing from the daemon's log"
    fi
    detach_all "$vm" "$n" "$r"
}

# vfmap_each_round ROUND: three one-VF attaches one after another (the total only), then detach.
vfmap_each_round() {
    local r=$1 t0 t1 i
    step "round $r: vfmap-3x1"
    t0=$(now)
    for i in 1 2 3; do
        vfmap attach inner "$FUNCTION" > /dev/null || check attach-inner-$r-3x1-$i FAIL ""
    done
    t1=$(now)
    echo "VFMAP-BENCH $r vfmap-3x1 $(ms "$t0" "$t1") - - - - - - - - -"
    detach_all inner 3 "$r"
}

# baseline_round ROUND N: raw QMP device_adds of the first N VFs into the VM "inner"'s rp3...,
# until the guest's binder bound them all, its row, then device_del of each; returns 1 when
# the guest did not bind them (the rounds stop).
baseline_round() {
    local r=$1 n=$2 before t0 t1 qmp_pid deadline ids i adds=() dels=() left
    step "round $r: baseline-$n (raw QMP device_add + driver_override/drivers_probe in the guest)"
    for ((i = 0; i < n; i++)); do
        adds+=("{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"vfio-pci\",\"host\":\"${VFS[i]}\",\"id\":\"base$r-$i\",\"bus\":\"rp$((3 + i))\",\"addr\":\"0\"}}")
        dels+=("{\"execute\":\"device_del\",\"arguments\":{\"id\":\"base$r-$i\"}}")
    done
    before=$(baseline_count)
    t0=$(now)
    qmp_many "${adds[@]}" &
    qmp_pid=$!
    deadline=$((SECONDS + 60))
    until [ "$(baseline_count)" -ge $((before + n)) ] || [ $SECONDS -ge $deadline ]; do sleep 0.02; done
    t1=$(now)
    # Only the QMP client: the daemon and the VM are background jobs too.
    wait "$qmp_pid" || check baseline-device_add-$r-$n FAIL "QEMU refused a device_add"
    if [ "$(baseline_count)" -lt $((before + n)) ]; then
        check baseline-$r-$n FAIL "the guest's binder did not bind the devices"
        grep -a "BASELINE\|timing" "$W/inner.console" | tail -5 || :
        return 1
    fi
    echo "VFMAP-BENCH $r baseline-$n $(ms "$t0" "$t1") - - - - - - - - -"
    # Unplug, then wait until QEMU no longer lists them (the guest takes seconds to release a
    # slot; QEMU ends a QMP session whose client half-closes, so poll instead of awaiting the
    # event).
    qmp_many "${dels[@]}" || check unplug-$r-$n FAIL "QEMU refused a device_del"
    deadline=$((SECONDS + 60))
    while true; do
        if ids=$(qmp_qdev_ids); then
            left=$(grep -c "^base$r-" <<< "$ids" || :)
            [ "$left" = 0 ] && break
        fi
        if [ $SECONDS -ge $deadline ]; then check unplug-$r-$n FAIL "base$r-* still plugged"; break; fi
        sleep 0.5
    done
}

# cli_round ROUND: what the reserve stage's CLI costs here, apart from the daemon's reservation:
# the median of 5 runs each of `vfmap --version` (start a process of the binary, parse the
# arguments) and `vfmap status inner` (that, plus a connection, an HTTP request and a read of
# the state), one VFMAP-CLI row.
cli_round() {
    local r=$1 i t0 version=() status=()
    for i in 1 2 3 4 5; do
        t0=$(now); "$VFMAP" --version > /dev/null; version+=("$(ms "$t0" "$(now)")")
        t0=$(now); vfmap status inner > /dev/null; status+=("$(ms "$t0" "$(now)")")
    done
    echo "VFMAP-CLI $r $(printf '%s\n' "${version[@]}" | sort -n | sed -n 3p) $(printf '%s\n' "${status[@]}" | sort -n | sed -n 3p)"
}

header() { echo "VFMAP-BENCH round tool total_ms reserve_ms host_bind_ms device_add_ms guest_sees_ms driver_bound_ms answer_ms channel_ms agent_publish_ms commit_ms"; }

# bench_baseline: the default benchmark, vfmap's shapes against the bare baseline in one VM.
bench_baseline() {
    local r i shapes=(vfmap-1 vfmap-3 vfmap-3x1 baseline-1 baseline-3)
    cat > "$W/profiles.toml" <<TOML
# QEMU's emulated NVMe PF (1b36:0010): for the benchmark, its three same-ID VFs do one job, so
# that one request can take all three. The VFs' controllers come online by the bring_up hook.
[[card]]
name = "qemu-nvme-sriov"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[card.hooks]
bring_up = "$HOOKS/nvme-bring-up"
[[card.function]]
name = "bench"
description = "the benchmark's VFs"
vfs = "0-2"
guest_driver = "pci-stub"
TOML
    step "starting the daemon (the VFs' controllers by its bring_up hook) and the VM (baseline watcher on rp3-rp5)"
    start_daemon || check daemon-start FAIL ""
    VM_PORTS=6 start_vm "vfmap.baseline=1 vfmap.baseline_port=0000:00:03.3,0000:00:03.4,0000:00:03.5 vfmap.bench=1"
    vfmap vm add inner --qmp "$W/inner.qmp" --agent "$W/inner.agent" --slot rp0 --slot rp1 --slot rp2 > /dev/null ||
        check vm-add FAIL "vfmap vm add failed"
    header
    # Warm-up (round w): the first attach after boot includes the channel's first
    # correspondence and the guest's first pci-stub probe.
    vfmap_round w inner vfmap-1 1
    echo "VFMAP-CLI round version_ms status_ms"
    for r in $(seq "$ROUNDS"); do
        cli_round "$r"
        for ((i = 0; i < ${#shapes[@]}; i++)); do
            case ${shapes[(i + r - 1) % ${#shapes[@]}]} in
                vfmap-1) vfmap_round "$r" inner vfmap-1 1 ;;
                vfmap-3) vfmap_round "$r" inner vfmap-3 3 ;;
                vfmap-3x1) vfmap_each_round "$r" ;;
                baseline-1) baseline_round "$r" 1 || break 2 ;;
                baseline-3) baseline_round "$r" 3 || break 2 ;;
            esac
        done
    done
}

# bench_agents: one VM per agent of $AGENTS, booted side by side; a warm-up attach in each
# (round "w": the first one after boot includes the channel's first correspondence), then each
# round attaches in every VM, in the listed order on odd rounds and the reverse on even ones.
bench_agents() {
    local spec vm r i names=()
    step "starting the daemon (the VFs' controllers by its bring_up hook) and one VM per agent ($AGENTS)"
    start_daemon || check daemon-start FAIL ""
    for spec in $AGENTS; do
        names+=("${spec%%=*}")
        launch_vm "${spec%%=*}" "${spec#*=}" vfmap.bench=1
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

if [ -n "$AGENTS" ]; then
    FUNCTION=crypto
    bench_agents
else
    bench_baseline
fi
result
