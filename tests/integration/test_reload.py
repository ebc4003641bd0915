"""Reload: SIGHUP (and `p11p reload`) re-reads tokens.d; a group added, changed or
removed takes effect without dropping the sessions of the groups that stay (a changed
group is changed in place: tests/ha/test_reload_ha.py); a configuration that does not
validate is refused and the old one stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from kit import CLIENT_SO, ROOT, USER_PIN, Daemon, SoftHSM, one_member_group, wait_for

APP = f"""
import ctypes as C, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from ckraw import Module, CK_ULONG
m = Module({str(CLIENT_SO)!r})
assert m.initialize() == 0
def labels():
    out = []
    for s in m.slots():
        info = (C.c_ubyte * 512)()
        m.C_GetTokenInfo(s, info)
        out.append((bytes(info[:32]).rstrip().decode(), s))
    return dict(out)
buf = (C.c_ubyte * 16)()
sessions = {{}}
for line in sys.stdin:
    cmd, _, arg = line.split()[0], None, line.split()[1:]
    if cmd == "open":
        h = m.open_session(labels()[arg[0]])
        assert m.login(h, b"{USER_PIN}") in (0, 0x100)
        sessions[arg[0]] = h
        print("ok", flush=True)
    elif cmd == "use":
        print(hex(m.C_GenerateRandom(sessions[arg[0]], buf, 16)), flush=True)
    elif cmd == "labels":
        print(*sorted(labels()), flush=True)
"""


def test_reload_keeps_untouched_groups(softhsm: SoftHSM, tmp_path: Path) -> None:
    d = Daemon(tmp_path / "p11p", {"keep": one_member_group("keep", softhsm, "tokA"),
                                   "change": one_member_group("change", softhsm, "tokB")})
    d.start()
    app = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APP)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env={**os.environ, **d.env})

    def ask(cmd: str) -> str:
        assert app.stdin is not None and app.stdout is not None
        app.stdin.write(cmd + "\n")
        app.stdin.flush()
        return app.stdout.readline().strip()

    tokens = d.root / "tokens.d"
    try:
        assert ask("open keep") == "ok" and ask("open change") == "ok"
        assert ask("labels") == "change keep"
        # change one group, add another, then SIGHUP
        (tokens / "change.toml").write_text(textwrap.dedent(one_member_group(
            "change", softhsm, "tokB", "call_timeout = 7")))
        (tokens / "added.toml").write_text(textwrap.dedent(one_member_group("added", softhsm, "tokB")))
        os.kill(d.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload done: 3 groups" in d.log_text())
        assert ask("use keep") == "0x0"  # untouched: the session and its login survive
        assert ask("use change") == "0x0"  # changed in place: its sessions go on too
        assert ask("labels") == "added change keep"
        # a bad file: refused with file, line and key; the running configuration stays
        (tokens / "bad.toml").write_text('label = "bad"\npolicy = "nope"\n')
        r = subprocess.run([sys.executable, "-m", "p11p.daemon", "reload", "--config", str(d.config)],
                           capture_output=True, text=True)
        assert r.returncode == 1 and "bad.toml:2: policy: must be one of" in r.stderr, r.stderr
        assert ask("labels") == "added change keep"
        assert ask("use keep") == "0x0"
        (tokens / "bad.toml").unlink()
        (tokens / "added.toml").unlink()
        r = subprocess.run([sys.executable, "-m", "p11p.daemon", "reload", "--config", str(d.config)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert ask("labels") == "change keep"
        assert ask("use keep") == "0x0"
    finally:
        app.kill()
        app.wait()
        d.stop()

