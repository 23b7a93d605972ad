"""Dynamic batching: images from many requests gathered into runs of up to the batch limit, on one backend thread.

Every image of a request is a job carrying its own class label, sampling settings and noise keys (its seed
and index), so jobs of different requests with different settings share a run and each image is the same
as ``restok generate`` makes it, whatever else ran beside it. The queue is bounded in images; a job whose
request is past its deadline or gone (the client disconnected) is dropped before its run starts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from restok.sampling_params import SamplingParams


class QueueFull(Exception):
    """The bounded queue has no room for a request's images."""


class DeadlineExceeded(Exception):
    """A job's request passed its deadline before its run started."""


@dataclass
class ImageJob:
    label: int
    params: SamplingParams
    keys: np.ndarray  # int32 [NOISE_KEYS]: the image's noise keys (its seed and index)
    deadline: float  # time.monotonic() after which the job is dropped if not started
    future: asyncio.Future = field(repr=False, default=None)
    enqueued: float = 0.0
    cancelled: bool = False
    request: object = None  # the request the job belongs to (a failed run is retried request by request)


@dataclass
class BatchResult:
    """What one run gives each of its jobs."""

    tokens: np.ndarray  # int64 [N]
    image: np.ndarray | None  # uint8 [S, S, 3]
    batch_size: int
    queue_seconds: float
    run_seconds: float


class BatchScheduler:
    """One asyncio loop task gathers jobs; one worker thread runs them (the event loop never blocks).

    ``run_batch(jobs) -> (tokens [b, N], images uint8 [b, S, S, 3] or None, pass seconds)`` does the work;
    ``observe(event, **values)`` receives measurements for the metrics."""

    def __init__(self, run_batch: Callable, batch_limit: int, max_wait_ms: float, max_queue: int,
                 observe: Callable[..., None] | None = None):
        if batch_limit < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("batch limit and max queue must be >= 1 and max wait >= 0")
        self.run_batch = run_batch
        self.batch_limit, self.max_wait, self.max_queue = batch_limit, max_wait_ms / 1000.0, max_queue
        self.observe = observe or (lambda event, **kw: None)
        self.queue: deque[ImageJob] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restok-backend")
        self.running = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    @property
    def idle(self) -> bool:
        return not self.queue and self.running == 0

    # ---------------------------------------------------------------- submit
    def submit(self, jobs: list[ImageJob]) -> list[asyncio.Future]:
        """Queue all of a request's images, or none (QueueFull)."""
        if len(self.queue) + len(jobs) > self.max_queue:
            raise QueueFull(f"the queue holds {len(self.queue)} of {self.max_queue} images; {len(jobs)} do not fit")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for j in jobs:
            j.future, j.enqueued = loop.create_future(), now
            self.queue.append(j)
        self.observe("queued", value=len(self.queue))
        self._wake.set()
        return [j.future for j in jobs]

    # ------------------------------------------------------------------ loop
    def _take(self) -> list[ImageJob]:
        """Up to batch-limit live jobs from the front of the queue; dead ones are failed and dropped."""
        batch, now = [], time.monotonic()
        while self.queue and len(batch) < self.batch_limit:
            j = self.queue.popleft()
            if j.cancelled or j.future.done():
                continue
            if now > j.deadline:
                j.future.set_exception(DeadlineExceeded("the request's deadline (--request-timeout) passed before its "
                                                         "images started"))
                continue
            batch.append(j)
        return batch

    async def _loop(self) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            # the oldest job waits at most max_wait for others to join its run
            first = self.queue[0].enqueued
            while len(self.queue) < self.batch_limit and time.monotonic() - first < self.max_wait:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, first + self.max_wait - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            self.observe("queued", value=len(self.queue))
            if not batch:
                continue
            await self._run(batch)

    async def _run(self, batch: list[ImageJob]) -> None:
        """One run for ``batch``. When it fails and it mixed several requests, each request's images are run
        again alone: only the request whose images fail gets the error, the others their images."""
        loop = asyncio.get_running_loop()
        self.running = len(batch)
        self.observe("running", value=self.running)
        start = time.monotonic()
        try:
            tokens, images, pass_seconds = await loop.run_in_executor(self.executor, self.run_batch, batch)
        except Exception as e:
            groups: dict[int, list[ImageJob]] = {}
            for j in batch:
                groups.setdefault(id(j.request) if j.request is not None else id(j), []).append(j)
            if len(groups) == 1:
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                return
            for group in groups.values():
                await self._run(group)
            return
        finally:
            self.running = 0
            self.observe("running", value=0)
        run = time.monotonic() - start
        self.observe("batch", size=len(batch), seconds=run, passes=pass_seconds)
        for k, j in enumerate(batch):
            self.observe("queue_wait", seconds=start - j.enqueued)
            if not j.future.done():
                j.future.set_result(BatchResult(tokens[k], None if images is None else images[k], len(batch),
                                                start - j.enqueued, run))
