#!/bin/bash
# Issue 12's scenario with the real kubelet and the real daemon, inside the nested rig's
# host-role guest (a real kernel owning the emulated SR-IOV NVMe PF behind an intel-iommu),
# under chroot of this machine's root (read-only 9p). Run by scripts/k8s/run-nested (the
# outer guest's mode nested-k8s, scripts/k8s/guest-nested-k8s.sh).
#
# `vfmap serve` (the static build, as in the other nested scenarios: scripts/vm/nested/lib.sh,
# its profiles: storage, crypto, compress, one VF each) runs with a [kubernetes] section; the
# real kubelet (scripts/k8s/start-kubelet: standalone, static pods, Debian's containerd and
# runc) registers its device plugin. Then: capacity per function in the kubelet's device
# checkpoint; a static pod asking for vfmap.io/crypto and vfmap.io/compress runs and its
# container prints the env and /dev/vfio it sees; vfmap's inventory and `vfmap status` show the
# two VFs held by that pod; a second pod asking for a compress VF is refused by the kubelet's
# admission; `vfmap attach` of crypto or compress to a registered VM is refused (no free VF);
# a daemon kill -9 and restart, and a kubelet restart, keep the allocation (past the release
# grace period); removing the pod's manifest gives both VFs back (reset, vfio-pci, free).
#
# Output: VFMAP-STEP, VFMAP-CHECK <name> ok|FAIL <detail>, VFMAP-RESULT PASS|FAIL.
#   nested-kubelet.sh REPO [IGNORED]
set -Eeuo pipefail
REPO=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The kubelet build's cache, as the machine outside named it (vfmap.k8s_cache= from
# scripts/k8s/run-nested): HOME is not the machine's in here.
cache=$(sed -n 's/.*vfmap\.k8s_cache=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$cache" ] && export VFMAP_K8S_CACHE=$cache
export K8S_STATE=/run/vfmap-k8s HOME=/run
# The chroot is read-only: the kubelet, containerd and the pods write under these.
for d in /var/lib /var/log /tmp; do mount -t tmpfs tmpfs "$d"; done
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
. "$REPO/scripts/vm/nested/lib.sh"
trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
stop_all() {
    local rc=$?
    "$REPO/scripts/k8s/stop-kubelet" --quiet > /dev/null 2>&1 || :
    (exit "$rc")
    report_unfinished
}
trap stop_all EXIT

GRACE_MS=15000
cat >> "$W/vfmap.toml" <<TOML
[kubernetes]
reconcile_interval_ms = 2000
release_grace_ms = $GRACE_MS
TOML
CRYPTO=0000:01:00.2 COMPRESS=0000:01:00.3
CKPT=/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
KLOG=$K8S_STATE/kubelet.log
POD=vf-pod-vfmap-node # a static pod's name ends with the node's

# wait_until SECONDS COMMAND...: until COMMAND succeeds; 1 if it never did.
wait_until() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 1
    done
}
count() { local n; n=$(grep -c "$1" "$2" 2> /dev/null) || :; echo "${n:-0}"; } # count PATTERN FILE
registrations() { count 'Got registration request from device plugin' "$KLOG"; }
registered_since() { [ "$(registrations)" -ge $(($1 + 3)) ]; } # three resources registered again
capacity() { jq -c '.Data.RegisteredDevices | map_values(length)' "$CKPT" 2> /dev/null || :; }
capacity_is() { [ "$(capacity)" = "$1" ]; }
group_of() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }
# holder LOCATION: "free", "vm <name>", "kubelet <state> <namespace>/<pod>/<container>|none".
holder() {
    vfmap --json inventory | jq -r --arg l "$1" '.vfs[] | select(.location == $l) |
        if .kubelet != null then "kubelet \(.kubelet.state) \(.kubelet.owner // {} | if .pod then "\(.namespace)/\(.pod)/\(.container)" else "none" end)"
        elif .vm != null then "vm \(.vm)" else "free" end'
}
pod_held() { [ "$(holder $CRYPTO)" = "kubelet held default/$POD/app" ] && [ "$(holder $COMPRESS)" = "kubelet held default/$POD/app" ]; }
both_free() { [ "$(holder $CRYPTO)" = free ] && [ "$(holder $COMPRESS)" = free ]; }
# The pod's containers running in containerd (the sandbox and app), and the app's restarts.
running_tasks() { ctr --address "$K8S_STATE/containerd.sock" -n k8s.io tasks ls 2> /dev/null | awk 'NR > 1 && $3 == "RUNNING"' | wc -l; }
app_logs() { ls /var/log/pods/default_${POD}_*/app/ 2> /dev/null | tr '\n' ' '; }
releases() { count 'released by the kubelet' "$W/daemon.log"; }
# kept WHAT RELEASES_BEFORE: the pod still holds both VFs, past the grace period, its container
# never restarted, and the daemon released no VF since RELEASES_BEFORE (a VF released and then
# adopted back would look held again).
kept() {
    local what=$1 before=$2
    if wait_until 120 pod_held; then
        sleep $((GRACE_MS / 1000 + 5))
        if pod_held && [ "$(app_logs)" = "0.log " ] && [ "$(releases)" = "$before" ]; then
            check "$what" ok "both VFs still held by default/$POD/app $((GRACE_MS / 1000 + 5)) s later; container logs: $(app_logs); running tasks: $(running_tasks)"
        else
            check "$what" FAIL "crypto: $(holder $CRYPTO); compress: $(holder $COMPRESS); container logs: $(app_logs); releases since: $(($(releases) - before))"
        fi
    else
        check "$what" FAIL "crypto: $(holder $CRYPTO); compress: $(holder $COMPRESS)"
    fi
}

