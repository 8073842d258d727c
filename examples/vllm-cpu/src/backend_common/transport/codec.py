"""Byte-level framing of the Dynamo 1.6.x request and response planes.

The formats: docs/wire-protocol.md#tcp-request-plane, docs/wire-protocol.md#request-body,
docs/wire-protocol.md#response-stream-call-home.

Pure functions and ``asyncio.StreamReader`` readers, no sockets of their own:

* request frame (FE → W, TCP request plane): ``u16 plen | path | u16 hlen | headers JSON |
  u32 blen | body``; answered by an ACK ``u32 len | bytes`` (empty = accepted);
* TwoPart message (request body, NATS payload, every call-home frame):
  ``u64 hlen | u64 blen | u64 checksum | header | body``;
* the JSON control header of a request (``RequestControlMessage``) and the payload codecs;
* the call-home frames a worker sends: handshake, prologue, items, ``complete_final``, sentinel.

Invariants:

* All integers are big-endian. Every length prefix is checked against its limit *before* the
  payload is read or allocated, so a hostile prefix costs nothing.
* Anything malformed raises ``WireError`` (a ``ValueError``) naming what is wrong; a reader also
  lets ``asyncio.IncompleteReadError`` through when the peer closes mid-frame (or before one).
* Checksums are always sent as 0, as 1.6.1 release builds do. A non-zero checksum (debug builds
  of Dynamo) is accepted without verification: it is an xxh3-64 no maintained dependency of this
  package provides, and TCP already guards integrity.
* ``item_frame`` runs once per streamed item, so it builds a frame with a single join of
  precomputed pieces around one ``json.dumps`` / ``msgpack.packb`` call.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = [
    "CODECS",
    "MAX_CONTROL_LEN",
    "MAX_HEADERS_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_PATH_LEN",
    "ControlMessage",
    "WireError",
    "decode_payload",
    "decode_two_part",
    "encode_ack",
    "encode_control",
    "encode_payload",
    "encode_request_frame",
    "encode_two_part",
    "final_frame",
    "handshake_frame",
    "item_frame",
    "parse_control",
    "prologue_frame",
    "token_item_frame",
    "read_ack",
    "read_request_frame",
    "read_two_part",
    "sentinel_frame",
    "split_address",
]


class WireError(ValueError):
    """Malformed or oversized input on the wire; the message says what is wrong."""


MAX_PATH_LEN = 1024
"""Longest request-frame path in bytes (Dynamo's limit)."""
MAX_HEADERS_LEN = 64 * 1024
"""Longest request-frame header block (the u16 prefix cannot exceed it anyway)."""
MAX_CONTROL_LEN = 128 * 1024
"""Longest TwoPart header: the JSON control message, or a call-home control frame."""
MAX_MESSAGE_LEN = 32 * 1024 * 1024
"""Default longest request body / TwoPart body (32 MiB). The worker passes its own bound,
``WorkerConfig.max_message_size`` (``DYN_TCP_MAX_MESSAGE_SIZE``), to the readers."""

CODECS = ("json", "msgpack")

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TWO_PART = struct.Struct(">QQQ")
_ZERO8 = bytes(8)
_JSON_SEPARATORS = (",", ":")

# ---------------------------------------------------------------------------------------------
# Request frame and ACK (docs/wire-protocol.md#request-frame, docs/wire-protocol.md#ack)


def encode_request_frame(path: str, headers: dict[str, str], body: bytes) -> bytes:
    """Build one request frame as the frontend sends it (used by tests and fake frontends)."""
    p = path.encode("utf-8")
    h = json.dumps(headers, separators=_JSON_SEPARATORS).encode("utf-8") if headers else b""
    if not 1 <= len(p) <= MAX_PATH_LEN:
        raise WireError(f"path length {len(p)} outside 1..{MAX_PATH_LEN}")
    if len(h) > min(MAX_HEADERS_LEN, 0xFFFF):
        raise WireError(f"headers length {len(h)} exceeds {min(MAX_HEADERS_LEN, 0xFFFF)}")
    if len(body) > MAX_MESSAGE_LEN:
        raise WireError(f"body length {len(body)} exceeds {MAX_MESSAGE_LEN}")
    return b"".join((_U16.pack(len(p)), p, _U16.pack(len(h)), h, _U32.pack(len(body)), body))


def _parse_headers(raw: bytes) -> dict[str, str]:
    # Dynamo treats headers it cannot parse as a string map as absent, never as an error.
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
        return {}
    return obj


async def read_request_frame(
    reader: asyncio.StreamReader, *, max_body: int = MAX_MESSAGE_LEN
) -> tuple[str, dict[str, str], bytes]:
    """Read one request frame: ``(path, headers, body)``.

    Raises ``WireError`` for a bad path length, a path that is not UTF-8, or a body longer than
    ``max_body`` (checked before the body is read); ``asyncio.IncompleteReadError`` when
    the stream ends first (``partial == b""`` at a frame boundary means a clean close).
    """
    (plen,) = _U16.unpack(await reader.readexactly(2))
    if not 1 <= plen <= MAX_PATH_LEN:
        raise WireError(f"request path length {plen} outside 1..{MAX_PATH_LEN}")
    raw_path = await reader.readexactly(plen)
    try:
        path = raw_path.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"request path is not UTF-8: {exc}") from None
    (hlen,) = _U16.unpack(await reader.readexactly(2))
    if hlen > MAX_HEADERS_LEN:  # unreachable with a u16 prefix; kept as the stated limit
        raise WireError(f"request headers length {hlen} exceeds {MAX_HEADERS_LEN}")
    headers = _parse_headers(await reader.readexactly(hlen)) if hlen else {}
    (blen,) = _U32.unpack(await reader.readexactly(4))
    if blen > max_body:
        raise WireError(f"request body length {blen} exceeds the maximum {max_body}")
    body = await reader.readexactly(blen) if blen else b""
    return path, headers, body


