"""Byte-level tests of backend_common.transport.codec against bytes captured from the real
1.6.1 frontend and worker."""

from __future__ import annotations

import asyncio
import json
import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_common.transport import codec
from backend_common.transport.codec import (
    MAX_MESSAGE_LEN,
    ControlMessage,
    WireError,
    decode_payload,
    decode_two_part,
    encode_ack,
    encode_control,
    encode_payload,
    encode_request_frame,
    encode_two_part,
    final_frame,
    handshake_frame,
    item_frame,
    parse_control,
    prologue_frame,
    read_ack,
    read_request_frame,
    read_two_part,
    sentinel_frame,
    split_address,
)

# §10.4 (a): NATS request, msgpack codec (header verbatim from the capture, 348 bytes).
NATS_HEADER = (
    b'{"id":"1cfdf32e-658a-41ee-91ae-67d6597221f5","request_type":"single_in",'
    b'"response_type":"many_out","payload_codec":"msgpack",'
    b'"connection_info":{"transport":"tcp_server",'
    b'"info":"{\\"address\\":\\"127.0.0.1:43417\\",'
    b'\\"subject\\":\\"8864a808-4a09-4605-b3dc-e56263fb28a0\\",'
    b'\\"context\\":\\"1cfdf32e-658a-41ee-91ae-67d6597221f5\\",\\"stream_type\\":\\"response\\"}"}}'
)
# §10.4 (b): TCP request, json codec.
TCP_HEADER = (
    b'{"id":"8b799880-bc2d-4375-bb86-416f857caad7","request_type":"single_in",'
    b'"response_type":"many_out","payload_codec":"json",'
    b'"connection_info":{"transport":"tcp_server",'
    b'"info":"{\\"address\\":\\"127.0.0.1:33693\\",'
    b'\\"subject\\":\\"2f420d65-63df-4aad-b777-a3ab96e7cb14\\",'
    b'\\"context\\":\\"8b799880-bc2d-4375-bb86-416f857caad7\\",\\"stream_type\\":\\"response\\"}"}}'
)
NATS_BODY = {
    "model": "test-model",
    "token_ids": [1001, 1000, 1000, 5, 6, 1000, 1000, 1000],
    "stop_conditions": {
        "max_tokens": 4,
        "stop": None,
        "stop_token_ids": None,
        "stop_token_ids_visible": None,
        "stop_token_ids_hidden": [1002],
        "min_tokens": None,
        "ignore_eos": None,
        "max_thinking_tokens": None,
    },
    "sampling_options": {
        k: None
        for k in (
            "n best_of presence_penalty frequency_penalty repetition_penalty temperature top_p"
            " top_k min_p use_beam_search length_penalty seed include_stop_str_in_output"
            " guided_decoding"
        ).split()
    },
    "output_options": {
        k: None
        for k in (
            "logprobs prompt_logprobs skip_special_tokens formatted_prompt"
            " return_tokens_as_token_ids"
        ).split()
    },
    "eos_token_ids": [1002],
    "mdc_sum": "97be43526065c0f6046b920ede6ef87444cdcd4b24b2485d9c6c8f64dfb9a711",
    "annotations": [],
    "routing": {},
    "router_config_override": None,
}


def stream_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# --- control header ---------------------------------------------------------------------------


def test_captured_nats_header_parses() -> None:
    assert len(NATS_HEADER) == 348
    msg = parse_control(NATS_HEADER)
    assert msg.id == "1cfdf32e-658a-41ee-91ae-67d6597221f5"
    assert msg.request_type == "single_in"
    assert msg.response_type == "many_out"
    assert msg.payload_codec == "msgpack"
    assert msg.transport == "tcp_server"
    assert msg.address == "127.0.0.1:43417"
    assert msg.subject == "8864a808-4a09-4605-b3dc-e56263fb28a0"
    assert msg.context == msg.id
    assert msg.metadata == {}


