"""A link's set-up inside an attempt's network namespace through the socket ioctls
of netdevice(7) (an address and its mask, the link up, the default route): one plain
IPv4 datagram socket, which the kernel frees the moment it is closed.

Why not rtnetlink here, as on the host's side (`netlink.Netlink`): a netlink socket
is freed only after an RCU grace period (16–30 ms measured), and until then the
namespace's socket count (`sockets: used` in its sockstat) still includes it. A kept
namespace is handed on only when that count is 0 (`network.sockets_open`), so a
netlink socket opened inside would make the slot's next attempt remake a namespace
that is clean. The ioctls are the kernel's stable ABI, as the netlink messages are."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C
SIOCGIFINDEX = 0x8933
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2

_IFREQ_FLAGS = struct.Struct("=16sh")  # ifreq: name, ifr_flags
_IFREQ_INT = struct.Struct("=16si")  # ifreq: name, ifr_ifindex
IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux
# struct rtentry: rt_pad1, rt_dst, rt_gateway, rt_genmask, rt_flags, rt_pad2, rt_pad3,
# rt_pad4, rt_metric, rt_dev, rt_mtu, rt_window, rt_irtt (native sizes and alignment)
_RTENTRY = struct.Struct("@L16s16s16sHhLPhPLLH")
RTENTRY_SIZE = -(-_RTENTRY.size // struct.calcsize("@L")) * struct.calcsize("@L")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, ipaddress.IPv4Address(address).packed)


class LinkIoctl:
    """Link requests answered in the namespace this socket was made in (the calling
    thread's at the time)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __enter__(self) -> LinkIoctl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _ioctl(self, request: int, arg: bytes) -> bytes:
        return fcntl.ioctl(self.sock, request, arg)

    def index(self, name: str) -> int:
        """The index of link `name` (ENODEV if there is none)."""
        ifreq = _IFREQ_INT.pack(name.encode(), 0).ljust(IFREQ_SIZE, b"\0")
        return _IFREQ_INT.unpack_from(self._ioctl(SIOCGIFINDEX, ifreq))[1]

    def set_up(self, name: str) -> None:
        ifreq = _IFREQ_FLAGS.pack(name.encode(), 0).ljust(IFREQ_SIZE, b"\0")
        flags = _IFREQ_FLAGS.unpack_from(self._ioctl(SIOCGIFFLAGS, ifreq))[1]
        up = _IFREQ_FLAGS.pack(name.encode(), flags | IFF_UP).ljust(IFREQ_SIZE, b"\0")
        self._ioctl(SIOCSIFFLAGS, up)

    def add_address(self, name: str, address: str, prefix: int) -> None:
        """`address`/`prefix` on link `name` (its broadcast address follows the mask)."""
        mask = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
        for request, value in ((SIOCSIFADDR, address), (SIOCSIFNETMASK, mask)):
            ifreq = (name.encode().ljust(16, b"\0") + _sockaddr_in(value)).ljust(IFREQ_SIZE, b"\0")
            self._ioctl(request, ifreq)

    def add_default_route(self, gateway: str) -> None:
        """The default route through `gateway` (on-link by an address already set)."""
        any_address = _sockaddr_in("0.0.0.0")
        entry = _RTENTRY.pack(
            0, any_address, _sockaddr_in(gateway), any_address, RTF_UP | RTF_GATEWAY,
            0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        self._ioctl(SIOCADDRT, entry.ljust(RTENTRY_SIZE, b"\0"))