def encode_ack(error: str | None = None) -> bytes:
    """ACK frame: empty (accepted) or an error string (``"Server unavailable: ..."`` etc.)."""
    if not error:
        return _U32.pack(0)
    data = error.encode("utf-8")
    return _U32.pack(len(data)) + data


async def read_ack(reader: asyncio.StreamReader) -> str | None:
    """Read one ACK: ``None`` when accepted, else the error string."""
    (n,) = _U32.unpack(await reader.readexactly(4))
    if n == 0:
        return None
    if n > MAX_CONTROL_LEN:
        raise WireError(f"ACK length {n} exceeds {MAX_CONTROL_LEN}")
    data = await reader.readexactly(n)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"ACK is not UTF-8: {exc}") from None


# ---------------------------------------------------------------------------------------------
# TwoPart (docs/wire-protocol.md#twopart-message)


def encode_two_part(header: bytes, body: bytes) -> bytes:
    """``u64 hlen | u64 blen | u64 checksum=0 | header | body``."""
    return b"".join((_TWO_PART.pack(len(header), len(body), 0), header, body))


def _check_two_part_lengths(hlen: int, blen: int, max_header: int, max_body: int) -> None:
    if hlen > max_header:
        raise WireError(f"TwoPart header length {hlen} exceeds {max_header}")
    if blen > max_body:
        raise WireError(f"TwoPart body length {blen} exceeds {max_body}")


def decode_two_part(
    data: bytes, *, max_header: int = MAX_CONTROL_LEN, max_body: int = MAX_MESSAGE_LEN
) -> tuple[bytes, bytes]:
    """Split a complete TwoPart message into ``(header, body)``; the length must match exactly."""
    if len(data) < _TWO_PART.size:
        raise WireError(f"TwoPart message of {len(data)} bytes is shorter than its 24-byte prefix")
    hlen, blen, _checksum = _TWO_PART.unpack_from(data)
    _check_two_part_lengths(hlen, blen, max_header, max_body)
    end = _TWO_PART.size + hlen + blen
    if end != len(data):
        raise WireError(
            f"TwoPart lengths {hlen}+{blen} do not match the {len(data) - _TWO_PART.size}"
            " bytes after the prefix"
        )
    mid = _TWO_PART.size + hlen
    return bytes(data[_TWO_PART.size : mid]), bytes(data[mid:end])


