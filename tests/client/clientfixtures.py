"""Fixtures of the client tests: the built library (plain and ASan/UBSan), the codec
test and the driver, and drivers started against a fake daemon's socket path.

Imported by the test modules rather than kept in a conftest.py, so that this folder adds
no second module named `conftest` to the suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clientbuild import CODEC_SOURCES, CODEC_TEST_SOURCES, HERE, Driver, compile_c, make_libraries

__all__ = ["client_libs", "client_bin", "codec_tests", "driver_exes", "sock", "variant",
           "start_driver"]


@pytest.fixture(scope="session")
def client_libs() -> dict[str, Path]:
    return make_libraries()


@pytest.fixture(scope="session")
def client_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-bin")


@pytest.fixture(scope="session")
def codec_tests(client_bin: Path) -> dict[str, Path]:
    sources = CODEC_SOURCES + CODEC_TEST_SOURCES
    return {variant: compile_c(client_bin / f"codec_test_{variant}", sources,
                               variant == "asan", ["-lmsgpackc"])
            for variant in ("plain", "asan")}


@pytest.fixture(scope="session")
def driver_exes(client_bin: Path, client_libs: dict[str, Path]) -> dict[str, Path]:
    return {variant: compile_c(client_bin / f"driver_{variant}", [HERE / "driver.c"],
                               variant == "asan", ["-ldl"])
            for variant in ("plain", "asan")}


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "p11p.sock"


@pytest.fixture(params=["plain", "asan"])
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


DriverFactory = Callable[..., Driver]


@pytest.fixture
def start_driver(driver_exes: dict[str, Path], client_libs: dict[str, Path],
                 sock: Path) -> Iterator[DriverFactory]:
    """start_driver(variant="plain", **env) -> Driver with P11P_SOCKET=sock; every driver
    must exit cleanly (and without a sanitizer report) when the test ends."""
    started: list[Driver] = []

    def start(variant: str = "plain", **env: str) -> Driver:
        env.setdefault("P11P_SOCKET", str(sock))
        d = Driver(driver_exes[variant], client_libs[variant], variant == "asan", env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
