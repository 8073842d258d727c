"""The worker's lifecycle phase (``runtime.lifecycle``): transitions, admission, cleanup.

docs/architecture.md#lifecycle: a signal before ``engine.start()`` means nothing to clean
up; one during start-up or while serving moves to DRAINING (never registered again);
admission closes only at STOPPING (or after a failed start); ``cleanup()`` is owed from the
moment ``start()`` is called until it ran.
"""

from __future__ import annotations

import asyncio

from backend_common.runtime.lifecycle import Lifecycle, Phase


async def test_the_served_path() -> None:
    life = Lifecycle()
    assert life.phase is Phase.INIT and life.admitting and not life.cleanup_owed
    assert life.begin_start() and life.phase is Phase.STARTING and life.cleanup_owed
    assert life.admitting and not life.serving  # admission opens before registration
    assert life.begin_serving() and life.serving and not life.leaving
    waiter = asyncio.ensure_future(life.wait_leaving())
    await asyncio.sleep(0)
    assert not waiter.done()
    life.request_stop()
    await asyncio.wait_for(waiter, 1)
    assert life.phase is Phase.DRAINING and life.leaving and not life.serving
    assert life.admitting and life.cleanup_owed  # draining still serves what arrives
    life.begin_stopping()
    assert not life.admitting and not life.cleanup_owed
    life.stopped()
    assert life.phase is Phase.STOPPED and not life.admitting and not life.forced


async def test_a_signal_before_start_means_nothing_to_start_or_clean() -> None:
    life = Lifecycle()
    life.request_stop()
    assert life.phase is Phase.STOPPED and not life.cleanup_owed
    assert not life.begin_start()
    await asyncio.wait_for(life.wait_leaving(), 1)


def test_a_signal_during_start_up_prevents_serving_but_owes_cleanup() -> None:
    life = Lifecycle()
    assert life.begin_start()
    life.request_stop()
    assert life.phase is Phase.DRAINING and life.cleanup_owed
    assert not life.begin_serving() and life.phase is Phase.DRAINING


def test_a_failed_start_closes_admission_and_still_owes_cleanup() -> None:
    life = Lifecycle()
    assert life.begin_start()
    life.start_failed()
    assert life.phase is Phase.START_FAILED and life.leaving
    assert not life.admitting and life.cleanup_owed
    life.request_stop()  # a signal now changes nothing
    assert life.phase is Phase.START_FAILED
