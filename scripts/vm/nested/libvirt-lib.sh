# libvirt in the nested set-up (sourced after lib.sh; runs in the outer guest, under chroot of
# this machine's read-only root): a real libvirtd (Debian's) managing the inner VM as a domain
# defined from examples/libvirt-domain.xml.
#
# The chroot is read-only, so libvirt's writable directories are tmpfs mounts and its config
# is a copy under $W, bind-mounted over /etc/libvirt, with:
#   stdio_handler = "file"   (no virtlogd; see rig.md)
#   user/group root, dynamic_ownership = 0, security_driver = "none", namespaces = [],
#   cgroup_controllers = []  (a bare busybox init: no cgroups, no AppArmor, and files on a
#                             read-only share that cannot be relabelled)
# and no autostarted network. A sourced library: no shell options, no traps.
LIBVIRT_URI=qemu:///system
DOMAIN=inner
virsh() { command virsh --quiet --connect "$LIBVIRT_URI" "$@"; }
# The chroot is read-only: the clients' per-user directories go under $W.
export XDG_CACHE_HOME=$W/xdg/cache XDG_CONFIG_HOME=$W/xdg/config XDG_RUNTIME_DIR=$W/xdg/run

libvirt_setup() {
    local l=$W/libvirt
    mkdir -p "$l/etc"
    cp -a /etc/libvirt/. "$l/etc/"
    rm -f "$l"/etc/qemu/networks/autostart/*.xml
    cat >> "$l/etc/qemu.conf" <<'CONF'
stdio_handler = "file"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
CONF
    mount --bind "$l/etc" /etc/libvirt
    for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do mount -t tmpfs libvirt "$d"; done
    mkdir -p /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
}

# start_libvirtd: libvirtd in the background (pid in LIBVIRTD, log in $W/libvirtd.log);
# returns 0 once it answers.
start_libvirtd() {
    libvirtd >> "$W/libvirtd.log" 2>&1 &
    LIBVIRTD=$!
    for _ in $(seq 300); do
        virsh version > /dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
stop_libvirtd() {
    kill "$LIBVIRTD" 2> /dev/null || :
    wait "$LIBVIRTD" 2> /dev/null || :
}

# domain_xml: examples/libvirt-domain.xml made concrete for this run: this kernel, the agent's
# initramfs, the console in $W/inner.console, the channel at $W/inner.agent.
domain_xml() {
    sed -e "s|<name>vfmap-example</name>|<name>$DOMAIN</name>|" \
        -e "s|<kernel>.*</kernel>|<kernel>/boot/vmlinuz-$KVER</kernel>|" \
        -e "s|<initrd>.*</initrd>|<initrd>$AGENT_INITRD</initrd>|" \
        -e "s|<cmdline>.*</cmdline>|<cmdline>console=ttyS0 quiet loglevel=3 panic=-1 vfmap.mode=agent ${1:-}</cmdline>|" \
        -e "s|path='/run/vfmap/vfmap-example.agent'|path='$W/inner.agent'|" \
        -e "s|<serial type='pty'>|<serial type='file'><source path='$W/inner.console'/>|" \
        "$REPO/examples/libvirt-domain.xml"
}

# start_domain [EXTRA_KERNEL_ARGS]: defines and starts the domain; returns when its agent serves
# its port (a progress line every 5 s while the guest boots).
start_domain() {
    domain_xml "${1:-}" > "$W/domain.xml"
    virsh define "$W/domain.xml" > /dev/null || { check domain-define FAIL "virsh define"; return 1; }
    : > "$W/inner.console"
    virsh start "$DOMAIN" > /dev/null || { check domain-start FAIL "virsh start"; return 1; }
    wait_agent_up
}
wait_agent_up() {
    local t0=$SECONDS
    for i in $(seq 600); do
        grep -qa "serving on" "$W/inner.console" 2> /dev/null && break
        [ $((i % 10)) = 0 ] && step "  the domain's guest is booting ($((SECONDS - t0)) s)"
        sleep 0.5
    done
    grep -qa "serving on" "$W/inner.console" && check agent-up ok "$((SECONDS - t0)) s" ||
        check agent-up FAIL "no agent in the domain"
}
