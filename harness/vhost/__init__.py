"""vhost: the kernel as a second writer of guest memory.

A vhost device (/dev/vhost-vsock here) is a virtio device implemented in the kernel: its worker
thread reads the driver's descriptors and writes the driver's buffers in guest memory directly,
through the same host mappings that back KVM's memslots, never through KVM. The harness opens the
device, gives it the VM's memslots as its memory table and plays the guest's virtio driver itself on
split virtqueues laid out in guest memory, so a case decides exactly which GPAs the kernel writes
and which bytes. docs/vhost.md has the design; cases/test_vhost.py the cases.

    uapi      ioctl numbers, struct layouts, feature bits, virtio-vsock header and ops
    device    VhostDevice / VhostVsock: the ioctls, the worker task, a bounded close;
              regions_from_memslots(); VhostUnavailable (a skip), VhostError, VhostStuck
    vring     VringLayout (where a split queue lives), SplitVring (the driver side of one queue)
    vsock     VsockLayout, VsockDriver (the guest's virtio-vsock driver), HostListener (the host end)
    oracle    Verdicts over what vhost wrote: headers, the stream, page images, memory/disk contents
    rig       VsockRig: a memslot of a backing + driver + host connection, in rounds, with the oracles
"""

# harness.kvm first: harness.unsupported alone cannot be imported before it (unsupported -> kvm.errors ->
# kvm/__init__ -> ... -> memory.hugepages -> unsupported), and device.py needs it
import harness.kvm  # noqa: F401
from harness.vhost.device import (
    MemRegion,
    VhostDevice,
    VhostError,
    VhostStuck,
    VhostUnavailable,
    VhostVsock,
    regions_from_memslots,
)
from harness.vhost.vring import Seg, SplitVring, Used, VringLayout
from harness.vhost.vsock import HostListener, RxPacket, RxRound, VhostTimeout, VsockDriver, VsockHdr, VsockLayout

__all__ = [
    "HostListener", "MemRegion", "RxPacket", "RxRound", "Seg", "SplitVring", "Used", "VhostDevice", "VhostError",
    "VhostStuck", "VhostTimeout", "VhostUnavailable", "VhostVsock", "VringLayout", "VsockDriver", "VsockHdr",
    "VsockLayout", "regions_from_memslots",
]
