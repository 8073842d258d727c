"""Property-based fuzzing of every decoder a peer can reach, with bounded examples.

tests/wire/test_codec.py already feeds arbitrary bytes to the readers; this adds
structure-aware inputs (valid frames with hostile length prefixes, JSON control headers
with arbitrary member types, arbitrary request bodies in both codecs, arbitrary frames on
a call-home socket) and the request policy. Each decoder may only raise its typed error.
Longer, coverage-guided runs: fuzz/ (atheris), not part of ``make test``.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from backend_common.config import DisaggregationMode, EngineConfig
from backend_common.errors import DynamoError
from backend_common.request_policy import check_request
from backend_common.transport.callhome import CallHome
from backend_common.transport.codec import (
    MAX_CONTROL_LEN,
    MAX_MESSAGE_LEN,
    WireError,
    decode_payload,
    decode_two_part,
    encode_request_frame,
    encode_two_part,
    parse_control,
    read_request_frame,
    read_two_part,
)
from backend_common.types import PreprocessedRequest

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


# --- TCP request frame --------------------------------------------------------------------


@FUZZ
@given(
    path=st.text(min_size=1, max_size=40),
    headers=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    body=st.binary(max_size=200),
    cut=st.integers(min_value=0, max_value=400),
    flip=st.tuples(st.integers(min_value=0, max_value=400), st.integers(1, 255)),
)
def test_request_frame_mutations(path, headers, body, cut, flip) -> None:
    frame = bytearray(encode_request_frame(path, headers, body))
    pos, xor = flip
    if pos < len(frame):
        frame[pos] ^= xor
    data = bytes(frame[: max(cut, 1)])

    async def run() -> None:
        try:
            p, h, b = await read_request_frame(reader_of(data))
        except (WireError, asyncio.IncompleteReadError):
            return
        assert isinstance(p, str) and isinstance(h, dict) and isinstance(b, bytes)

    asyncio.run(run())


@pytest.mark.parametrize(
    "prefix",
    [
        b"\x00\x01a\x00\x00" + struct.pack(">I", MAX_MESSAGE_LEN + 1),
        b"\x00\x01a\x00\x00\xff\xff\xff\xff",
    ],
)
async def test_oversized_body_prefix_rejected_before_reading(prefix: bytes) -> None:
    r = asyncio.StreamReader()
    r.feed_data(prefix)  # no EOF, no body: a reader that waited for it would hang
    with pytest.raises(WireError, match="exceeds"):
        await asyncio.wait_for(read_request_frame(r), 1)


async def test_oversized_two_part_prefix_rejected_before_reading() -> None:
    for hlen, blen in ((MAX_CONTROL_LEN + 1, 0), (0, 2**63)):
        r = asyncio.StreamReader()
        r.feed_data(struct.pack(">QQQ", hlen, blen, 0))
        with pytest.raises(WireError, match="exceeds"):
            await asyncio.wait_for(read_two_part(r), 1)


# --- TwoPart message ----------------------------------------------------------------------


@FUZZ
@given(
    header=st.binary(max_size=100),
    body=st.binary(max_size=100),
    lens=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    patch=st.booleans(),
)
def test_two_part_mutations(header, body, lens, patch) -> None:
    msg = encode_two_part(header, body)
    if patch:
        msg = struct.pack(">QQ", *lens) + msg[16:]
    try:
        h, b = decode_two_part(msg)
    except WireError:
        return
    assert h + b == msg[24:]


# --- control header -----------------------------------------------------------------------


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                "id",
                "request_type",
                "response_type",
                "payload_codec",
                "connection_info",
                "metadata",
                "frontend_send_ts_ns",
            ]
        ),
        json_values,
    ),
    info=st.one_of(
        json_values,
        st.dictionaries(st.sampled_from(["address", "subject", "context"]), json_values).map(
            json.dumps
        ),
    ),
    transport=json_values,
)
def test_control_header_any_member_types(fields, info, transport) -> None:
    obj = dict(fields)
    if not isinstance(obj.get("connection_info"), dict):
        obj["connection_info"] = {"transport": transport, "info": info}
    try:
        raw = json.dumps(obj).encode()
    except (ValueError, TypeError):
        return
    try:
        control = parse_control(raw)
    except WireError:
        return
    assert isinstance(control.id, str) and control.payload_codec in ("json", "msgpack")


# --- request body (both codecs) and the request policy --------------------------------------

request_like = st.fixed_dictionaries(
    {"token_ids": st.one_of(st.lists(st.integers(-5, 5000), max_size=8), json_values)},
    optional={
        "stop_conditions": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "max_tokens": st.one_of(st.integers(-1, 2**33), json_values),
                    "min_tokens": st.integers(-1, 5000),
                },
            ),
        ),
        "sampling_options": st.one_of(
            json_values,
            st.dictionaries(
                st.sampled_from(
                    [
                        "temperature",
                        "top_p",
                        "top_k",
                        "min_p",
                        "n",
                        "repetition_penalty",
                        "presence_penalty",
                        "seed",
                    ]
                ),
                st.one_of(st.floats(), st.integers(-3, 3), json_values),
            ),
        ),
        "_HEALTH_CHECK": json_values,
    },
)


@FUZZ
@given(body=request_like, codec=st.sampled_from(["json", "msgpack"]))
def test_request_body_decodes_to_a_request_or_a_typed_error(body, codec) -> None:
    try:
        raw = json.dumps(body).encode() if codec == "json" else msgpack.packb(body)
    except (ValueError, TypeError, OverflowError):
        return
    config = EngineConfig(model="m", context_length=2048, vocab_size=2051)
    try:
        request = PreprocessedRequest.from_dict(decode_payload(raw, codec))
    except (WireError, ValidationError, TypeError, ValueError):
        return
    try:
        checked = check_request(request, config)
    except DynamoError as err:
        assert err.is_invalid_argument
        return
    # What passes the policy is within the limits.
    assert checked.token_ids and max(checked.token_ids) < 2051
    mt = checked.stop_conditions.max_tokens
    assert mt is None or 1 <= mt <= 2048 - len(checked.token_ids)
    t = checked.sampling_options.temperature
    assert t is None or (math.isfinite(t) and t >= 0)


def test_request_policy_examples() -> None:
    cfg = EngineConfig(model="m", context_length=100, vocab_size=50)

    def req(**kw) -> PreprocessedRequest:
        return PreprocessedRequest.from_dict({"token_ids": [1, 2], **kw})

    for bad in (
        {"token_ids": []},
        {"token_ids": [50]},
        {"token_ids": [1] * 100},
        {"stop_conditions": {"max_tokens": 0}},
        {"sampling_options": {"temperature": float("nan")}},
        {"sampling_options": {"temperature": -0.1}},
        {"sampling_options": {"top_p": 0}},
        {"sampling_options": {"min_p": 1.5}},
        {"sampling_options": {"top_k": -2}},
        {"sampling_options": {"repetition_penalty": 0}},
        {"sampling_options": {"presence_penalty": 2.5}},
        {"sampling_options": {"n": 0}},
    ):
        with pytest.raises(DynamoError) as info:
            check_request(req(**bad), cfg)
        assert info.value.is_invalid_argument
    clamped = check_request(req(stop_conditions={"max_tokens": 10**6, "min_tokens": 10**6}), cfg)
    assert clamped.stop_conditions.max_tokens == 98
    assert clamped.stop_conditions.min_tokens == 98
    assert clamped.to_dict()["stop_conditions"]["max_tokens"] == 98
    # Unknown limits are not checked; encode workers may get no tokens.
    assert check_request(req(token_ids=[10**6]), EngineConfig(model="m"))
    assert check_request(req(token_ids=[]), None, DisaggregationMode.ENCODE)


# --- call-home control messages (frontend -> worker) ---------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=60),
            st.tuples(st.binary(max_size=30), st.binary(max_size=30)).map(
                lambda hb: encode_two_part(*hb)
            ),
            st.sampled_from(
                [
                    encode_two_part(b'"stop"', b""),
                    encode_two_part(b'"kill"', b""),
                    struct.pack(">QQQ", 2**40, 0, 0),
                ]
            ),
        ),
        max_size=5,
    )
)
def test_call_home_survives_any_frontend_bytes(frames) -> None:
    async def run() -> None:
        seen: list[str] = []

        async def fe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for f in frames:
                w.write(f)
            await w.drain()
            w.close()

        server = await asyncio.start_server(fe, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            home = await CallHome.connect(f"127.0.0.1:{port}", "s", "json", on_control=seen.append)
            home.send_prologue()
            for _ in range(100):  # bounded: the peer closes after its frames
                if home.closed:
                    break
                await asyncio.sleep(0.01)
            assert home.closed
            home.send_item({"data": {"token_ids": [1]}})  # dropped, never raises
            await home.finish()
            assert set(seen) <= {"stop", "kill"} and seen[-1] == "kill"
        finally:
            server.close()

    asyncio.run(run())