step "kernel $(uname -r); cgroup $(stat -fc %T /sys/fs/cgroup)"
step "starting vfmap serve with [kubernetes] (creates the VFs, binds them to vfio-pci)"
start_daemon && check daemon-start ok "" || check daemon-start FAIL "see $W/daemon.log"
controllers_online
for vf in 0000:01:00.1 $CRYPTO $COMPRESS; do
    d=$(host_driver $vf)
    [ "$d" = vfio-pci ] && check host-bound-$vf ok "group $(group_of $vf)" || check host-bound-$vf FAIL "driver '$d'"
done

step "starting containerd and the kubelet"
t0=$SECONDS
if "$REPO/scripts/k8s/start-kubelet" --fresh; then
    check kubelet-start ok "containerd and kubelet up in $((SECONDS - t0)) s"
else
    check kubelet-start FAIL "start-kubelet failed"
fi

want='{"vfmap.io/compress":1,"vfmap.io/crypto":1,"vfmap.io/storage":1}'
t0=$SECONDS
if wait_until 120 capacity_is "$want"; then
    check registered ok "$(registrations) registrations in $((SECONDS - t0)) s; the kubelet's devices: $(jq -c .Data.RegisteredDevices $CKPT)"
else
    check registered FAIL "registrations $(registrations); checkpoint: $(capacity)"
    grep -E 'device plugin|vfmap' "$KLOG" | tail -10 || :
fi

step "a static pod asking for vfmap.io/crypto: 1 and vfmap.io/compress: 1"
cat > "$K8S_STATE/manifests/vf-pod.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: vf-pod, namespace: default}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 5
  containers:
  - name: app
    image: vfmap.local/busybox:1
    imagePullPolicy: Never
    resources:
      limits: {vfmap.io/crypto: 1, vfmap.io/compress: 1}
    command: ["/bin/sh", "-c", "echo VFMAP-K8S-VF env $(env | grep -E '^(PCI_RESOURCE|VFMAP_)' | sort | tr '\\n' ' ') dev $(ls /dev/vfio | tr '\\n' ' '); trap 'exit 0' TERM; sleep 3600 & wait"]
YAML
t0=$SECONDS
line=""
pod_line() { line=$(cat /var/log/pods/default_${POD}_*/app/0.log 2> /dev/null | grep -m1 VFMAP-K8S-VF || :); [ -n "$line" ]; }
wait_until 240 pod_line || :
line=${line#*VFMAP-K8S-VF }
want_dev=$(printf '%s\n' vfio "$(group_of $CRYPTO)" "$(group_of $COMPRESS)" | sort | tr '\n' ' ')
got_dev=$(sed -n 's/.* dev \(.*\)$/\1/p' <<< "$line" | tr ' ' '\n' | grep . | sort | tr '\n' ' ' || :)
if grep -q "PCI_RESOURCE_VFMAP_IO_CRYPTO=$CRYPTO " <<< "$line" && grep -q "PCI_RESOURCE_VFMAP_IO_COMPRESS=$COMPRESS " <<< "$line" &&
    grep -q "VFMAP_FUNCTION_CRYPTO=$CRYPTO " <<< "$line" && grep -q "VFMAP_FUNCTION_COMPRESS=$COMPRESS " <<< "$line" &&
    [ "$got_dev" = "$want_dev" ]; then
    check vf-pod ok "in $((SECONDS - t0)) s the container saw: $line"
else
    check vf-pod FAIL "container line: '$line' (want /dev/vfio: $want_dev)"
    grep -E '^E' "$KLOG" | tail -10 || :
    tail -20 "$W/daemon.log" || :
fi

# The daemon's own records: held for the kubelet, and the container named once PodResources
# lists it.
if wait_until 60 pod_held; then
    check inventory-held ok "crypto $CRYPTO: $(holder $CRYPTO); compress $COMPRESS: $(holder $COMPRESS)"
else
    check inventory-held FAIL "crypto: $(holder $CRYPTO); compress: $(holder $COMPRESS)"
fi
status=$(vfmap status 2>&1 || :)
if [ "$(grep -c "pod default/$POD/app" <<< "$status")" = 2 ] && grep -q "$CRYPTO.*pod default/$POD/app" <<< "$status" &&
    grep -q "$COMPRESS.*pod default/$POD/app" <<< "$status"; then
    check status-pod ok "$(grep "pod default/$POD/app" <<< "$status" | tr -s ' ' | tr '\n' ';')"
else
    check status-pod FAIL "$status"
fi

step "a second pod asking for a compress VF (none is free)"
sed -e 's/name: vf-pod/name: greedy/' -e 's/vfmap.io\/crypto: 1, //' "$K8S_STATE/manifests/vf-pod.yaml" > "$K8S_STATE/manifests/greedy.yaml"
# Only this pod asks for a device that is not there.
refused() { grep -q 'vfmap.io/compress. Requested: 1, Available: 0' "$KLOG"; }
if wait_until 90 refused; then
    check admission ok "$(grep -m1 -o 'requested number of devices unavailable for vfmap.io/compress[^"\\]*' "$KLOG" | head -1)"