async def read_two_part(
    reader: asyncio.StreamReader,
    *,
    max_header: int = MAX_CONTROL_LEN,
    max_body: int = MAX_MESSAGE_LEN,
) -> tuple[bytes, bytes]:
    """Read one TwoPart frame from a stream (call-home socket); lengths checked before reading."""
    hlen, blen, _checksum = _TWO_PART.unpack(await reader.readexactly(_TWO_PART.size))
    _check_two_part_lengths(hlen, blen, max_header, max_body)
    header = await reader.readexactly(hlen) if hlen else b""
    body = await reader.readexactly(blen) if blen else b""
    return header, body


# ---------------------------------------------------------------------------------------------
# Control message (docs/wire-protocol.md#control-header)


@dataclass
class ControlMessage:
    """The JSON ``RequestControlMessage`` at the head of every request body.

    ``transport``/``address``/``subject``/``context`` come from ``connection_info``, whose
    ``info`` is itself a JSON *string*. ``address`` is ``"ip:port"`` of the frontend's call-home
    listener; ``subject`` is echoed in the handshake; ``context`` equals ``id`` in 1.6.1.
    """

    id: str
    request_type: str = "single_in"
    response_type: str = "many_out"
    payload_codec: str = "json"
    transport: str = "tcp_server"
    address: str = ""
    subject: str = ""
    context: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    frontend_send_ts_ns: int | None = None

    def to_json(self) -> bytes:
        """Encode as the 1.6.1 frontend does (``info`` as an embedded JSON string)."""
        info = {
            "address": self.address,
            "subject": self.subject,
            "context": self.context or self.id,
            "stream_type": "response",
        }
        obj: dict[str, Any] = {
            "id": self.id,
            "request_type": self.request_type,
            "response_type": self.response_type,
            "payload_codec": self.payload_codec,
            "connection_info": {
                "transport": self.transport,
                "info": json.dumps(info, separators=_JSON_SEPARATORS),
            },
        }
        if self.metadata:
            obj["metadata"] = self.metadata
        if self.frontend_send_ts_ns is not None:
            obj["frontend_send_ts_ns"] = self.frontend_send_ts_ns
        return json.dumps(obj, separators=_JSON_SEPARATORS).encode("utf-8")


def encode_control(msg: ControlMessage | None = None, /, **fields: Any) -> bytes:
    """``encode_control(msg)`` or ``encode_control(id=..., address=..., subject=..., ...)``."""
    if msg is None:
        msg = ControlMessage(**fields)
    elif fields:
        raise TypeError("pass either a ControlMessage or keyword fields, not both")
    return msg.to_json()


