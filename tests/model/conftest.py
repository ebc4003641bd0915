"""Model-based differential tests: the tokens (members and the reference token holding
the same imported keys) and the environments (a daemon per policy, the applications)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Env, make_tokens
from kit import SoftHSM

POLICIES = {"failover": 2, "balance": 3}  # policy -> members


@pytest.fixture(scope="session")
def model_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[SoftHSM, Path, Path]:
    root = tmp_path_factory.mktemp("model")
    hsm, keys = make_tokens(root)
    return hsm, keys, root


@pytest.fixture(scope="module", params=sorted(POLICIES))
def model_env(request: pytest.FixtureRequest,
              model_tokens: tuple[SoftHSM, Path, Path]) -> Iterator[Env]:
    hsm, keys, root = model_tokens
    policy = request.param
    env = Env(tmp_path_factory_of(request).mktemp(f"env-{policy}"), hsm, keys, policy,
              POLICIES[policy])
    yield env
    env.close()


def tmp_path_factory_of(request: pytest.FixtureRequest) -> pytest.TempPathFactory:
    return request.getfixturevalue("tmp_path_factory")  # type: ignore[no-any-return]
