#!/bin/bash
# Runs inside the nested rig's host-role guest, under chroot of this machine's root (read-only
# 9p): writable tmpfs where the kubelet and containerd write, then scripts/k8s/start-kubelet and
# a static hostNetwork pod whose container prints a line that is checked in the kubelet's
# container log. Prints VFMAP-CHECK lines and one VFMAP-RESULT line.
#   nested-kubelet.sh REPO [IGNORED]
set -uo pipefail
REPO=${1:?repo}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export K8S_STATE=/run/vfmap-k8s HOME=/run
failed=0
check() { if [ "$2" = ok ]; then echo "VFMAP-CHECK $1 ok $3"; else echo "VFMAP-CHECK $1 FAIL $3"; failed=1; fi; }
for d in /var/lib /var/log /tmp; do mount -t tmpfs tmpfs "$d"; done
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
echo "VFMAP-STEP kernel $(uname -r); VFs: $(ls -d /sys/bus/pci/devices/0000:01:00.0/virtfn* 2>/dev/null | wc -l); cgroup: $(stat -fc %T /sys/fs/cgroup)"
t0=$SECONDS
if "$REPO/scripts/k8s/start-kubelet" --fresh; then
    check start ok "containerd and kubelet up in $((SECONDS - t0)) s"
else
    check start FAIL "start-kubelet failed"
fi
cat > "$K8S_STATE/manifests/hello.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: hello, namespace: default}
spec:
  hostNetwork: true
  containers:
  - name: app
    image: vfmap.local/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "echo VFMAP-K8S-HELLO kernel $(uname -r) cgroup $(cat /proc/self/cgroup | tail -1); trap 'exit 0' TERM; sleep 3600 & wait"]
  terminationGracePeriodSeconds: 5
YAML
t1=$SECONDS
line=""
while [ $((SECONDS - t1)) -lt 300 ]; do
    line=$(cat /var/log/pods/default_hello-*/app/0.log 2>/dev/null | grep -m1 VFMAP-K8S-HELLO || true)
    [ -n "$line" ] && break
    sleep 2
done
if [ -n "$line" ]; then
    check static-pod ok "container printed in $((SECONDS - t1)) s: ${line#* * * }"
else
    check static-pod FAIL "no line from the container in 300 s"
    grep -E '^E' "$K8S_STATE/kubelet.log" | tail -15
    tail -15 "$K8S_STATE/containerd.log"