def test_captured_tcp_header_parses() -> None:
    msg = parse_control(TCP_HEADER)
    assert msg.payload_codec == "json"
    assert msg.address == "127.0.0.1:33693"
    assert msg.subject == "2f420d65-63df-4aad-b777-a3ab96e7cb14"
    assert msg.context == "8b799880-bc2d-4375-bb86-416f857caad7"


def test_control_to_json_is_the_frontend_format_and_round_trips() -> None:
    original = parse_control(TCP_HEADER)
    assert original.to_json() == TCP_HEADER
    assert encode_control(original) == TCP_HEADER
    built = encode_control(
        id="r1", address="127.0.0.1:9", subject="s1", payload_codec="msgpack", metadata={"a": 1}
    )
    again = parse_control(built)
    assert again == ControlMessage(
        id="r1",
        address="127.0.0.1:9",
        subject="s1",
        context="r1",
        payload_codec="msgpack",
        metadata={"a": 1},
    )
    with pytest.raises(TypeError):
        encode_control(original, id="x")


def test_control_defaults_codec_to_json_and_accepts_quic() -> None:
    obj = json.loads(TCP_HEADER)
    del obj["payload_codec"]
    obj["connection_info"] = {"transport": "quic", "info": "{}"}
    msg = parse_control(json.dumps(obj).encode())
    assert msg.payload_codec == "json"
    assert msg.transport == "quic"
    assert msg.address == ""


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda o: o.pop("id"), "'id'"),
        (lambda o: o.update(id=5), "'id' must be a string"),
        (lambda o: o.update(payload_codec="cbor"), "payload_codec"),
        (lambda o: o.pop("connection_info"), "connection_info"),
        (lambda o: o["connection_info"].update(info="not json"), "not JSON"),
        (lambda o: o["connection_info"].update(info="[1]"), "JSON object"),
        (lambda o: o["connection_info"].update(info='{"address":"1.2.3.4:5"}'), "subject"),
        (lambda o: o.update(metadata=[1]), "metadata"),
    ],
)
def test_control_rejects_bad_fields(mutate, needle: str) -> None:
    obj = json.loads(TCP_HEADER)
    mutate(obj)
    with pytest.raises(WireError, match=needle):
        parse_control(json.dumps(obj).encode())


@pytest.mark.parametrize(
    "header", [b"", b"{", b"[]", b'"x"', b"\xff\xfe", b"[" * 100_000, b" " * (128 * 1024 + 1)]
)
def test_control_rejects_garbage(header: bytes) -> None:
    with pytest.raises(WireError):
        parse_control(header)


