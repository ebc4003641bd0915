"""p11p-faultsim.so driven directly (SoftHSM2 underneath, ctypes as the application):
each action does what faultsim/README.md says, counters count right, and changes to
the rules file take effect while the application runs."""

from __future__ import annotations

import signal
import time

from fskit import FaultApp


def test_pass_through_without_rules(app: FaultApp) -> None:
    r = app.run("h = m.open_session(slot); print(rnd(h), bytes(buf[:16]) != bytes(16))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True"]


def test_error_by_name_and_number(app: FaultApp) -> None:
    app.set_rules("C_GenerateRandom error rv=CKR_DEVICE_MEMORY\nC_SeedRandom error rv=0x30\n")
    r = app.run("h = m.open_session(slot); print(hex(rnd(h)), hex(m.C_SeedRandom(h, b'x', 1)))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0x31", "0x30"]
    fired = app.fired()
    assert len(fired) == 2 and "C_GenerateRandom error" in fired[0] and "C_SeedRandom error" in fired[1]


def test_after_count_every(app: FaultApp) -> None:
    app.set_rules("C_GenerateRandom error rv=CKR_GENERAL_ERROR after=2 count=2\n"
                  "C_SeedRandom error rv=CKR_GENERAL_ERROR every=3\n")
    r = app.run("""
        h = m.open_session(slot)
        print(*[rnd(h) for _ in range(7)])
        print(*[m.C_SeedRandom(h, b'x', 1) for _ in range(9)])
        """)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    assert first.split() == ["0", "0", "5", "5", "0", "0", "0"]
    assert second.split() == ["0", "0", "5", "0", "0", "5", "0", "0", "5"]
    assert len(app.fired()) == 5


