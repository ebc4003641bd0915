"""Virtual handles: one counter for all kinds, kind checks, wrap-around."""

from __future__ import annotations

import pytest
from p11p.daemon import handles
from p11p.daemon.errors import CKError
from p11p.daemon.handles import HandleCounter, HandleTable


def test_kinds_never_collide_and_lookups_check_kind() -> None:
    counter = HandleCounter()
    sessions: HandleTable[str] = HandleTable(counter, 0xB3)
    objects: HandleTable[str] = HandleTable(counter, 0x82)
    s = sessions.add("s")
    o = objects.add("o")
    assert s != o
    with pytest.raises(CKError) as err:
        objects.get(s)
    assert err.value.rv == 0x82
    with pytest.raises(CKError):
        sessions.get("not a number")
    assert sessions.get(s) == "s"
    assert sessions.remove(s) == "s" and sessions.find(s) is None


def test_wrap_around_skips_live_handles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handles, "_LIMIT", 5)
    counter = HandleCounter()
    table: HandleTable[int] = HandleTable(counter, 0x82)
    got = [table.add(i) for i in range(5)]
    assert got == [1, 2, 3, 4, 5]
    table.remove(3)
    assert table.add(99) == 3  # wrapped, skipping the live 1 and 2
    with pytest.raises(CKError):
        table.add(100)  # all five live


def test_the_client_library_s_range_is_its_own() -> None:
    """The counter's handles stay below the range the client library names the sessions
    it opens itself with (OPEN_AT); a table takes one of those as given."""
    assert handles._LIMIT == handles.CLIENT_FIRST - 1 < handles.CLIENT_LAST <= 0x7FFFFFFF
    counter = HandleCounter()
    sessions: HandleTable[str] = HandleTable(counter, 0xB3)
    sessions.add_at(handles.CLIENT_FIRST + 7, "mine")
    assert sessions.get(handles.CLIENT_FIRST + 7) == "mine" and sessions.add("next") == 1
    assert sessions.remove(handles.CLIENT_FIRST + 7) == "mine"
    with pytest.raises(CKError):
        sessions.get(handles.CLIENT_FIRST + 7)