def test_split_address() -> None:
    assert split_address("127.0.0.1:43417") == ("127.0.0.1", 43417)
    assert split_address("tcp://[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "h:0", "h:x", "h:70000"):
        with pytest.raises(WireError):
            split_address(bad)


# --- TwoPart -------------------------------------------------------------------------------


def test_two_part_captured_prefix() -> None:
    body = encode_payload(NATS_BODY, "msgpack")
    assert len(body) == 648  # the captured body length: same map, same encoding as rmp_serde
    assert body[:7] == b"\x8a\xa5model"
    frame = encode_two_part(NATS_HEADER, body)
    assert frame[:24].hex() == "000000000000015c00000000000002880000000000000000"
    assert len(frame) == 1020
    header, decoded = decode_two_part(frame)
    assert header == NATS_HEADER
    assert decode_payload(decoded, "msgpack") == NATS_BODY


async def test_two_part_stream_round_trip_and_nonzero_checksum() -> None:
    frame = encode_two_part(b"h" * 5, b"b" * 7)
    reader = stream_of(frame + frame)
    assert await read_two_part(reader) == (b"hhhhh", b"bbbbbbb")
    assert await read_two_part(reader) == (b"hhhhh", b"bbbbbbb")
    with pytest.raises(asyncio.IncompleteReadError):
        await read_two_part(reader)
    # A debug-build checksum is accepted (not verified).
    checked = struct.pack(">QQQ", 1, 1, 0xDEADBEEF) + b"hb"
    assert decode_two_part(checked) == (b"h", b"b")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(23),
        struct.pack(">QQQ", 5, 0, 0) + b"abcd",  # truncated header
        struct.pack(">QQQ", 0, 3, 0) + b"abcd",  # trailing byte
        struct.pack(">QQQ", 2**63, 0, 0),
        struct.pack(">QQQ", 0, 2**64 - 1, 0),
    ],
)
def test_decode_two_part_rejects(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_two_part(data)


async def test_read_two_part_rejects_huge_prefix_without_allocating() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="body length"):
            await read_two_part(stream_of(struct.pack(">QQQ", 0, 2**40, 0), eof=False))
        with pytest.raises(WireError, match="header length"):
            await read_two_part(stream_of(struct.pack(">QQQ", 2**32, 0, 0), eof=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


# --- request frame and ACK ---------------------------------------------------------------


async def test_request_frame_round_trip_pipelined() -> None:
    headers = {"x-endpoint-path": "2040a21ade515d34/wiretest/pyworker/generate", "request-id": "r"}
    f1 = encode_request_frame("2040a21ade515d34/wiretest/pyworker/generate", headers, b"body1")
    f2 = encode_request_frame("p/ü", {}, b"")
    assert f1[:2] == struct.pack(">H", 43)
    reader = stream_of(f1 + f2)
    assert await read_request_frame(reader) == (
        "2040a21ade515d34/wiretest/pyworker/generate",
        headers,
        b"body1",
    )
    assert await read_request_frame(reader) == ("p/ü", {}, b"")
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await read_request_frame(reader)
    assert info.value.partial == b""


def raw_frame(path: bytes, headers: bytes, body: bytes, blen: int | None = None) -> bytes:
    n = len(body) if blen is None else blen
    return (
        struct.pack(">H", len(path)) + path + struct.pack(">H", len(headers)) + headers
        + struct.pack(">I", n) + body
    )  # fmt: skip


@pytest.mark.parametrize("headers", [b"{not json", b"[1,2]", b'{"a":1}', b"\xff"])
async def test_unparsable_headers_become_empty(headers: bytes) -> None:
    frame = raw_frame(b"a/b", headers, b"x")
    assert await read_request_frame(stream_of(frame)) == ("a/b", {}, b"x")


async def test_request_frame_rejects_bad_utf8_path() -> None:
    with pytest.raises(WireError, match="UTF-8"):
        await read_request_frame(stream_of(raw_frame(b"\xff\xfe", b"", b"")))


@pytest.mark.parametrize("plen", [0, 1025, 0xFFFF])
async def test_request_frame_rejects_path_length(plen: int) -> None:
    with pytest.raises(WireError, match="path length"):
        await read_request_frame(stream_of(struct.pack(">H", plen) + b"a" * 10))


async def test_request_frame_rejects_4gib_body_before_reading() -> None:
    # A 4 GiB length with a tiny, still-open stream: must fail at once, not wait or allocate.
    data = raw_frame(b"a/b", b"", b"", blen=0xFFFFFFFF)
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="body length"):
            await asyncio.wait_for(read_request_frame(stream_of(data, eof=False)), 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert MAX_MESSAGE_LEN < 0xFFFFFFFF


async def test_truncated_request_frame() -> None:
    frame = encode_request_frame("a/b", {"k": "v"}, b"0123456789")
    for cut in (1, 3, 6, len(frame) - 1):
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await read_request_frame(stream_of(frame[:cut]))
        assert info.value.partial or cut in (1, 3, 6)


def test_encode_request_frame_limits() -> None:
    with pytest.raises(WireError):
        encode_request_frame("", {}, b"")
    with pytest.raises(WireError):
        encode_request_frame("a" * 1025, {}, b"")


async def test_ack_round_trip() -> None:
    assert encode_ack() == b"\x00\x00\x00\x00"
    msg = "Server unavailable: unknown endpoint ffff/spec/sample/nope"
    reader = stream_of(encode_ack() + encode_ack(msg))
    assert await read_ack(reader) is None
    assert await read_ack(reader) == msg
    with pytest.raises(WireError):
        await read_ack(stream_of(struct.pack(">I", 2**31), eof=False))
    with pytest.raises(WireError):
        await read_ack(stream_of(struct.pack(">I", 1) + b"\xff"))


# --- payloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", ["json", "msgpack"])
def test_payload_round_trip(codec_name: str) -> None:
    assert decode_payload(encode_payload(NATS_BODY, codec_name), codec_name) == NATS_BODY


def test_json_payload_is_compact_utf8_and_nonfinite_becomes_null() -> None:
    assert encode_payload({"a": [1, None], "t": "é"}, "json") == '{"a":[1,null],"t":"é"}'.encode()
    out = encode_payload({"log_probs": [float("-inf"), 0.5], "x": (float("nan"),)}, "json")
    assert json.loads(out) == {"log_probs": [None, 0.5], "x": [None]}


@pytest.mark.parametrize("codec_name", ["json", "msgpack"])
def test_payload_errors(codec_name: str) -> None:
    with pytest.raises(WireError):
        encode_payload({"a": object()}, codec_name)
    with pytest.raises(WireError):
        decode_payload(b"\xc1" if codec_name == "msgpack" else b"{", codec_name)
    with pytest.raises(WireError):
        decode_payload(b"\xa2\xff\xfe" if codec_name == "msgpack" else b'"\xff"', codec_name)


def test_msgpack_extra_data_and_bad_keys_rejected() -> None:
    with pytest.raises(WireError):
        decode_payload(msgpack.packb(1) + msgpack.packb(2), "msgpack")
    with pytest.raises(WireError):
        decode_payload(b"\x81\x91\x01\x01", "msgpack")  # map with an array key


def test_unknown_codec() -> None:
    for fn in (lambda: encode_payload({}, "cbor"), lambda: decode_payload(b"{}", "cbor")):
        with pytest.raises(WireError, match="unknown payload codec"):
            fn()
    with pytest.raises(WireError):
        item_frame({}, "cbor")
    with pytest.raises(WireError):
        final_frame("cbor")


# --- call-home frames (§10.5) --------------------------------------------------------------


CAPTURED_ITEM_1 = (
    b'{"data":{"data":{"token_ids":[1],"tokens":null,"text":null,"output_type":"text",'
    b'"cum_log_probs":null,"log_probs":null,"top_logprobs":null,"finish_reason":null,"index":0}},'
    b'"complete_final":false}'
)
CAPTURED_ITEM_3 = (
    b'{"data":{"data":{"token_ids":[3],"tokens":null,"text":null,"output_type":"text",'
    b'"cum_log_probs":null,"log_probs":null,"top_logprobs":null,"finish_reason":"length",'
    b'"index":0,"completion_usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}},'
    b'"complete_final":false}'
)


def output(token: int, **extra: object) -> dict:
    out: dict = {"token_ids": [token], "tokens": None, "text": None, "output_type": "text"}
    out |= {"cum_log_probs": None, "log_probs": None, "top_logprobs": None}
    out |= {"finish_reason": None, "index": 0}
    return out | extra


def test_captured_json_call_home_sequence() -> None:
    subject = "b06b1645-b567-4132-b236-65ce467737a1"
    hs = handshake_frame(subject)
    assert hs[:24].hex() == "000000000000004b" + "00" * 16
    assert hs[24:] == f'{{"subject":"{subject}","stream_type":"response"}}'.encode()
    pro = prologue_frame()
    assert pro[:24].hex() == "000000000000000e" + "00" * 16
    assert pro[24:] == b'{"error":null}'
    item = item_frame({"data": output(1)}, "json")
    assert item[:24].hex() == "000000000000000000000000000000c20000000000000000"
    assert item[24:] == CAPTURED_ITEM_1
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    last = item_frame({"data": output(3, finish_reason="length", completion_usage=usage)}, "json")
    assert last[:24] == struct.pack(">QQQ", 0, 276, 0)
    assert last[24:] == CAPTURED_ITEM_3
    assert final_frame("json") == struct.pack(">QQQ", 0, 23, 0) + b'{"complete_final":true}'
    assert sentinel_frame() == struct.pack(">QQQ", 10, 0, 0) + b'"sentinel"'


def test_captured_msgpack_call_home_frames() -> None:
    frame = item_frame({"data": output(7)}, "msgpack")
    body = frame[24:]
    assert frame[:24] == struct.pack(">QQQ", 0, len(body), 0)
    assert len(body) == 134  # the captured first item: 9-field output, one small token id
    assert body.startswith(bytes.fromhex("82a46461746181a46461746189a9746f"))
    assert decode_payload(body, "msgpack") == {"data": {"data": output(7)}, "complete_final": False}
    fin = final_frame("msgpack")
    assert fin[24:] == bytes.fromhex("81ae636f6d706c6574655f66696e616cc3")
    assert len(fin[24:]) == 17
    assert fin[:24] == struct.pack(">QQQ", 0, 17, 0)


def test_error_prologue_and_error_item() -> None:
    typed = {"error_type": "InvalidArgument", "message": "bad"}
    header, body = decode_two_part(prologue_frame("bad", typed))
    assert body == b""
    assert json.loads(header) == {"error": "bad", "typed_error": typed}
    with pytest.raises(ValueError):
        prologue_frame(None, typed)
    _, body = decode_two_part(item_frame({"event": "error", "comment": ["boom"]}, "json"))
    assert json.loads(body) == {
        "data": {"event": "error", "comment": ["boom"]},
        "complete_final": False,
    }


def test_item_frame_bad_item_is_wire_error() -> None:
    with pytest.raises(WireError):
        item_frame({"data": {"x": {1, 2}}}, "json")
    with pytest.raises(WireError):
        item_frame({"data": {"x": {1, 2}}}, "msgpack")
    cycle: list = []
    cycle.append(cycle)
    for name in ("json", "msgpack"):
        with pytest.raises(WireError):
            item_frame({"data": {"x": cycle}}, name)


# --- property: arbitrary bytes never crash a reader ----------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x00\x03a/b\x00\x00"]))
def test_readers_on_arbitrary_bytes_raise_only_wire_errors(data: bytes, prefix: bytes) -> None:
    async def run() -> None:
        readers = (read_request_frame, read_two_part, read_ack)
        for read in readers:
            try:
                await read(stream_of(prefix + data))
            except (WireError, asyncio.IncompleteReadError):
                pass
        for fn in (decode_two_part, parse_control):
            try:
                fn(prefix + data)
            except WireError:
                pass
        for name in codec.CODECS:
            try:
                decode_payload(data, name)
            except WireError:
                pass

    asyncio.run(run())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=6),
    st.sampled_from(["json", "msgpack"]),
)
def test_token_item_frame_is_item_frame_byte_for_byte(ids: list[int], codec_name: str) -> None:
    """The per-token fast path sends exactly what the general path would."""
    assert codec.token_item_frame(ids, codec_name) == codec.item_frame(
        {"data": {"token_ids": ids}}, codec_name
    )


def test_token_item_frame_falls_back_for_non_int_ids() -> None:
    # bool is an int subclass that JSON writes as true/false: the general path must handle it.
    for ids in ([True], [1.5], [1, "x"]):
        assert codec.token_item_frame(ids, "json") == codec.item_frame(
            {"data": {"token_ids": ids}}, "json"
        )
