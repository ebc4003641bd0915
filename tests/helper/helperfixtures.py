"""Fixtures of the helper tests: a SoftHSM2 token in a temporary directory, one shared
helper process on it (with the token's slot and a logged-in session), and fresh helpers
for the tests that end theirs. Every helper is stopped by its PID.

Imported by the test modules (`from helperfixtures import *`) rather than kept in a
conftest.py, so that this folder adds no second module named `conftest` to the suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helperlink import SOFTHSM_SO, HelperLink, SoftHSMDir

__all__ = ["hsm", "helper", "slot", "session", "spawn"]


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMDir:
    return SoftHSMDir(tmp_path_factory.mktemp("helper-softhsm"))


@pytest.fixture(scope="session")
def helper(hsm: SoftHSMDir) -> Iterator[HelperLink]:
    link = HelperLink(SOFTHSM_SO, hsm.env)
    yield link
    link.stop()


@pytest.fixture(scope="session")
def slot(helper: HelperLink) -> int:
    return helper.token_slot()


@pytest.fixture(scope="session")
def session(helper: HelperLink, slot: int) -> int:
    return helper.open_session(slot)


@pytest.fixture
def spawn(hsm: SoftHSMDir) -> Iterator[Callable[..., HelperLink]]:
    """Starts helpers of the test's own (for tests that end them)."""
    started: list[HelperLink] = []

    def start(module: str = SOFTHSM_SO, env: dict[str, str] | None = None) -> HelperLink:
        link = HelperLink(module, env if env is not None else hsm.env)
        started.append(link)
        return link

    yield start
    for link in started:
        link.stop()
