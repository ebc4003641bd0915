"""`p11p reload` of a changed group under a signing load (issue 14): settings apply in
place, a member removed hands its sessions to the other (failover with replay), a member
added comes into service; the application's sessions and login go on through all of it,
every signature verifies, none is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hakit import HAGroup
from kit import CLIENT_SO, USER_PIN, wait_for

HERE = Path(__file__).resolve().parent
THREADS, SECONDS = 4, 8.0


def reload(group: HAGroup, text: str) -> None:
    (group.daemon.root / "tokens.d" / "ha.toml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "reload", "--config",
                        str(group.daemon.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def without(text: str, member: str) -> str:
    head, *blocks = text.split("\n[[member]]")
    return head + "".join("\n[[member]]" + b for b in blocks if f'name = "{member}"' not in b)


def served(group: HAGroup) -> dict[str, int]:
    (g,) = group.status()["groups"]
    return {m["name"]: m["calls_served"] for m in g["members"]}


def test_reload_under_load_keeps_every_session(ha_factory: Any, ha_keys: Path) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    first = (group.daemon.root / "tokens.d" / "ha.toml").read_text()
    load = subprocess.Popen(
        [sys.executable, str(HERE / "load_app.py"), str(CLIENT_SO), "ha", USER_PIN,
         str(THREADS), str(SECONDS), str(ha_keys)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **group.daemon.env})
    try:
        assert wait_for(lambda: served(group)["hsmA"] > 200, 15)
        # settings: timeouts, policy, weights, recovery, probes
        changed = (first.replace("call_timeout = 1.5", "call_timeout = 2.5")
                   .replace("hold_timeout = 2", "hold_timeout = 3")
                   .replace('policy = "failover"', 'policy = "balance"')
                   .replace("interval = 0.2", "interval = 0.3")
                   .replace('name = "hsmB"', 'name = "hsmB"\nweight = 3'))
        changed = changed.replace("[recovery]", "[health]\ninterval = 1\n\n[recovery]", 1)
        reload(group, changed)
        log = group.daemon.log_text()
        for what in ("call_timeout", "hold_timeout", "policy", "recovery", "health",
                     "hsmB.weight"):
            assert what in log.split("reload: group ha changed")[-1].splitlines()[0], what
        assert group.status()["groups"][0]["policy"] == "balance"  # new sessions spread
        # hsmA removed: its sessions fail over to hsmB, with login and replay
        reload(group, without(changed, "hsmA"))
        assert [m["name"] for m in group.status()["groups"][0]["members"]] == ["hsmB"]
        time.sleep(1.0)
        # hsmA added again: it comes into service and takes calls
        reload(group, changed)
        group.wait_state("hsmA", "OK")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, err
    result = json.loads(out)
    print(f"reload under load: {result}")
    assert result["errors"] == 0, result
    assert result["ops"] > 100, result
    assert result["slowest"] < 3.0, result
    log = group.daemon.log_text()
    assert "member removed: group=ha member=hsmA" in log
    # the added member serves: with hsmB drained, a new application runs on it alone
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "member", "drain", "ha", "hsmB",
                        "--config", str(group.daemon.config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mark = served(group)["hsmA"]
    again = subprocess.run(
        [sys.executable, str(HERE / "load_app.py"), str(CLIENT_SO), "ha", USER_PIN, "2", "1.5",
         str(ha_keys)], capture_output=True, text=True, timeout=60,
        env={**os.environ, **group.daemon.env})
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["errors"] == 0 and second["ops"] > 10, second
    assert served(group)["hsmA"] >= mark + second["ops"]
    assert "CKR_SESSION_HANDLE_INVALID" not in log.split("reload: group ha changed")[1]