def _str_field(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise WireError(f"{where}: missing '{key}'")
    if not isinstance(value, str):
        raise WireError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_control(header: bytes) -> ControlMessage:
    """Parse and validate the control header of a request body (TwoPart header).

    Raises ``WireError`` for non-JSON, missing/mistyped fields, an unknown ``payload_codec``, or
    a ``tcp_server`` connection without address/subject. Another transport (``quic``) parses;
    the caller decides what to do with it (1.6.1 ACKs and never calls home).
    """
    if len(header) > MAX_CONTROL_LEN:
        raise WireError(f"control header length {len(header)} exceeds {MAX_CONTROL_LEN}")
    if not header:
        raise WireError("request has no control header")
    try:
        obj = json.loads(header)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"control header is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("control header is not a JSON object")
    where = "control header"
    codec = _str_field(obj, "payload_codec", where, "json")
    if codec not in CODECS:
        raise WireError(f"control header: unknown payload_codec {codec!r}")
    conn = obj.get("connection_info")
    if not isinstance(conn, dict):
        raise WireError("control header: 'connection_info' must be an object")
    transport = _str_field(conn, "transport", "connection_info")
    info_raw = conn.get("info")
    if isinstance(info_raw, str):
        try:
            info = json.loads(info_raw)
        except (ValueError, RecursionError) as exc:
            raise WireError(f"connection_info.info is not JSON: {exc}") from None
    else:
        info = info_raw  # tolerate an already-decoded object
    if not isinstance(info, dict):
        raise WireError("connection_info.info must be a JSON object (as a string)")
    msg_id = _str_field(obj, "id", where)
    address = _str_field(info, "address", "connection_info.info", "")
    subject = _str_field(info, "subject", "connection_info.info", "")
    if transport == "tcp_server" and not (address and subject):
        raise WireError("connection_info.info: tcp_server needs 'address' and 'subject'")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise WireError("control header: 'metadata' must be an object")
    ts = obj.get("frontend_send_ts_ns")
    return ControlMessage(
        id=msg_id,
        request_type=_str_field(obj, "request_type", where),
        response_type=_str_field(obj, "response_type", where),
        payload_codec=codec,
        transport=transport,
        address=address,
        subject=subject,
        context=_str_field(info, "context", "connection_info.info", msg_id),
        metadata=metadata,
        frontend_send_ts_ns=ts if isinstance(ts, int) and not isinstance(ts, bool) else None,
    )


def split_address(address: str) -> tuple[str, int]:
    """``"ip:port"`` / ``"[v6]:port"`` (optionally ``tcp://``-prefixed) → ``(host, port)``."""
    addr = address.removeprefix("tcp://")
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise WireError(f"bad address {address!r}: expected ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if not 0 < port < 65536:
        raise WireError(f"bad address {address!r}: port out of range")
    return host, port


# ---------------------------------------------------------------------------------------------
# Payload codecs (docs/wire-protocol.md#payload-codecs)


def _finite(obj: Any) -> Any:
    """Replace NaN/±inf by None, as serde_json does (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# One reusable encoder: json.dumps with non-default options builds a new encoder per call, which
# is most of the cost of a small per-token item. No circular check (a cycle ends in a
# RecursionError, reported like any unencodable value); raw UTF-8 like serde_json.
_JSON_ENCODER = json.JSONEncoder(
    separators=_JSON_SEPARATORS, ensure_ascii=False, allow_nan=False, check_circular=False
)


def _dumps_json(obj: Any) -> bytes:
    try:
        text = _JSON_ENCODER.encode(obj)
    except ValueError as exc:
        if "JSON compliant" not in str(exc):
            raise WireError(f"cannot encode payload as JSON: {exc}") from None
        # Rare path: a non-finite float (e.g. a -inf logprob); serde_json would write null.
        return _dumps_json(_finite(obj))
    except (TypeError, RecursionError) as exc:
        raise WireError(f"cannot encode payload as JSON: {exc}") from None
    return text.encode("utf-8")


def _packb(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode payload as msgpack: {exc}") from None


def encode_payload(obj: Any, codec: str) -> bytes:
    """Encode a request body or response item with ``codec`` (``json`` or ``msgpack``)."""
    if codec == "json":
        return _dumps_json(obj)
    if codec == "msgpack":
        return _packb(obj)
    raise WireError(f"unknown payload codec {codec!r}")


def decode_payload(body: bytes, codec: str) -> Any:
    """Decode a payload; ``WireError`` for an unknown codec or undecodable bytes."""
    if codec == "json":
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise WireError(f"payload is not valid JSON: {exc}") from None
    if codec == "msgpack":
        try:
            return msgpack.unpackb(body, raw=False)
        except (ValueError, TypeError, RecursionError) as exc:
            # ExtraData/FormatError/StackError/UnicodeDecodeError are ValueErrors; unhashable
            # map keys are TypeErrors.
            raise WireError(f"payload is not valid msgpack: {exc}") from None
    raise WireError(f"unknown payload codec {codec!r}")


# ---------------------------------------------------------------------------------------------
# Call-home frames, worker → frontend (docs/wire-protocol.md#frame-sequence)


def _header_frame(obj: Any) -> bytes:
    h = json.dumps(obj, separators=_JSON_SEPARATORS).encode("utf-8")
    return b"".join((len(h).to_bytes(8, "big"), _ZERO8, _ZERO8, h))


def handshake_frame(subject: str) -> bytes:
    """Header-only ``{"subject": ..., "stream_type": "response"}``: the first call-home frame."""
    return _header_frame({"subject": subject, "stream_type": "response"})


def prologue_frame(error: str | None = None, typed_error: dict[str, Any] | None = None) -> bytes:
    """Header-only ``{"error": null}`` (OK) or ``{"error": msg[, "typed_error": {...}]}``."""
    obj: dict[str, Any] = {"error": error}
    if typed_error is not None:
        if error is None:
            raise ValueError("typed_error needs an error message")
        obj["typed_error"] = typed_error
    return _header_frame(obj)


_JSON_ITEM_HEAD = b'{"data":'
_JSON_ITEM_TAIL = b',"complete_final":false}'
# msgpack map(2) {"data": <item>, "complete_final": false}, key order as rmp_serde writes it.
_MSGPACK_ITEM_HEAD = b"\x82\xa4data"
_MSGPACK_ITEM_TAIL = b"\xaecomplete_final\xc2"


def _data_frame(*parts: bytes) -> bytes:
    blen = sum(len(p) for p in parts)
    return b"".join((_ZERO8, blen.to_bytes(8, "big"), _ZERO8, *parts))


_FINAL = {
    "json": _data_frame(b'{"complete_final":true}'),
    "msgpack": _data_frame(b"\x81\xaecomplete_final\xc3"),
}
_SENTINEL = _header_frame("sentinel")


def item_frame(item: dict[str, Any], codec: str) -> bytes:
    """Data-only ``{"data": item, "complete_final": false}``; ``item`` is the Annotated object.

    ``WireError`` if the item cannot be encoded or the codec is unknown.
    """
    if codec == "json":
        payload = _dumps_json(item)
        head, tail = _JSON_ITEM_HEAD, _JSON_ITEM_TAIL
    elif codec == "msgpack":
        payload = _packb(item)
        head, tail = _MSGPACK_ITEM_HEAD, _MSGPACK_ITEM_TAIL
    else:
        raise WireError(f"unknown payload codec {codec!r}")
    blen = len(head) + len(payload) + len(tail)
    return b"".join((_ZERO8, blen.to_bytes(8, "big"), _ZERO8, head, payload, tail))


def token_item_frame(token_ids: list[int], codec: str) -> bytes:
    """``item_frame({"data": {"token_ids": token_ids}}, codec)``, byte for byte, built
    without the dict and the encoder for JSON: the frame of almost every item of a stream."""
    if codec != "json" or not all(type(t) is int for t in token_ids):
        return item_frame({"data": {"token_ids": token_ids}}, codec)
    body = _JSON_TOKEN_ITEM % ",".join(map(str, token_ids)).encode("ascii")
    return b"".join((_ZERO8, len(body).to_bytes(8, "big"), _ZERO8, body))


_JSON_TOKEN_ITEM = b'{"data":{"data":{"token_ids":[%s]}},"complete_final":false}'


def final_frame(codec: str) -> bytes:
    """Data-only ``{"complete_final": true}`` (23 bytes JSON, 17 bytes msgpack)."""
    try:
        return _FINAL[codec]
    except KeyError:
        raise WireError(f"unknown payload codec {codec!r}") from None


def sentinel_frame() -> bytes:
    """Header-only JSON string ``"sentinel"``: the last frame of a stream."""
    return _SENTINEL
