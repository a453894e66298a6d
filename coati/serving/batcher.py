"""Dynamic batching for the reward server: requests that arrive within ``max_wait_ms`` of the first waiting one are
merged into one forward pass of at most ``max_batch_tokens`` tokens, run in one worker thread so that the event loop
keeps answering; results go back to each caller in its order.
"""

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from coati.serving.engine import RewardEngine


@dataclass
class Job:
    """One request's sequences, waiting for the batcher: ``groups`` of token-id sequences, their token count and
    the future its handler awaits (cancelled when the request times out or its client goes away)."""

    groups: list[list[list[int]]]
    tokens: int
    future: asyncio.Future


class Batcher:
    """Merges the jobs that arrive together into forward passes (dynamic batching).

    The first waiting job opens a batch; jobs arriving within ``max_wait_ms`` join it while the batch stays within
    ``max_batch_tokens`` (a job that would overflow it opens the next batch). Jobs whose future is already done
    (timed out, client gone) are dropped before the forward pass. At most ``max_queue`` jobs wait; more raise
    :class:`asyncio.QueueFull`.
    """

    def __init__(self, engine: RewardEngine, max_batch_tokens: int, max_wait_ms: float, max_queue: int):
        self.engine, self.max_batch_tokens, self.max_wait = engine, max_batch_tokens, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self.batches = self.requests = self.dropped = 0
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="coati-forward")

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self.queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop (after uvicorn has answered every accepted request) and the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        """Queue a job. Raises :class:`asyncio.QueueFull` when ``max_queue`` jobs are waiting."""
        self.queue.put_nowait(job)

    async def _next_batch(self, carry: Job | None) -> tuple[list[Job], Job | None]:
        loop = asyncio.get_running_loop()
        job = carry if carry is not None else await self.queue.get()
        batch, tokens, deadline = [job], job.tokens, loop.time() + self.max_wait
        while tokens < self.max_batch_tokens:
            if self.queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            else:
                nxt = self.queue.get_nowait()
            if tokens + nxt.tokens > self.max_batch_tokens:
                return batch, nxt
            batch.append(nxt)
            tokens += nxt.tokens
        return batch, None

    async def _run(self) -> None:
        loop, carry = asyncio.get_running_loop(), None
        while True:
            batch, carry = await self._next_batch(carry)
            live = [j for j in batch if not j.future.done()]
            self.dropped += len(batch) - len(live)
            if not live:
                continue
            groups = [g for j in live for g in j.groups]
            try:
                results = await loop.run_in_executor(self._executor, self.engine.rewards, groups)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests, the loop goes on
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(live)
            start = 0
            for j in live:
                if not j.future.done():
                    j.future.set_result(results[start:start + len(j.groups)])
                start += len(j.groups)
