# Shared helpers for the VM scripts: kernel discovery, the cache directory, starting QEMU, and
# the QEMU command-line pieces the scripts share.
# shellcheck shell=bash
#
# A sourced library: it sets no shell options for its caller (the scripts that source it run
# under `set -euo pipefail` themselves, and everything here works under those options).

# The installed kernel to boot: the newest /boot/vmlinuz-* that has its modules.
vm_kernel_version() {
    local v best=""
    for k in /boot/vmlinuz-*; do
        [ -e "$k" ] || continue
        v=${k#/boot/vmlinuz-}
        [ -d "/lib/modules/$v" ] && best=$v
    done
    if [ -z "$best" ]; then
        echo "error: no /boot/vmlinuz-<ver> with /lib/modules/<ver>; run scripts/install-deps" >&2
        return 1
    fi
    echo "$best"
}

VM_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VM_CACHE=${VFMAP_CACHE:-$VM_REPO_ROOT/.cache/vm}

# Replaces the calling script with QEMU (args "$@") under a time limit of $1 seconds, such that
# QEMU cannot outlive whoever started the script, even when that is killed with SIGKILL and
# cleans nothing up: PDEATHSIG on both steps (the starter dies -> `timeout` dies -> QEMU dies;
# `timeout` puts itself in its own process group, so a group kill of the starter misses it).
# PDEATHSIG follows the starting *thread*: start these scripts from one that outlives the VM.
vm_exec_qemu() {
    local limit=$1
    shift
    exec setpriv --pdeathsig KILL -- timeout --kill-after=10 "$limit" \
        setpriv --pdeathsig KILL -- qemu-system-x86_64 "$@"
}

# The QEMU pieces the VM scripts share, each defined here only: run-agent-vm, run-sriov-host,
# run-nested-host, and the nested scenario's inner VM (scripts/vm/nested/lib.sh, which sources
# this file from the repository path it runs from inside the outer guest). Each function appends
# its argument words to the array named by its first argument, so that paths stay one word:
#   args=(); vm_root_ports args 4; vm_agent_channel args "$sock"; vm_exec_qemu 600 ... "${args[@]}"

# vm_root_ports ARRAY N: N empty PCIe root ports rp0..rp<N-1> on pcie.0 at 00:03.0..00:03.<N-1>
# (function 0 marked multi-function when there are several). Each is a hot-plug slot, and what
# sits behind one gets a bus of its own. The addresses are fixed: put these words before any
# device QEMU places by itself (-virtfs, say), which would otherwise take slot 3 first.
vm_root_ports() {
    local -n _vm_args=$1
    local i mf=""
    if [ "$2" -lt 1 ] || [ "$2" -gt 8 ]; then
        echo "error: vm_root_ports: $2 ports (1 to 8 fit in slot 3)" >&2
        return 1
    fi
    [ "$2" -gt 1 ] && mf=,multifunction=on
    for ((i = 0; i < $2; i++)); do
        _vm_args+=(-device "pcie-root-port,id=rp$i,chassis=$((i + 1)),slot=$((i + 1)),bus=pcie.0,addr=0x3.$i${mf}")
        mf=""
    done
}

# vm_iommu ARRAY: an intel-iommu with interrupt remapping, so that VFs get IOMMU groups and
# vfio-pci works. It goes before the PCI devices; the machine needs kernel-irqchip=split and the
# guest kernel intel_iommu=on.
vm_iommu() {
    local -n _vm_args=$1
    _vm_args+=(-device intel-iommu,intremap=on,caching-mode=on)
}

# vm_sriov_nvme_pf ARRAY BUS: QEMU's emulated NVMe PF with SR-IOV behind root port BUS: up to 3
# VFs, which report the PF's own ID (1b36:0010), with flexible queue and interrupt resources for
# their secondary controllers (brought online with nvme-cli by examples/hooks/nvme-bring-up, the
# bring_up hook of the nested scenarios' profiles in nested/lib.sh).
vm_sriov_nvme_pf() {
    local -n _vm_args=$1
    _vm_args+=(-device nvme-subsys,id=subsys0
        -device "nvme,serial=deadbeef,subsys=subsys0,bus=$2,sriov_max_vfs=3,sriov_vq_flexible=6,sriov_vi_flexible=3,max_ioqpairs=8,msix_qsize=6")
}

# vm_agent_channel ARRAY SOCKET: the agent's channel, the virtio-serial port "org.vfmap.0", whose host
# end is the unix socket SOCKET (QEMU listens, the daemon connects).
vm_agent_channel() {
    local -n _vm_args=$1
    _vm_args+=(-device virtio-serial-pci
        -chardev "socket,id=vfmap,path=$2,server=on,wait=off"
        -device virtserialport,chardev=vfmap,name=org.vfmap.0)
}
