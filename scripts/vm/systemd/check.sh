#!/bin/bash
# Runs inside the VM of scripts/package-vm-test, as vfmap-check.service under a real systemd
# (PID 1) on a real kernel with an emulated SR-IOV NVMe PF (3 VFs, 1b36:0010) behind an
# intel-iommu. Installs the vfmap package with dpkg, runs the packaged vfmap.service with its
# hardening, drives it with the CLI against a fake QEMU (QMP socket in /tmp, read-only for the
# daemon) and a fake agent (socket in /root, read-only too), then upgrades, removes and purges.
# Phase 1 replaces the syscall filter by a log of every syscall outside it (the kernel's
# audit lines, type=1326); phase 2 runs the unit exactly as shipped. Prints one line per
# check and "VFMAP-CHECK-EXIT <failures>" on the console.
set -u
exec >/dev/ttyS0 2>&1
. /vfmap-check/env
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
sock=/run/vfmap/api.sock
failed=0 passed=0
ok() {
    passed=$((passed + 1))
    echo "  ok    $*"
}
bad() {
    failed=$((failed + 1))
    echo "  FAIL  $*"
}
check() {
    local what=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then ok "$what"; else
        bad "$what"
        sed 's/^/        /' /tmp/check.out | tail -n 20
    fi
}
cli() { vfmap --socket "$sock" "$@"; }
wait_socket() {
    for _ in $(seq 300); do
        [ -S "$sock" ] && cli vm list >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
vf_driver() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)"; }
denials() { journalctl -u vfmap.service -o cat --no-pager | grep -Ei 'not permitted|permission denied|read-only file system|EPERM'; }
finish() {
    echo "vfmap-check: $passed passed, $failed failed"
    echo "VFMAP-CHECK-EXIT $failed"
    systemctl poweroff --force --force
}
echo "vfmap-check: systemd $(systemctl --version | head -n1 | cut -d' ' -f2) is PID 1: $(cat /proc/1/comm)"
# The emulated SR-IOV PF (the only device with sriov_totalvfs).
PF=$(basename "$(dirname "$(ls /sys/bus/pci/devices/*/sriov_totalvfs | head -n1)")")
echo "vfmap-check: SR-IOV PF $PF"

# The packaged daemon, driven through one VM's life: the host side is real (sysfs, modprobe,
# vfio-pci, VF reset), the VM is the fake QEMU and agent.
scenario() {
    local phase=$1 vm=$2
    check "[$phase] vfmap.service is active" systemctl is-active --quiet vfmap.service
    check "[$phase] the API answers on $sock" wait_socket
    VF0=$(basename "$(readlink "/sys/bus/pci/devices/$PF/virtfn0")")
    VF1=$(basename "$(readlink "/sys/bus/pci/devices/$PF/virtfn1")")
    VF2=$(basename "$(readlink "/sys/bus/pci/devices/$PF/virtfn2")")
    check "[$phase] $sock is a socket of mode 0600, /run/vfmap 0755, /var/lib/vfmap 0700" \
        sh -c "[ \$(stat -c %a $sock) = 600 ] && [ \$(stat -c %a /run/vfmap) = 755 ] &&
            [ \$(stat -c %a /var/lib/vfmap) = 700 ]"
    check "[$phase] the daemon loaded vfio-pci and pci-stub (modprobe under the unit)" \
        sh -c "grep -q '^vfio_pci ' /proc/modules && grep -q '^pci_stub ' /proc/modules"
    check "[$phase] prepare made 3 VFs and bound them (sysfs writes)" \
        sh -c "[ \$(cat /sys/bus/pci/devices/$PF/sriov_numvfs) = 3 ] &&
            [ \"\$(basename \$(readlink /sys/bus/pci/devices/$VF0/driver))\" = vfio-pci ] &&
            [ \"\$(basename \$(readlink /sys/bus/pci/devices/$VF1/driver))\" = vfio-pci ] &&
            [ \"\$(basename \$(readlink /sys/bus/pci/devices/$VF2/driver))\" = pci-stub ]"
    check "[$phase] /dev/vfio has the VFs' groups" \
        test -e "/dev/vfio/$(basename "$(readlink /sys/bus/pci/devices/$VF0/iommu_group)")"
    check "[$phase] inventory through the daemon shows the 3 functions" \
        sh -c "vfmap --socket $sock --json inventory | jq -e '[.vfs[].function] | sort == [\"compress\",\"crypto\",\"storage\"]'"
    rm -f "/tmp/$vm.qmp" "/root/$vm.agent"
    "$FAKE_QMP" --socket "/tmp/$vm.qmp" --slots rp0,rp1,rp2 --state "/tmp/$vm.qmp.state" &
    qmp_pid=$!
    "$FAKE_AGENT" --socket "/root/$vm.agent" --state "/tmp/$vm.agent.state" &
    agent_pid=$!
    for _ in $(seq 100); do [ -S "/tmp/$vm.qmp" ] && [ -S "/root/$vm.agent" ] && break; sleep 0.1; done
    check "[$phase] vm add (QMP socket in /tmp, agent socket in /root)" \
        cli vm add "$vm" --qmp "/tmp/$vm.qmp" --agent "/root/$vm.agent" --slot rp0 --slot rp1 --slot rp2
    check "[$phase] attach crypto: plugged over QMP, bound by the agent" \
        sh -c "vfmap --socket $sock --json attach $vm crypto | jq -e '.attached[0].bound_driver == \"pci-stub\"'"
    check "[$phase] attach storage" cli attach "$vm" storage
    check "[$phase] the fake QEMU holds both devices" sh -c "[ \$(wc -l </tmp/$vm.qmp.state) = 2 ]"
    check "[$phase] detach 0: unplugged, VF reset and still on vfio-pci" \
        sh -c "vfmap --socket $sock detach $vm 0 &&
            [ \$(wc -l </tmp/$vm.qmp.state) = 1 ] &&
            [ \"\$(basename \$(readlink /sys/bus/pci/devices/$VF1/driver))\" = vfio-pci ]"
    check "[$phase] status shows the one left" \
        sh -c "vfmap --socket $sock --json status $vm | jq -e '.correspondence | length == 1'"
}

# This machine's root is a container image whose policy-rc.d forbids starting services;
# this guest is a real host, so maintainer scripts may (re)start them as on any host.
rm -f /usr/sbin/policy-rc.d
# dpkg with a database of its own holding only the dependency (kmod, as this machine has it):
# the machine's database over 9p would take minutes to read under TCG. The maintainer scripts
# run as on any host, under this systemd.
mkdir -p /var/lib/vfmap-check-dpkg/info /var/lib/vfmap-check-dpkg/updates
dpkg-query -s kmod >/var/lib/vfmap-check-dpkg/status
touch /var/lib/vfmap-check-dpkg/info/kmod.list /var/lib/vfmap-check-dpkg/available
dpkg() { command dpkg --admindir=/var/lib/vfmap-check-dpkg "$@" </dev/null; }
export -f dpkg
check "dpkg -i vfmap 0.1.0-1 under systemd" dpkg -i "$DEB1"
check "the fresh installation neither enabled nor started the daemon" \
    sh -c "! systemctl is-enabled --quiet vfmap.service && ! systemctl is-active --quiet vfmap.service"
cp "$PROFILES" /etc/vfmap/profiles.toml

# Each phase starts from a bare host: no VFs, neither vfio-pci nor pci-stub loaded, so the
# daemon creates the VFs and loads the modules itself under that phase's unit.
bare_host() {
    systemctl stop vfmap.service 2>/dev/null
    echo 0 >"/sys/bus/pci/devices/$PF/sriov_numvfs"
    modprobe -r vfio_pci pci_stub
    ! grep -Eq '^(vfio_pci|pci_stub) ' /proc/modules && [ "$(cat "/sys/bus/pci/devices/$PF/sriov_numvfs")" = 0 ]
}
check "the host starts bare (no VFs, vfio-pci and pci-stub not loaded)" bare_host

# Phase 1: no syscall filter; every syscall outside @system-service @module is logged.
mkdir -p /run/systemd/system/vfmap.service.d
printf '[Service]\nSystemCallFilter=\nSystemCallLog=~@system-service @module\n' \
    >/run/systemd/system/vfmap.service.d/log.conf
systemctl daemon-reload
check "[log] systemctl enable --now vfmap" systemctl enable --now vfmap.service
scenario log vm1
check "[log] the syscall logger works (positive control: uname logged)" \
    sh -c "systemd-run --quiet --wait -p SystemCallLog=uname uname >/dev/null &&
        sleep 1 && dmesg | grep -q 'type=1326.*comm=\"uname\".*syscall=63'"
check "[log] the daemon and its modprobe made no syscall outside @system-service @module" \
    sh -c "! dmesg | grep 'type=1326' | grep -v 'comm=\"uname\"'"
dmesg | grep 'type=1326' | grep -v 'comm="uname"' | head -n 20 | sed 's/^/        /'
check "[log] the journal shows no denial" sh -c "! denials"
cli vm rm vm1 >/dev/null 2>&1
kill "$qmp_pid" "$agent_pid" 2>/dev/null

# Phase 2: the unit exactly as shipped.
rm -rf /run/systemd/system/vfmap.service.d
systemctl daemon-reload
check "the host is bare again (daemon stopped, VFs removed, modules unloaded)" bare_host
check "[shipped] start with the shipped unit" systemctl start vfmap.service
scenario shipped vm2
check "[shipped] the journal shows no denial" sh -c "! denials"
journalctl -u vfmap.service -o cat --no-pager | tail -n 5 | sed 's/^/        /'

# The agent package in the same machine: enabled and started by its postinst, it must find
# its port (name=org.vfmap.0, its default) under its hardening and keep running.
check "dpkg -i vfmap-agent: enabled and started" \
    bash -c "dpkg -i $AGENT_DEB && systemctl is-enabled --quiet vfmap-agent.service"
for _ in $(seq 50); do
    journalctl -u vfmap-agent.service -o cat --no-pager | grep -q 'serving on' && break
    sleep 0.2
done
check "vfmap-agent.service is active and serving on its virtio-serial port" \
    sh -c "systemctl is-active --quiet vfmap-agent.service &&
        journalctl -u vfmap-agent.service -o cat --no-pager | grep -q 'serving on /dev/vport'"
check "the agent's journal shows no denial" \
    sh -c "! journalctl -u vfmap-agent.service -o cat --no-pager | grep -Ei 'not permitted|permission denied|read-only file system'"
journalctl -u vfmap-agent.service -o cat --no-pager | tail -n 3 | sed 's/^/        /'

# Upgrade: the daemon restarts on the new binary and keeps its state (vm2 holds one VF).
pid_before=$(systemctl show -p MainPID --value vfmap.service)
check "dpkg -i vfmap 0.1.0-2 (upgrade)" dpkg -i "$DEB2"
check "the upgrade restarted the running daemon and kept it enabled" \
    sh -c "[ \"\$(systemctl show -p MainPID --value vfmap.service)\" != $pid_before ] &&
        systemctl is-active --quiet vfmap.service && systemctl is-enabled --quiet vfmap.service"
check "after the upgrade vm2 still holds its VF (state database kept)" \
    sh -c "wait_socket() { for _ in \$(seq 100); do vfmap --socket $sock vm list >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }; wait_socket &&
        vfmap --socket $sock --json status vm2 | jq -e '.correspondence | length == 1'"
check "dpkg -r vfmap stops the daemon, keeps /etc/vfmap and the state database" \
    bash -c "dpkg -r vfmap && ! systemctl is-active --quiet vfmap.service &&
        [ -f /etc/vfmap/vfmap.toml ] && [ -f /var/lib/vfmap/state.db ]"
check "the agent still runs, and /run/vfmap is kept for it without the daemon's socket" \
    sh -c "systemctl is-active --quiet vfmap-agent.service && [ -d /run/vfmap ] && [ ! -e $sock ]"
check "dpkg -P vfmap deletes them" \
    bash -c "dpkg -P vfmap && [ ! -e /etc/vfmap/vfmap.toml ] && [ ! -e /var/lib/vfmap ]"
kill "$qmp_pid" "$agent_pid" 2>/dev/null
finish
