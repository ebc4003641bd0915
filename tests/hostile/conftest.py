"""Fixtures of the hostile-input tests: one arena (token, daemon, well-behaved client)
for the whole folder; every test leaves the daemon serving and its log clean."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_arena import Arena


@pytest.fixture(scope="package")
def arena() -> Iterator[Arena]:
    # a directory of its own, not pytest's numbered ones (a concurrent pytest session
    # may prune those while this one still runs its daemon in them)
    with tempfile.TemporaryDirectory(prefix="p11p-hostile-") as root:
        yield from _arena(Path(root))


def _arena(root: Path) -> Iterator[Arena]:
    a = Arena(root)
    try:
        yield a
        a.assert_serving()
    finally:
        a.stop()


@pytest.fixture
def served(arena: Arena) -> Iterator[Arena]:
    """The arena; after the test, the daemon lives, serves and logged nothing wrong."""
    arena.assert_serving()
    yield arena
    arena.assert_serving()
