"""Admission control: at most `max_concurrency` requests generate at once, up to `max_queue` more wait
for a slot, and anything beyond that gets a 429 right away. Overload degrades to refusals, never to a
crashed server or an unbounded queue.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from flashops.serving.protocol import OpenAIError

# What a refused client is told to wait (RFC 9110 Retry-After, whole seconds): about one short request's time
# on a busy server; clients (the openai package among them) honour it before retrying.
RETRY_AFTER_SECONDS = 1


class RequestLimiter:
    def __init__(self, max_concurrency: int, max_queue: int | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency}: must be >= 1")
        self.max_concurrency = max_concurrency
        self.max_queue = 4 * max_concurrency if max_queue is None else max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self.active = 0
        self.waiting = 0

    async def acquire(self) -> None:
        """Wait for a slot, or raise a 429 OpenAIError at once when the queue is full too."""
        if self.active >= self.max_concurrency and self.waiting >= self.max_queue:
            raise OpenAIError(
                429, f"server busy: {self.active} requests running and {self.waiting} queued "
                f"(max_concurrency={self.max_concurrency}, queue={self.max_queue}); retry later",
                type="rate_limit_error", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
