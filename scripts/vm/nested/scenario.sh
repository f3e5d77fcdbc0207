#!/bin/bash
# Prototype of the nested scenario (runs inside the outer guest, under chroot of the host root).
REPO=$1
W=/tmp/vfmap; mkdir -p $W
VFMAP=$REPO/target/x86_64-unknown-linux-gnu/release/vfmap
KVER=$(uname -r)
t0=$(date +%s.%N)
step() { echo "VFMAP-STEP $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null) $*"; }
cat > $W/profiles.toml <<'TOML'
[[card]]
name = "qemu-nvme-sriov"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 3
[[card.function]]
name = "storage"
vfs = "0"
guest_driver = "nvme"
[[card.function]]
name = "crypto"
vfs = "1"
guest_driver = "pci-stub"
[[card.function]]
name = "compress"
vfs = "2"
guest_driver = "uio_pci_generic"
TOML
cat > $W/vfmap.toml <<TOML
profiles = ["$W/profiles.toml"]
state_dir = "$W/state"
socket = "$W/api.sock"
agent_timeout_ms = 120000
qmp_timeout_ms = 60000
TOML
step daemon
$VFMAP serve --config $W/vfmap.toml 2> $W/daemon.log &
for i in $(seq 100); do [ -S $W/api.sock ] && break; sleep 0.2; done
$VFMAP --socket $W/api.sock inventory
step controllers-online
nvme list-secondary /dev/nvme0
for c in 1 2 3; do
  nvme virt-mgmt /dev/nvme0 -c $c -r 0 -a 8 -n 2
  nvme virt-mgmt /dev/nvme0 -c $c -r 1 -a 8 -n 1
  nvme virt-mgmt /dev/nvme0 -c $c -r 0 -a 9 -n 0
done
nvme list-secondary /dev/nvme0 | head -30
step inner-vm
qemu-system-x86_64 -accel tcg -machine q35 -cpu max -m 256 -smp 1 -display none -no-reboot -monitor none \
  -kernel /boot/vmlinuz-$KVER -initrd $REPO/.cache/vm/agent.cpio.gz \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 vfmap.mode=agent" \
  -qmp unix:$W/inner.qmp,server=on,wait=off \
  -device pcie-root-port,id=rp0,chassis=1,bus=pcie.0,addr=0x3.0,multifunction=on \
  -device pcie-root-port,id=rp1,chassis=2,bus=pcie.0,addr=0x3.1 \
  -device pcie-root-port,id=rp2,chassis=3,bus=pcie.0,addr=0x3.2 \
  -device pcie-root-port,id=rp3,chassis=4,bus=pcie.0,addr=0x3.3 \
  -device virtio-serial-pci -chardev socket,id=vfmap,path=$W/inner.agent,server=on,wait=off \
  -device virtserialport,chardev=vfmap,name=vfmap -serial file:$W/inner.console &
for i in $(seq 600); do grep -q "serving on" $W/inner.console 2>/dev/null && break; sleep 0.5; done
step agent-up
$VFMAP --socket $W/api.sock vm add inner --qmp $W/inner.qmp --agent $W/inner.agent --slot rp0 --slot rp1 --slot rp2 --slot rp3
for f in storage crypto compress; do step attach-$f; $VFMAP --socket $W/api.sock attach inner $f; done
step attached
sleep 8
grep -a "VFMAP-DRIVERS" $W/inner.console | tail -1
grep -a "vfmap-agent:" $W/inner.console | tail -5
$VFMAP --socket $W/api.sock status
tail -20 $W/daemon.log
step end
