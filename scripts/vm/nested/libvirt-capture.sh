#!/bin/bash
# Captures live domain XML from a real libvirtd (Debian's libvirt, in the outer guest) as test
# fixtures for the daemon's libvirt XML reader. Run by scripts/capture-libvirt-fixtures, which
# writes the documents printed between VFMAP-XML-BEGIN NAME / VFMAP-XML-END markers to
# crates/vfmap-daemon/tests/fixtures/libvirt/NAME.xml.
#   libvirt-capture.sh REPO
set -Eeuo pipefail
REPO=$1
. "$REPO/scripts/vm/nested/lib.sh"
. "$REPO/scripts/vm/nested/libvirt-lib.sh"
trap 'error_at="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
trap report_unfinished EXIT
dump() { # dump NAME: the live XML between markers
    echo "VFMAP-XML-BEGIN $1"
    virsh dumpxml "$DOMAIN"
    echo "VFMAP-XML-END $1"
}

step "starting vfmap serve (creates the VFs, brings them up with the card's bring_up hook, binds them to vfio-pci)"
start_daemon && check daemon-start ok "" || check daemon-start FAIL "see $W/daemon.log"
step "starting libvirtd"
libvirt_setup
start_libvirtd && check libvirtd ok "" || check libvirtd FAIL "$(tail -5 "$W/libvirtd.log")"
step "defining and starting the domain from examples/libvirt-domain.xml"
start_domain
dump running-empty
step "hot-plugging a VF on root port index 1 (holds the virtio-serial controller: refused) and on index 3"
hostdev() { # hostdev BUS VF ALIAS: a vfmap-style hostdev at slot 0 behind root port BUS
    cat > "$W/hostdev.xml" <<XML
<hostdev mode='subsystem' type='pci' managed='no'>
  <source><address domain='0x0000' bus='0x01' slot='0x00' function='${2##*.}'/></source>
  <alias name='$3'/>
  <address type='pci' domain='0x0000' bus='$1' slot='0x00' function='0x0'/>
</hostdev>
XML
}
hostdev 0x01 0000:01:00.1 ua-vfmap-vf0
if virsh attach-device "$DOMAIN" "$W/hostdev.xml" --live 2> "$W/attach.err"; then
    check occupied-port-refused FAIL "libvirt plugged a device on an occupied root port"
else
    check occupied-port-refused ok "$(tr '\n' ' ' < "$W/attach.err")"
fi
hostdev 0x03 0000:01:00.2 ua-vfmap-vf1
virsh attach-device "$DOMAIN" "$W/hostdev.xml" --live && check attach ok "" || check attach FAIL ""
dump running-hostdev
echo "VFMAP-XML-BEGIN inactive"; virsh dumpxml --inactive "$DOMAIN"; echo "VFMAP-XML-END inactive"
step "detaching by alias"
virsh detach-device-alias "$DOMAIN" ua-vfmap-vf1 --live && check detach-alias ok "" || check detach-alias FAIL ""
sleep 2
dump running-after-detach
virsh destroy "$DOMAIN" > /dev/null
dump shut-off
result
exit $failed
