"""The hello's negotiation (daemon/hello.py), without sockets: which version and features
a client's offer gets, what an older client gets, and what is refused and how it reads."""

from __future__ import annotations

from typing import Any

import pytest
from p11p.daemon import hello
from p11p.protocol import spec

CTX = b"c" * 16


def offer(**keys: Any) -> dict[str, Any]:
    return {"p11p": 1, "ctx": CTX, "pid": 42, "prog": "app", **keys}


@pytest.fixture
def pretend(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """pretend((low, high), features): the daemon speaks that range and knows those."""
    def set_range(versions: tuple[int, int], features: tuple[str, ...] = ()) -> None:
        monkeypatch.setattr(hello, "VERSIONS", versions)
        monkeypatch.setattr(hello, "FEATURES", features)
    return set_range


def test_versions_come_from_the_spec() -> None:
    link = spec.link_protocol()
    assert hello.VERSIONS == (link.min_version, link.max_version) == (1, 1)
    assert hello.FEATURES == link.features


def test_an_older_client_gets_exactly_the_answer_it_always_got() -> None:
    outcome, answer = hello.negotiate(offer())
    assert answer == {"p11p": 1}
    assert outcome == hello.Agreement(1, (), CTX, 42, "app")


def test_a_newer_client_gets_the_newest_version_both_speak(pretend) -> None:  # type: ignore[no-untyped-def]
    outcome, answer = hello.negotiate(offer(max=5, features=["later"]))
    assert answer == {"p11p": 1, "features": []}
    assert isinstance(outcome, hello.Agreement) and outcome.version == 1
    pretend((3, 7), ("b", "a", "c"))
    for (low, high), chosen in (((1, 5), 5), ((3, 3), 3), ((5, 9), 7), ((7, 7), 7)):
        outcome, answer = hello.negotiate(offer(p11p=low, max=high, features=["a", "b", "z"]))
        assert answer == {"p11p": chosen, "features": ["b", "a"]}  # the daemon's order
        assert isinstance(outcome, hello.Agreement) and outcome.features == ("b", "a")


@pytest.mark.parametrize("low, high, text", [
    (3, 5, "the client speaks 3..5, this daemon 1"),
    (2, None, "the client speaks 2, this daemon 1"),
    (0, None, "the client speaks 0, this daemon 1"),
])
def test_ranges_that_do_not_meet_are_refused_naming_both(low: int, high: int | None,
                                                         text: str) -> None:
    keys: dict[str, Any] = {"p11p": low} if high is None else {"p11p": low, "max": high}
    outcome, answer = hello.negotiate(offer(**keys))
    assert isinstance(outcome, hello.Refusal)
    assert outcome.offered == (low, low if high is None else high)
    assert outcome.why == f"no protocol version in common: {text}"
    assert answer == {"p11p": 1, "max": 1, "error": outcome.why}


def test_a_newer_daemon_refuses_an_older_client_naming_its_range(pretend) -> None:  # type: ignore[no-untyped-def]
    pretend((2, 4))
    outcome, answer = hello.negotiate(offer())
    assert isinstance(outcome, hello.Refusal)
    assert answer == {"p11p": 2, "max": 4, "error": "no protocol version in common: "
                      "the client speaks 1, this daemon 2..4"}


@pytest.mark.parametrize("keys", [
    {"p11p": True}, {"p11p": -1}, {"p11p": "1"}, {"max": "5"}, {"max": True}, {"max": None},
    {"max": -2}, {"features": "a"}, {"features": [1]}, {"features": None}, {"ctx": b"x"},
    {"prog": 1}, {"pid": "1"},
])
def test_malformed_hellos_are_refused(keys: dict[str, Any]) -> None:
    outcome, answer = hello.negotiate(offer(**keys))
    assert outcome == hello.Refusal("malformed hello")
    assert answer == {"p11p": 1, "max": 1, "error": "malformed hello"}


def test_max_below_p11p_is_malformed() -> None:
    outcome, answer = hello.negotiate(offer(p11p=3, max=2))
    assert isinstance(outcome, hello.Refusal) and outcome.offered is None
    assert "max 2 is below p11p 3" in answer["error"]


@pytest.mark.parametrize("frame", [None, [], [1, 2], "hello", 1, {}])
def test_not_a_hello(frame: Any) -> None:
    outcome, _ = hello.negotiate(frame)
    assert outcome == hello.Refusal("malformed hello")


def test_unknown_keys_are_ignored() -> None:
    outcome, answer = hello.negotiate(offer(later={"x": 1}, resume=b"\x00"))
    assert answer == {"p11p": 1} and isinstance(outcome, hello.Agreement)


KEY = bytes(range(32))


def test_resume_is_taken_with_the_feature_and_never_printed() -> None:
    outcome, answer = hello.negotiate(offer(
        features=["restart", "resume"],
        resume={"key": KEY, "logins": [[3, 1, b"secret-pin"], [4, 0, b"so-pin"]]}))
    assert isinstance(outcome, hello.Agreement) and answer["features"] == ["restart", "resume"]
    assert outcome.resume == hello.Resumption(KEY, ((3, 1, b"secret-pin"), (4, 0, b"so-pin")))
    assert "secret" not in repr(outcome) and "so-pin" not in repr(outcome.resume)
    assert KEY.hex() not in repr(outcome) and repr(KEY) not in repr(outcome)


def test_resume_without_the_feature_is_ignored() -> None:
    outcome, _ = hello.negotiate(offer(features=["restart"], resume={"key": KEY, "logins": []}))
    assert isinstance(outcome, hello.Agreement) and outcome.resume is None


@pytest.mark.parametrize("resume", [
    None, b"x", {"key": KEY[:31], "logins": []}, {"logins": []},
    {"key": KEY, "logins": [[1, 1]]}, {"key": KEY, "logins": [[1, 1, "pin"]]},
    {"key": KEY, "logins": [[-1, 1, b"pin"]]}, {"key": KEY, "logins": [[1, 1, b"p" * 257]]},
    {"key": KEY, "logins": {"1": b"pin"}}, {"key": KEY, "logins": [[1, 1, b"p"]] * 65},
])
def test_a_malformed_resume_is_refused_without_echoing_it(resume: Any) -> None:
    outcome, answer = hello.negotiate(offer(features=["resume"], resume=resume))
    assert isinstance(outcome, hello.Refusal)
    assert answer["error"] == "malformed hello: resume"
