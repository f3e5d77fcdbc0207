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
