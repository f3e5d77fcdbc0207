# Shared helpers for the VM scripts: kernel discovery and the cache directory.
# shellcheck shell=bash

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
