"""The choices of one OpenAI request (`n` samples of each of its prompts) as engine requests, their
deltas merged into one stream tagged by choice index.

Prompt i's first choice starts at once; its other n - 1 start when the first has its first token.
By then the prompt's full blocks are in the replica's prefix cache, and the router's index expects
them there, so the siblings are routed to the same replica and prefill only the prompt's last,
partial block: one prefill, the prompt's blocks shared (vLLM's parallel sampling leans on its
prefix cache the same way). Each choice is admitted, routed, resumed and aborted by the request
path like any request; the merged stream ends when every choice has finished, and raises the first
error any choice raises (the others are then aborted).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cluster.frontend.request import FrontendRequest
from workers.engine.outputs import RequestOutput

_END = object()


class FanOut:
    def __init__(self, frontend, requests: list[FrontendRequest], n: int):
        """`requests[i * n + j]`: prompt i's choice j."""
        self.fe, self.requests, self.n = frontend, requests, n
        self._tasks: list[asyncio.Task] = []

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()
        for first in range(0, len(self.requests), self.n):
            self._start(first, queue)
        siblings_started = set()
        finished = 0
        try:
            while finished < len(self.requests):
                i, item = await queue.get()
                if item is _END:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                if i % self.n == 0 and i not in siblings_started:
                    siblings_started.add(i)
                    for j in range(i + 1, i + self.n):
                        self._start(j, queue)
                if item is not _END:
                    yield i, item
        finally:
            await self.close()

    def _start(self, i: int, queue: asyncio.Queue) -> None:
        self._tasks.append(asyncio.ensure_future(self._pump(i, queue)))

    async def _pump(self, i: int, queue: asyncio.Queue) -> None:
        outputs = self.fe.stream(self.requests[i])
        try:
            async for out in outputs:
                queue.put_nowait((i, out))
            queue.put_nowait((i, _END))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            await outputs.aclose()  # not finished: aborts it in the engine

    async def close(self) -> None:
        """Abort every choice still running (a disconnect, an error in another choice)."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
