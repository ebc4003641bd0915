"""bind.rebuildable: when a session's member session may be closed at will (a call that
visits another member after CKR_GENERAL_ERROR closes it, placement moves it). What it
holds must come back elsewhere as it was; an object made from a random key that another
session's object still holds does not (remade, it would be another key)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from p11p.daemon.bind import SessionBuilder as Bind
from p11p.daemon.policy import Operation
from p11p.daemon.virtual import Recipe, VirtualObject, VirtualSession


class FakeMember:
    def __init__(self) -> None:
        self.health = SimpleNamespace(usable=True)


def member() -> Any:
    return FakeMember()


def session(handle: int) -> VirtualSession:
    return VirtualSession(handle, None, None, 0)  # type: ignore[arg-type]


def generated(owner: VirtualSession, on: Any) -> VirtualObject:
    """A session key from C_GenerateKey, not used yet."""
    key = VirtualObject(handle=10 + owner.handle, is_token=False, owner=owner, real={on: 1})
    key.recipe = Recipe(request=[], outputs=[key], generated=True)
    owner.objects.add(key)
    return key


def copied(src: VirtualObject, owner: VirtualSession, on: Any) -> VirtualObject:
    """A session object C_CopyObject made of `src` in `owner`."""
    obj = VirtualObject(handle=20 + owner.handle, is_token=False, owner=owner, real={on: 2})
    obj.recipe = Recipe(request=[], outputs=[obj], generated=False, sources={src.handle: src})
    owner.objects.add(obj)
    return obj


def test_a_copy_of_a_random_key_of_the_same_session_is_rebuildable() -> None:
    a = member()
    s1 = session(1)
    copied(generated(s1, a), s1, a)
    assert Bind.rebuildable(s1)


def test_a_copy_of_a_random_key_another_session_holds_is_not() -> None:
    a = member()
    s1, s2 = session(1), session(2)
    key = generated(s2, a)
    copy = copied(key, s1, a)
    assert key.replayable and copy.replayable  # neither used: each alone could be remade
    assert copy.pinned(s1) and not Bind.rebuildable(s1)
    assert Bind.rebuildable(s2)  # the key's own session: the copy stays where it is


def test_a_copy_whose_random_source_is_gone_or_out_of_service_is_rebuildable() -> None:
    a = member()
    s1, s2 = session(1), session(2)
    key = generated(s2, a)
    copied(key, s1, a)
    key.destroyed = True
    assert Bind.rebuildable(s1)
    key.destroyed = False
    a.health.usable = False  # its member failed: the key goes with it
    assert Bind.rebuildable(s1)


def test_an_operation_on_a_random_key_another_session_holds_is_not() -> None:
    a = member()
    s1, s2 = session(1), session(2)
    key = generated(s2, a)
    s1.ops["decrypt"] = Operation(init=[0, 1, None, key.handle], keys={key.handle: key})
    assert not Bind.rebuildable(s1)
    del key.real[a]  # no longer held (its member session closed): made again with it
    assert Bind.rebuildable(s1)