def test_procs_counts_processes_not_calls(app: FaultApp) -> None:
    """`procs=2`: the first two processes that meet the rule get it on every matching call,
    the third never; a process that makes no matching call is not counted."""
    app.set_rules("C_GenerateRandom error rv=CKR_GENERAL_ERROR procs=2\n")
    code = "h = m.open_session(slot); print(*[rnd(h) for _ in range(3)])"
    assert app.run("print('no call')").returncode == 0
    runs = [app.run(code) for _ in range(3)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert [r.stdout.split() for r in runs] == [["5", "5", "5"], ["5", "5", "5"], ["0", "0", "0"]]
    pids = {line.split()[1] for line in app.fired()}
    assert len(app.fired()) == 6 and len(pids) == 2


def test_delay_adds_latency(app: FaultApp) -> None:
    app.set_rules("C_GenerateRandom delay ms=150\n")
    r = app.run("""
        h = m.open_session(slot)
        t = time.monotonic(); rv = rnd(h); slow = time.monotonic() - t
        t = time.monotonic(); m.C_SeedRandom(h, b'x', 1); fast = time.monotonic() - t
        print(rv, slow, fast)
        """)
    assert r.returncode == 0, r.stderr
    rv, slow, fast = r.stdout.split()
    assert rv == "0" and 0.15 <= float(slow) < 1.0 and float(fast) < 0.1


def test_hang_until_the_rule_is_removed(app: FaultApp) -> None:
    app.set_rules("C_GenerateRandom hang\n")
    p = app.start("""
        h = m.open_session(slot)
        print("calling", flush=True)
        t = time.monotonic(); rv = rnd(h)
        print("returned", rv, time.monotonic() - t, flush=True)
        """)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "calling"
        time.sleep(0.7)
        assert p.poll() is None  # still blocked
        app.set_rules("")
        line = p.stdout.readline().split()
        assert line[:2] == ["returned", "0"] and float(line[2]) >= 0.7
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_crash_kills_only_the_process_that_loaded_it(app: FaultApp) -> None:
    app.set_rules("C_GenerateRandom crash after=1\n")
    r = app.run("h = m.open_session(slot); print('first', rnd(h), flush=True); rnd(h); print('not reached')")
    assert r.returncode == -signal.SIGABRT
    assert r.stdout.split() == ["first", "0"]
    assert any("C_GenerateRandom crash" in line for line in app.fired())


def test_token_removed_and_back(app: FaultApp) -> None:
    p = app.start("""
        h = m.open_session(slot)
        def state():
            n = CK_ULONG()
            m.C_GetSlotList(1, None, C.byref(n))
            info = (C.c_ubyte * 128)()
            m.C_GetSlotInfo(slot, info)
            flags = int.from_bytes(bytes(info[96:104]), "little")
            tok = (C.c_ubyte * 256)()
            return n.value, bool(flags & CKF["CKF_TOKEN_PRESENT"]), hex(m.C_GetTokenInfo(slot, tok)), hex(rnd(h))
        for line in sys.stdin:
            print(*state(), flush=True)
        """)
    try:
        assert p.stdin is not None and p.stdout is not None

        def ask() -> list[str]:
            p.stdin.write("?\n")
            p.stdin.flush()
            return p.stdout.readline().split()

        assert ask()[1:] == ["True", "0x0", "0x0"]
        app.set_rules("* token-removed\n")
        # no slot with a token; the slot says so; slot calls: TOKEN_NOT_PRESENT; session calls: DEVICE_REMOVED
        assert ask() == ["0", "False", "0xe0", "0x32"]
        app.set_rules("")
        assert ask()[1:3] == ["True", "0x0"]
    finally:
        p.kill()
        p.wait()


def test_close_sessions_once(app: FaultApp) -> None:
    app.set_rules("")
    p = app.start("""
        h = m.open_session(slot)
        print(m.login(h, b"1234"), flush=True)
        sys.stdin.readline()
        old = rnd(h)
        h2 = m.open_session(slot)
        info = (C.c_ulong * 4)()
        m.C_GetSessionInfo(h2, info)
        print(hex(old), info[1], rnd(h2), rnd(h2), flush=True)
        """)
    try:
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline().strip() == "0"
        app.set_rules("* close-sessions\n")
        p.stdin.write("go\n")
        p.stdin.flush()
        old, state, a, b = p.stdout.readline().split()
        assert old == "0xb3"  # CKR_SESSION_HANDLE_INVALID: the old session is gone
        assert state == "2"  # CKS_RW_PUBLIC_SESSION: the login went with it
        assert (a, b) == ("0", "0")  # and it happened once
        assert sum("close-sessions" in line for line in app.fired()) == 1
    finally:
        p.kill()
        p.wait()


def test_concurrency_caps_parallel_calls(app: FaultApp) -> None:
    code = """
        def one():
            h = m.open_session(slot)
            assert rnd(h) == 0
        ts = [threading.Thread(target=one) for _ in range(8)]
        t = time.monotonic()
        [x.start() for x in ts]; [x.join() for x in ts]
        print(time.monotonic() - t)
        """
    app.set_rules("C_GenerateRandom delay ms=200\n")
    free = float(app.run(code).stdout)
    app.set_rules("C_GenerateRandom delay ms=200\nconcurrency 2\n")
    capped = float(app.run(code).stdout)
    assert free < 0.8  # eight at once
    assert capped >= 0.8  # two at a time: four rounds of 200 ms


def test_malformed_rules_are_reported_and_skipped(app: FaultApp) -> None:
    app.set_rules("# comment\nC_Nope error\nC_GenerateRandom explode\n"
                  "C_GenerateRandom error rv=NOT_A_CODE\nC_GenerateRandom delay ms=-3\n"
                  "C_GenerateRandom error rv=CKR_GENERAL_ERROR\n")
    r = app.run("h = m.open_session(slot); print(rnd(h))")
    assert r.returncode == 0
    assert r.stdout.strip() == "5"  # the one good rule applies
    for line, what in ((2, "unknown function"), (3, "unknown action"), (4, "unknown return code"),
                       (5, "bad option")):
        assert f"rules:{line}: {what}" in r.stderr, r.stderr


def test_rules_change_while_the_application_runs(app: FaultApp) -> None:
    app.set_rules("")
    p = app.start("""
        h = m.open_session(slot)
        for line in sys.stdin:
            print(rnd(h), flush=True)
        """)
    try:
        assert p.stdin is not None and p.stdout is not None

        def call() -> str:
            p.stdin.write("\n")
            p.stdin.flush()
            return p.stdout.readline().strip()

        assert call() == "0"
        app.set_rules("C_GenerateRandom error rv=CKR_DEVICE_ERROR\n")
        assert call() == "48"
        app.set_rules("C_GenerateRandom error rv=CKR_DEVICE_ERROR\n# changed\n")
        assert call() == "48"
        app.set_rules("")
        assert call() == "0"
    finally:
        p.kill()
        p.wait()
