"""The cancel-safe waits the worker's service loops use (``stem._aio``)."""

from __future__ import annotations

import asyncio

from stem._aio import cancel_and_wait, wait_event, within


async def test_wait_event_returns_whether_it_was_set() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    asyncio.get_running_loop().call_soon(ev.set)
    assert await wait_event(ev, 5) is True


async def test_a_cancel_landing_with_the_event_is_not_swallowed() -> None:
    """asyncio.wait_for on 3.11 returns normally here and the loop below would run on."""
    ev = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await wait_event(ev, 5)
            ev.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    ev.set()
    task.cancel()  # the same loop iteration as the set
    done, _ = await asyncio.wait([task], timeout=2)
    assert task in done and task.cancelled()


async def test_cancel_and_wait_ends_a_task_that_swallows_a_cancel() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what a driver that loses a cancel looks like

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, None, retry_every=0.05), 5)
    assert task.done() and swallowed == 1


async def test_within_times_out_and_returns() -> None:
    assert await within(asyncio.sleep(0, "x"), 1) == "x"
    try:
        await within(asyncio.sleep(5), 0.01)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no timeout")
