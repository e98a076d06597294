"""The vhost / virtio uapi the harness speaks, as numbers and struct layouts (no cffi: struct + ioctl).

From include/uapi/linux/vhost.h and vhost_types.h (ioctls, struct vhost_vring_state/_file/_addr,
vhost_memory[_region]), include/uapi/linux/virtio_ring.h (split ring: struct vring_desc,
vring_avail, vring_used[_elem], the flags), virtio_config.h (transport feature bits) and
virtio_vsock.h (struct virtio_vsock_hdr, its ops and types). tests/test_vhost.py pins every size and
number against the upstream values and, where the host has them, against its own headers.
"""

from __future__ import annotations

import struct

# ---- ioctl encoding (asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr) ---------------------
VHOST_VIRTIO = 0xAF
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (VHOST_VIRTIO << 8) | nr


# ---- structs --------------------------------------------------------------------------------------
VRING_STATE = struct.Struct("<II")  # struct vhost_vring_state { unsigned int index, num; }
VRING_FILE = struct.Struct("<Ii")  # struct vhost_vring_file { unsigned int index; int fd; }
# struct vhost_vring_addr { unsigned int index, flags; u64 desc_user_addr, used_user_addr,
# avail_user_addr, log_guest_addr; }
VRING_ADDR = struct.Struct("<IIQQQQ")
MEMORY = struct.Struct("<II")  # struct vhost_memory { u32 nregions, padding; regions[] }
# struct vhost_memory_region { u64 guest_phys_addr, memory_size, userspace_addr, flags_padding; }
MEMORY_REGION = struct.Struct("<QQQQ")
U64 = struct.Struct("<Q")
INT = struct.Struct("<i")

VRING_DESC = struct.Struct("<QIHH")  # struct vring_desc { le64 addr; le32 len; le16 flags, next; }
VRING_USED_ELEM = struct.Struct("<II")  # struct vring_used_elem { le32 id, len; }
U16 = struct.Struct("<H")
# struct virtio_vsock_hdr (packed): le64 src_cid, dst_cid; le32 src_port, dst_port, len;
# le16 type, op; le32 flags, buf_alloc, fwd_cnt
VSOCK_HDR = struct.Struct("<QQIIIHHIII")

# ---- ioctls ---------------------------------------------------------------------------------------
VHOST_GET_FEATURES = _ioc(_IOC_READ, 0x00, U64.size)
VHOST_SET_FEATURES = _ioc(_IOC_WRITE, 0x00, U64.size)
VHOST_SET_OWNER = _ioc(_IOC_NONE, 0x01, 0)
VHOST_RESET_OWNER = _ioc(_IOC_NONE, 0x02, 0)
VHOST_SET_MEM_TABLE = _ioc(_IOC_WRITE, 0x03, MEMORY.size)
VHOST_SET_LOG_BASE = _ioc(_IOC_WRITE, 0x04, U64.size)
VHOST_SET_LOG_FD = _ioc(_IOC_WRITE, 0x07, INT.size)
VHOST_SET_VRING_NUM = _ioc(_IOC_WRITE, 0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR = _ioc(_IOC_WRITE, 0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE = _ioc(_IOC_WRITE, 0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = _ioc(_IOC_READ | _IOC_WRITE, 0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK = _ioc(_IOC_WRITE, 0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL = _ioc(_IOC_WRITE, 0x21, VRING_FILE.size)
VHOST_SET_VRING_ERR = _ioc(_IOC_WRITE, 0x22, VRING_FILE.size)
VHOST_NET_SET_BACKEND = _ioc(_IOC_WRITE, 0x30, VRING_FILE.size)
VHOST_VSOCK_SET_GUEST_CID = _ioc(_IOC_WRITE, 0x60, U64.size)
VHOST_VSOCK_SET_RUNNING = _ioc(_IOC_WRITE, 0x61, INT.size)

IOCTL_NAMES = {v: k for k, v in globals().items() if k.startswith("VHOST_") and k.isupper()
               and isinstance(v, int) and k not in ("VHOST_VIRTIO", "VHOST_PAGE_SIZE")}

VHOST_PAGE_SIZE = 0x1000  # "All region addresses and sizes must be 4K aligned."

# ---- feature bits ---------------------------------------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_F_ANY_LAYOUT = 27
VHOST_NET_F_VIRTIO_NET_HDR = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_VSOCK_F_SEQPACKET = 1

# ---- split virtqueue ------------------------------------------------------------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_DESC_ALIGN = 16
VRING_AVAIL_ALIGN = 2
VRING_USED_ALIGN = 4
VRING_MAX_NUM = 32768  # vhost: num a power of 2, at most 0xffff (so 32768)

# ---- virtio-vsock ---------------------------------------------------------------------------------
VSOCK_VQ_RX = 0  # the driver's receive queue: the device (vhost) writes into its buffers
VSOCK_VQ_TX = 1
VSOCK_VQ_EVENT = 2  # not handled by vhost-vsock (QEMU's)
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
VSOCK_OP_NAMES = {0: "INVALID", 1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW",
                  6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST"}
VMADDR_CID_HOST = 2
VHOST_VSOCK_HOST_CID = VMADDR_CID_HOST  # vhost-vsock's local CID: the host side of every guest


def ioctl_name(number: int) -> str:
    return IOCTL_NAMES.get(number, f"vhost ioctl {number:#x}")
