"""Virtual handles: one counter for every kind, a kind check on every lookup.

Applications see only these handles (sessions and objects); what stands behind one is
the daemon's business. The counter is shared by all kinds so a session handle is never
also an object handle, stays in 31 bits (some applications keep handles in ints), and
skips handles still in use when it wraps.

The counter's handles are below CLIENT_FIRST. The handles from CLIENT_FIRST to
CLIENT_LAST are the client library's: it opens a session itself and names it with one of
them, and the daemon learns of it at its first call that travels (OPEN_AT,
protocol/README.md "Client link: calls").
"""

from __future__ import annotations

from typing import Generic, TypeVar

from p11p.daemon.errors import CKError

T = TypeVar("T")
CLIENT_FIRST = 0x40000000
CLIENT_LAST = 0x7FFFFFFF
_LIMIT = CLIENT_FIRST - 1


class HandleCounter:
    """Hands out handles 1..CLIENT_FIRST-1, never one that is live."""

    def __init__(self) -> None:
        self._next = 1
        self._live: set[int] = set()
        self.changes = 0  # handles given or given back, ever (daemon/resume.py)

    def take(self) -> int:
        for _ in range(_LIMIT):
            handle = self._next
            self._next = 1 if handle >= _LIMIT else handle + 1
            if handle not in self._live:
                self._live.add(handle)
                self.changes += 1
                return handle
        raise CKError(0x31, "handle space exhausted")  # CKR_DEVICE_MEMORY

    def give_back(self, handle: int) -> None:
        self._live.discard(handle)
        self.changes += 1

    def claim(self, handle: int) -> None:
        """A handle a restarted daemon took back (daemon/resume.py): live, and the
        counter goes on after it."""
        if handle < CLIENT_FIRST:
            self._live.add(handle)
            if handle >= self._next:
                self._next = 1 if handle >= _LIMIT else handle + 1

    @property
    def position(self) -> int:
        """The next handle to try (daemon/resume.py keeps it: a handle the daemon before
        gave and took back is not given again soon, as a token does not)."""
        return self._next

    def resume_at(self, position: int) -> None:
        if 0 < position <= _LIMIT and position > self._next:
            self._next = position


class HandleTable(Generic[T]):
    """Handles of one kind, drawn from a shared counter."""

    def __init__(self, counter: HandleCounter, invalid_rv: int) -> None:
        self._counter = counter
        self._items: dict[int, T] = {}
        self._invalid_rv = invalid_rv

    def add(self, item: T) -> int:
        handle = self._counter.take()
        self._items[handle] = item
        return handle

    def add_at(self, handle: int, item: T) -> None:
        """Adds `item` under a handle the client library chose (CLIENT_FIRST..CLIENT_LAST,
        not in use: the caller checks)."""
        assert CLIENT_FIRST <= handle <= CLIENT_LAST and handle not in self._items
        self._items[handle] = item
        self._counter.changes += 1

    def get(self, handle: object) -> T:
        item = self._items.get(handle) if isinstance(handle, int) else None
        if item is None:
            raise CKError(self._invalid_rv)
        return item

    def find(self, handle: int) -> T | None:
        return self._items.get(handle)

    def remove(self, handle: int) -> T | None:
        item = self._items.pop(handle, None)
        if item is not None:
            self._counter.give_back(handle)
        return item

    def values(self) -> list[T]:
        return list(self._items.values())

    def items(self) -> dict[int, T]:
        return self._items

    def restore(self, items: dict[int, T]) -> None:
        """The handles of a restarted daemon's state file (daemon/resume.py)."""
        for handle in items:
            self._counter.claim(handle)
        self._items = dict(items)

    def __len__(self) -> int:
        return len(self._items)
