"""Configuration loading: defaults, relative paths, and errors naming file, line, key."""

from __future__ import annotations

from pathlib import Path

import pytest
from p11p.daemon.config import ConfigError, load

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def write(tmp: Path, groups: dict[str, str], main: str = "") -> Path:
    (tmp / "tokens.d").mkdir(exist_ok=True)
    for name, body in groups.items():
        (tmp / "tokens.d" / f"{name}.toml").write_text(body)
    path = tmp / "p11p.toml"
    path.write_text(main or '[daemon]\nsocket = "run/p.sock"\ntokens_dir = "tokens.d"\n')
    return path


def test_full_group(tmp_path: Path) -> None:
    path = write(tmp_path, {"a": f"""
label = "signing"
policy = "balance"
write_policy = "refuse"
call_timeout = 2.5
hold_timeout = 1
replay_limit = 4096
standby_logins = false
allow_users = ["root", 1000]
[recovery]
interval = 0.5
attempts = 3
[rv_class]
CKR_FUNCTION_FAILED = "member_failed"
[[member]]
name = "a"
module = "{MODULE}"
token = "tokA"
weight = 2
env = {{ SOFTHSM2_CONF = "/x" }}
[[member]]
name = "b"
module = "{MODULE}"
serial = "1234"
"""})
    c = load(path)
    assert c.socket == tmp_path / "run" / "p.sock"
    (g,) = c.groups
    assert (g.label, g.policy, g.write_policy, g.call_timeout, g.hold_timeout) == (
        "signing", "balance", "refuse", 2.5, 1.0)
    assert g.recovery.interval == 0.5 and g.recovery.attempts == 3
    assert g.standby_logins is False
    assert g.allow_users == ("root", "1000")
    assert [m.name for m in g.members] == ["a", "b"]
    assert g.members[0].weight == 2 and g.members[0].env == {"SOFTHSM2_CONF": "/x"}
    assert g.members[1].serial == "1234" and g.members[1].token is None
    assert g.rv_classes == {0x6: "member_failed"}


def test_errors_are_all_reported_with_positions(tmp_path: Path) -> None:
    path = write(tmp_path, {
        "a": f'label = "one"\n[[member]]\nname = "x"\nmodule = "{MODULE}"\ntoken = "t"\nweight = 0\n',
        "b": 'label = "one"\n[rv_class]\nCKR_NOPE = "application"\n[[member]]\nname = "x"\nmodule = "rel.so"\ntoken = "t"\n',
    })
    with pytest.raises(ConfigError) as err:
        load(path)
    text = "\n".join(err.value.errors)
    assert f"{tmp_path}/tokens.d/a.toml:6: member[0].weight: must be at least 1" in text
    assert f"{tmp_path}/tokens.d/b.toml:3: rv_class.CKR_NOPE: unknown return code" in text
    assert f"{tmp_path}/tokens.d/b.toml:6: member[0].module: must be an absolute path" in text
    assert "b.toml:1: label: 'one' is already used" in text


def test_missing_tokens_dir(tmp_path: Path) -> None:
    path = tmp_path / "p11p.toml"
    path.write_text('[daemon]\ntokens_dir = "nope"\n')
    with pytest.raises(ConfigError, match=r"p11p.toml:2: daemon.tokens_dir: not a directory"):
        load(path)


def test_label_too_long(tmp_path: Path) -> None:
    path = write(tmp_path, {"a": f'label = "{"x" * 33}"\n[[member]]\nname="a"\nmodule="{MODULE}"\ntoken="t"\n'})
    with pytest.raises(ConfigError, match=r"a.toml:1: label: a token label has at most 32 bytes"):
        load(path)


def test_health_probes_and_hold_out(tmp_path: Path) -> None:
    member = f'[[member]]\nname = "x"\nmodule = "{MODULE}"\ntoken = "t"\n'
    path = write(tmp_path, {"a": 'label = "a"\n[health]\ninterval = 2\nprobe = "sign"\n'
                                 'probe_key = "k"\n[recovery]\nmax_interval = 60\n' + member})
    group = load(path).groups[0]
    assert (group.health.interval, group.health.probe, group.health.probe_key) == (2.0, "sign", "k")
    assert group.recovery.max_interval == 60.0
    (tmp_path / "d").mkdir()
    (tmp_path / "bad").mkdir()
    default = load(write(tmp_path / "d", {"a": 'label = "a"\n' + member})).groups[0]
    assert (default.health.interval, default.health.probe) == (10.0, "token-info")
    bad = write(tmp_path / "bad", {"a": 'label = "a"\n[health]\nprobe = "sign"\n'
                                        'interval = -1\n[recovery]\ninterval = 5\n'
                                        'max_interval = 1\n' + member,
                                   "b": 'label = "b"\n[health]\nprobe = "ping"\n' + member})
    with pytest.raises(ConfigError) as err:
        load(bad)
    text = "\n".join(err.value.errors)
    assert "a.toml:2: health.probe_key: probe = \"sign\" needs probe_key" in text
    assert "a.toml:4: health.interval: must be at least 0" in text
    assert "a.toml:7: recovery.max_interval: must be at least [recovery] interval" in text
    assert "b.toml:3: health.probe: must be one of" in text


def test_standby_logins_defaults_on_and_must_be_a_boolean(tmp_path: Path) -> None:
    member = f'[[member]]\nname = "x"\nmodule = "{MODULE}"\ntoken = "t"\n'
    (g,) = load(write(tmp_path, {"a": 'label = "one"\n' + member})).groups
    assert g.standby_logins is True
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, {"a": 'label = "one"\nstandby_logins = "no"\n' + member}))
    assert f"{tmp_path}/tokens.d/a.toml:2: standby_logins:" in "\n".join(err.value.errors)
