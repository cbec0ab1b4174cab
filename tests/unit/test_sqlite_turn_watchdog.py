"""The SQLite write-turn watchdog names where a stuck holder waits (serving/sqlite_server.py)."""

import asyncio

from serving.sqlite_server import coroutine_stack


async def _innermost(future: asyncio.Future) -> None:
    await future


async def _middle(future: asyncio.Future) -> None:
    await _innermost(future)


def test_the_whole_await_chain_is_named() -> None:
    async def main() -> list[str]:
        future = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(_middle(future))
        await asyncio.sleep(0)
        stack = coroutine_stack(task.get_coro())
        future.set_result(None)
        await task
        return stack

    stack = asyncio.run(main())
    assert [line.rsplit(" in ", 1)[1] for line in stack[:2]] == ["_middle", "_innermost"]
    assert "Future" in stack[-1]