fi
# Removing the manifest stops the pod: no task left running (stopped tasks stay listed until
# the kubelet's garbage collection deletes them).
running() { ctr --address "$K8S_STATE/containerd.sock" -n k8s.io tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"' | grep -q .; }
rm -f "$K8S_STATE/manifests/hello.yaml"
t2=$SECONDS
while [ $((SECONDS - t2)) -lt 120 ] && running; do sleep 2; done
if running; then
    check pod-removed FAIL "tasks still running 120 s after the manifest was removed"
else
    check pod-removed ok "no task left $((SECONDS - t2)) s after the manifest was removed"
fi

# The device plugin against this real kubelet, over the in-memory pool double (the mem-plugin
# example; `vfmap serve` with [kubernetes] is not run here yet, see docs/kubernetes.md): real
# VFs of the emulated PF, bound to vfio-pci by hand here.
plugin=${MEM_PLUGIN:-$REPO/.cache/k8s/target/debug/examples/mem-plugin}
if [ -x "$plugin" ]; then
    cp "$plugin" /run/mem-plugin
    pf=/sys/bus/pci/devices/0000:01:00.0
    echo 0 > $pf/sriov_drivers_autoprobe
    echo 3 > $pf/sriov_numvfs
    specs=() vfs=() groups=()
    fns=(crypto crypto compress)
    for i in 0 1 2; do
        bdf=$(basename "$(readlink $pf/virtfn$i)")
        echo vfio-pci > /sys/bus/pci/devices/$bdf/driver_override
        echo "$bdf" > /sys/bus/pci/drivers_probe
        g=$(basename "$(readlink /sys/bus/pci/devices/$bdf/iommu_group)")
        vfs+=("$bdf") groups+=("$g")
        specs+=("${fns[$i]}=$bdf@0000:01:00.0@$g")
    done
    echo "VFMAP-STEP VFs ${vfs[*]} in IOMMU groups ${groups[*]}; /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
    setsid /run/mem-plugin "${specs[@]}" > "$K8S_STATE/plugin.log" 2>&1 < /dev/null &
    plugin_pid=$!
    ckpt=/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
    t3=$SECONDS
    until [ $((SECONDS - t3)) -ge 120 ] || { [ -f $ckpt ] && [ "$(jq -c '.Data.RegisteredDevices | map_values(length)' $ckpt 2>/dev/null)" = '{"vfmap.io/compress":1,"vfmap.io/crypto":2}' ]; }; do sleep 2; done
    regs=$(grep -c 'Got registration request from device plugin' "$K8S_STATE/kubelet.log" || true)
    capacity=$(jq -c '.Data.RegisteredDevices' $ckpt 2>/dev/null || echo none)
    if [ "$capacity" != none ] && [ "$(jq -c '.Data.RegisteredDevices | map_values(length)' $ckpt)" = '{"vfmap.io/compress":1,"vfmap.io/crypto":2}' ]; then
        check registered ok "$regs registration(s); the kubelet's devices: $capacity"
    else
        check registered FAIL "registrations $regs; checkpoint: $capacity"
    fi
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
    t4=$SECONDS line=""
    while [ $((SECONDS - t4)) -lt 240 ]; do
        line=$(cat /var/log/pods/default_vf-pod-*/app/0.log 2>/dev/null | grep -m1 VFMAP-K8S-VF || true)
        [ -n "$line" ] && break
        sleep 2
    done
    line=${line#*VFMAP-K8S-VF }
    crypto=$(echo "$line" | sed -n 's/.*PCI_RESOURCE_VFMAP_IO_CRYPTO=\([^ ]*\).*/\1/p')
    compress=$(echo "$line" | sed -n 's/.*PCI_RESOURCE_VFMAP_IO_COMPRESS=\([^ ]*\).*/\1/p')
    want_dev="vfio"
    for i in 0 1 2; do
        if [ "${vfs[$i]}" = "$crypto" ] || [ "${vfs[$i]}" = "$compress" ]; then want_dev="$want_dev ${groups[$i]}"; fi
    done
    got_dev=$(echo "$line" | sed -n 's/.* dev \(.*\)$/\1/p' | tr ' ' '\n' | grep . | sort | tr '\n' ' ')
    want_dev=$(echo "$want_dev" | tr ' ' '\n' | sort | tr '\n' ' ')
    if [ -n "$crypto" ] && [ "$compress" = "${vfs[2]}" ] && [ "$got_dev" = "$want_dev" ] &&
        echo "$line" | grep -q "VFMAP_FUNCTION_CRYPTO=$crypto" && echo "$line" | grep -q "VFMAP_FUNCTION_COMPRESS=$compress"; then
        check vf-pod ok "the container saw: $line"
    else
        check vf-pod FAIL "container line: '$line' (want /dev/vfio: $want_dev)"
        grep -E '^E' "$K8S_STATE/kubelet.log" | tail -10
        tail -20 "$K8S_STATE/plugin.log"
    fi
    # The owner shows up in the pool once PodResources lists the pod.
    t5=$SECONDS
    until [ $((SECONDS - t5)) -ge 60 ] || grep -q 'pod: "vf-pod-vfmap-node"' "$K8S_STATE/plugin.log"; do sleep 2; done
    held=$(grep 'VFMAP-POOL' "$K8S_STATE/plugin.log" | tail -3 | grep -c 'vf-pod-vfmap-node' || true)
    if [ "$held" = 2 ]; then check owner ok "the pool double holds 2 VFs for default/vf-pod-vfmap-node/app"; else check owner FAIL "$(grep VFMAP-POOL "$K8S_STATE/plugin.log" | tail -3)"; fi
    # A second pod asking for a compress VF: none is free, the kubelet's admission refuses it.
    sed -e 's/name: vf-pod/name: greedy/' -e 's/vfmap.io\/crypto: 1, //' "$K8S_STATE/manifests/vf-pod.yaml" > "$K8S_STATE/manifests/greedy.yaml"
    t6=$SECONDS
    until [ $((SECONDS - t6)) -ge 60 ] || grep -q 'vfmap.io/compress. Requested: 1, Available: 0' "$K8S_STATE/kubelet.log"; do sleep 2; done
    if grep -q 'vfmap.io/compress. Requested: 1, Available: 0' "$K8S_STATE/kubelet.log"; then
        check admission ok "$(grep -m1 -o 'requested number of devices unavailable for vfmap.io/compress[^"\\]*' "$K8S_STATE/kubelet.log" | head -1)"
    else
        check admission FAIL "no admission refusal in the kubelet's log"
    fi
    rm -f "$K8S_STATE/manifests/greedy.yaml" "$K8S_STATE/manifests/vf-pod.yaml"
    # Released once the pod is gone and PodResources has not listed it for the grace period.
    t7=$SECONDS
    until [ $((SECONDS - t7)) -ge 120 ] || [ "$(grep 'VFMAP-POOL' "$K8S_STATE/plugin.log" | tail -3 | grep -c ' Free$')" = 3 ]; do sleep 2; done
    if [ "$(grep 'VFMAP-POOL' "$K8S_STATE/plugin.log" | tail -3 | grep -c ' Free$')" = 3 ]; then
        check release ok "all 3 VFs free in the pool double $((SECONDS - t7)) s after the manifest was removed"
    else
        check release FAIL "$(grep VFMAP-POOL "$K8S_STATE/plugin.log" | tail -3)"
    fi
    kill "$plugin_pid" 2>/dev/null || true
    grep -E 'registered|allocated|reconciled|WARN' "$K8S_STATE/plugin.log" | cut -c1-300 | sed 's/^/VFMAP-PLUGIN /' | head -20
fi
"$REPO/scripts/k8s/stop-kubelet" || true
if [ "$failed" = 0 ]; then echo "VFMAP-RESULT PASS"; else echo "VFMAP-RESULT FAIL"; fi
exit "$failed"
