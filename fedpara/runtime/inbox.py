"""A bounded inbox for received MQTT messages: back-pressure per sender topic.

paho's network thread only enqueues; the coordinator or client drains the inbox on its own
thread. When a sender publishes faster than we drain (a flood, or a bug), its topic's pending
bytes hit ``per_topic_bytes`` and its further messages are dropped and counted, so one sender can
use at most that much of our memory and never pushes out anyone else's messages. ``total_bytes``
bounds the sum over all topics. ``rate_bytes_per_s`` (optional) is a token bucket per topic, with
``per_topic_bytes`` as its burst: a sender that keeps publishing faster than that loses the excess
even when we keep up, so a flood costs bounded CPU too.
"""
from __future__ import annotations

import collections
import threading
import time


class Inbox:
    def __init__(self, per_topic_bytes: int = 128 << 20, total_bytes: int = 1 << 30,
                 per_topic_messages: int = 4096, rate_bytes_per_s: float | None = None, clock=time.monotonic) -> None:
        self.per_topic_bytes, self.total_bytes = per_topic_bytes, total_bytes
        self.per_topic_messages = per_topic_messages
        self.rate, self.clock = rate_bytes_per_s, clock
        self._buckets: dict[str, list[float]] = {}  # topic -> [tokens, last refill]
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._pending: dict[str, list[int]] = {}  # topic -> [bytes, messages]
        self._total = 0
        self._cond = threading.Condition()
        self.dropped: collections.Counter[str] = collections.Counter()  # topic -> messages dropped

    def put(self, topic: str, payload: bytes) -> bool:
        """Enqueue unless the topic's or the total budget is exhausted (then count a drop)."""
        size = len(payload)
        with self._cond:
            pending = self._pending.get(topic, [0, 0])
            if (pending[0] + size > self.per_topic_bytes or pending[1] >= self.per_topic_messages
                    or self._total + size > self.total_bytes or not self._take(topic, size)):
                if len(self.dropped) < 10_000 or topic in self.dropped:
                    self.dropped[topic] += 1
                return False
            pending[0] += size
            pending[1] += 1
            self._pending[topic] = pending
            self._total += size
            self._items.append((topic, payload))
            self._cond.notify()
            return True

    def grant(self, topic: str, nbytes: int) -> None:
        """Add ``nbytes`` tokens to the topic's bucket (at most its burst): the coordinator grants
        each sampled client one reply's worth per task, so an honest client's updates pass however
        short the rounds are, while a flood still gets only what the rate and the grants allow."""
        if self.rate is None:
            return
        with self._cond:
            bucket = self._buckets.get(topic)
            if bucket is not None:
                bucket[0] = min(float(self.per_topic_bytes), bucket[0] + nbytes)

    def _take(self, topic: str, size: int) -> bool:
        """Spend ``size`` tokens of the topic's bucket (always true without a rate)."""
        if self.rate is None:
            return True
        now = self.clock()
        bucket = self._buckets.get(topic)
        if bucket is None:
            if len(self._buckets) >= 100_000:
                self._buckets.clear()  # bounded: forgetting only refills buckets
            bucket = self._buckets[topic] = [float(self.per_topic_bytes), now]
        bucket[0] = min(float(self.per_topic_bytes), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if bucket[0] < size:
            return False
        bucket[0] -= size
        return True

    def get(self, timeout: float | None = None) -> tuple[str, bytes]:
        """The oldest message; ``queue.Empty`` after ``timeout`` seconds without one."""
        import queue

        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            topic, payload = self._items.popleft()
            pending = self._pending[topic]
            pending[0] -= len(payload)
            pending[1] -= 1
            if pending[1] == 0:
                del self._pending[topic]
            self._total -= len(payload)
            return topic, payload

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def pending_bytes(self) -> int:
        with self._cond:
            return self._total