else
    check admission FAIL "no admission refusal in the kubelet's log: $(grep -i greedy "$KLOG" | tail -3)"
fi
rm -f "$K8S_STATE/manifests/greedy.yaml"
[ "$(holder $COMPRESS)" = "kubelet held default/$POD/app" ] && check admission-kept ok "compress still the pod's" ||
    check admission-kept FAIL "compress: $(holder $COMPRESS)"

step "vfmap attach of the pod's functions to a registered VM"
# Registering a QMP VM asks QEMU nothing; the pool refuses the attach before any QMP call.
vfmap vm add probe --qmp "$W/probe.qmp" --agent "$W/probe.agent" --slot rp0 --slot rp1 && check vm-add ok "" ||
    check vm-add FAIL "vfmap vm add failed"
for f in crypto compress; do
    if out=$(vfmap attach probe $f 2>&1); then
        check attach-refused-$f FAIL "the VM got a $f VF: $out"
    elif grep -q "no_free_vf\|requested, 0 free" <<< "$out"; then
        check attach-refused-$f ok "$(tr '\n' ' ' <<< "$out" | cut -c1-200)"
    else
        check attach-refused-$f FAIL "refused, but not for lack of a free VF: $out"
    fi
done
pod_held && check attach-pool ok "both still the pod's; the VM holds $(vfmap --json status probe | jq '.correspondence | length')" ||
    check attach-pool FAIL "crypto: $(holder $CRYPTO); compress: $(holder $COMPRESS)"
vfmap vm rm probe > /dev/null 2>&1 || :

step "kill -9 of the daemon, then restart"
before=$(registrations) released=$(releases)
kill -9 "$DAEMON" || check daemon-alive FAIL "the daemon had stopped by itself"
wait "$DAEMON" 2> /dev/null || :
start_daemon && check daemon-restart ok "" || check daemon-restart FAIL "see $W/daemon.log"
if wait_until 120 registered_since "$before"; then
    check daemon-reregistered ok "$(($(registrations) - before)) new registrations"
else
    check daemon-reregistered FAIL "$(($(registrations) - before)) new registrations"
fi
kept daemon-restart-kept "$released"

step "kubelet restart (the pods keep running)"
before=$(registrations) released=$(releases)
"$REPO/scripts/k8s/stop-kubelet" --kubelet-only
t0=$SECONDS
"$REPO/scripts/k8s/start-kubelet" && check kubelet-restart ok "up again in $((SECONDS - t0)) s" ||
    check kubelet-restart FAIL "start-kubelet failed"
if wait_until 120 registered_since "$before"; then
    check kubelet-reregistered ok "$(($(registrations) - before)) new registrations; the kubelet's devices: $(jq -c .Data.RegisteredDevices $CKPT)"
else
    check kubelet-reregistered FAIL "$(($(registrations) - before)) new registrations"
fi
kept kubelet-restart-kept "$released"

step "removing the pod's manifest"
resets_before=$(count "VF reset vf=" "$W/daemon.log")
rm -f "$K8S_STATE/manifests/vf-pod.yaml"
t0=$SECONDS
if wait_until 180 both_free; then
    check release ok "both VFs free $((SECONDS - t0)) s after the manifest was removed"
else
    check release FAIL "crypto: $(holder $CRYPTO); compress: $(holder $COMPRESS)"
fi
for vf in $CRYPTO $COMPRESS; do
    d=$(host_driver $vf)
    resets=$(grep "VF reset vf=" "$W/daemon.log" | tail -n +$((resets_before + 1)) || :)
    if [ "$d" = vfio-pci ] && grep -q "VF reset vf=$vf" <<< "$resets"; then
        check release-$vf ok "reset, on vfio-pci"
    else
        check release-$vf FAIL "driver '$d'; resets: $(grep "VF reset" "$W/daemon.log" | tail -3)"
    fi
done

step "final state"
echo "VFMAP-TABLE-BEGIN"
vfmap inventory || :
echo "VFMAP-TABLE-END"
# The daemon's side of it (the List retries while the kubelet restarted, counted).
echo "VFMAP-DAEMON $(count 'reconcile skipped' "$W/daemon.log") reconciliation(s) skipped (the kubelet not answering)"
grep -E 'registered with|held by the kubelet|identified|released by the kubelet|WARN|ERROR' "$W/daemon.log" |
    grep -v 'reconcile skipped' | cut -c1-300 | sed 's/^/VFMAP-DAEMON /' | tail -30 || :
result
exit $failed
