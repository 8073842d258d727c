"""Coverage-guided fuzzing (atheris) of the decoders a frontend or a stranger can reach.

Not part of ``make test`` (it runs until stopped). One harness, the first input byte picks
the target: 0 request frame, 1 TwoPart message, 2 control header, 3 request body (JSON),
4 request body (msgpack), 5 call-home control frame. Every target may only raise its typed
error; anything else is a finding.

    pip install atheris
    PYTHONPATH=template/src python fuzz/fuzz_wire.py -max_total_time=60 fuzz/corpus
"""

from __future__ import annotations

import asyncio
import sys

import atheris

with atheris.instrument_imports():
    from pydantic import ValidationError

    from backend_common.config import EngineConfig
    from backend_common.errors import DynamoError
    from backend_common.request_policy import check_request
    from backend_common.transport.codec import (
        WireError,
        decode_payload,
        decode_two_part,
        parse_control,
        read_request_frame,
        read_two_part,
    )
    from backend_common.types import PreprocessedRequest

CONFIG = EngineConfig(model="fuzz", context_length=2048, vocab_size=2051)
LOOP = asyncio.new_event_loop()


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(loop=LOOP)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def _read(coro_fn, data: bytes) -> None:
    try:
        LOOP.run_until_complete(coro_fn(_reader(data)))
    except (WireError, asyncio.IncompleteReadError):
        pass


def _body(data: bytes, codec: str) -> None:
    try:
        request = PreprocessedRequest.from_dict(decode_payload(data, codec))
    except (WireError, ValidationError, TypeError, ValueError):
        return
    try:
        check_request(request, CONFIG)
    except DynamoError as err:
        assert err.is_invalid_argument, err


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    target, data = raw[0] % 6, raw[1:]
    if target == 0:
        _read(read_request_frame, data)
    elif target == 1:
        try:
            decode_two_part(data)
        except WireError:
            pass
    elif target == 2:
        try:
            parse_control(data)
        except WireError:
            pass
    elif target == 3:
        _body(data, "json")
    elif target == 4:
        _body(data, "msgpack")
    else:
        _read(lambda r: read_two_part(r, max_header=4096, max_body=65536), data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
