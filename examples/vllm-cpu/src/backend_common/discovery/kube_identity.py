"""Who a worker is under Kubernetes discovery: the object name and the instance id.

Dynamo 1.6.1 derives both from the pod (docs/wire-protocol.md#kubernetes-discovery):

* pod mode (``DYN_KUBE_DISCOVERY_MODE`` unset or ``pod``): the name is the pod's name;
* container mode (``container``): ``{pod}-{container}``, except that a container named
  ``main`` keeps the pod's name, so a container-mode frontend finds pod-mode workers;
* the instance id is Rust's ``DefaultHasher`` over that name, masked to 53 bits so it
  survives a round trip through an IEEE-754 double.

``DefaultHasher`` is SipHash-1-3 with both keys zero, fed the way ``impl Hash for str``
feeds it: the UTF-8 bytes, then one ``0xff`` byte. The frontend computes the same id from
the pod named in an EndpointSlice and looks the worker's records up under it, so an id
that differs from the frontend's makes the worker unroutable and unremovable. Checked
against the id the real 1.6.1 runtime logs (tests/wire/test_kube_discovery.py). No
maintained Python package implements SipHash-1-3 (those on PyPI are SipHash-2-4), so the
twenty lines are here.
"""

from __future__ import annotations

import struct

__all__ = ["INSTANCE_ID_MASK", "MAIN_CONTAINER", "instance_id_for", "object_name", "siphash13"]

INSTANCE_ID_MASK = 0x001F_FFFF_FFFF_FFFF
MAIN_CONTAINER = "main"
_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _M64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _M64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _M64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _M64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3 of ``data`` (one compression round, three finalization rounds)."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    tail = len(data) % 8
    for (m,) in struct.iter_unpack("<Q", data[: len(data) - tail]):
        v3 ^= m
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[len(data) - tail :], "little")
    v3 ^= last
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= last
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def object_name(pod_name: str, container_name: str | None = None) -> str:
    """The ``DynamoWorkerMetadata`` name: the pod's, or ``{pod}-{container}`` in container mode."""
    if container_name is None or container_name == MAIN_CONTAINER:
        return pod_name
    return f"{pod_name}-{container_name}"


def instance_id_for(name: str) -> int:
    """The 53-bit instance id Dynamo 1.6.1 derives from an object name (``object_name``)."""
    return siphash13(name.encode() + b"\xff") & INSTANCE_ID_MASK
