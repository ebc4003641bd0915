"""`make install` (install.mk): where each file goes for PREFIX and DESTDIR, that the
configuration skeleton is written once and kept, that `make uninstall` takes back
what install put down and leaves the administrator's configuration, and that what it
installs runs the daemon as user p11p (sysusers file, units, /etc/p11p's ownership)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import ROOT
from syskit import MULTIARCH, ServiceUser, ensure_command, make_install

pytestmark = pytest.mark.timeout(30, func_only=True)


def files_under(root: Path) -> set[str]:
    return {"/" + str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def make_uninstall(destdir: Path, *variables: str) -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT), "-f", "install.mk", "uninstall",
                    f"DESTDIR={destdir}", f"PYTHON={sys.executable}", *variables],
                   capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.parametrize("prefix", ["/usr/local", "/usr"])
def test_layout(tmp_path: Path, prefix: str) -> None:
    make_install(tmp_path, f"PREFIX={prefix}")
    lib = f"{prefix}/lib/{MULTIARCH}/p11p"
    assert files_under(tmp_path) == {
        f"{lib}/p11p-client.so", f"{lib}/p11p-faultsim.so",
        "/usr/share/p11-kit/modules/p11p.module",
        f"{prefix}/bin/p11p",
        f"{prefix}/lib/systemd/system/p11p.service", f"{prefix}/lib/systemd/system/p11p.socket",
        f"{prefix}/lib/sysusers.d/p11p.conf",
        f"{prefix}/share/doc/p11p/README.md", f"{prefix}/share/doc/p11p/network-hsm.conf",
        "/etc/p11p/p11p.toml", "/etc/p11p/tokens.d/example.toml.sample",
    }
    module = (tmp_path / "usr/share/p11-kit/modules/p11p.module").read_text()
    assert f"module: {lib}/p11p-client.so" in module.splitlines()
    assert (tmp_path / lib.lstrip("/") / "p11p-client.so").read_bytes() == \
        (ROOT / "build" / "p11p-client.so").read_bytes()
    service = (tmp_path / f"{prefix}/lib/systemd/system/p11p.service".lstrip("/")).read_text()
    assert f"ExecStart={prefix}/bin/p11p daemon --config /etc/p11p/p11p.toml" in service
    assert {"User=p11p", "Group=p11p"} <= set(service.splitlines())
    sysusers = (tmp_path / f"{prefix}/lib/sysusers.d/p11p.conf".lstrip("/")).read_text()
    assert "g p11p -" in sysusers.splitlines()
    assert 'u p11p - "p11p PKCS#11 proxy" /var/lib/p11p' in sysusers.splitlines()
    # the daemon (user p11p, group p11p) reads the configuration, others do not
    modes = {path: stat.S_IMODE((tmp_path / path.lstrip("/")).stat().st_mode)
             for path in ("/etc/p11p", "/etc/p11p/tokens.d", "/etc/p11p/p11p.toml",
                          "/etc/p11p/tokens.d/example.toml.sample")}
    assert modes == {"/etc/p11p": 0o2750, "/etc/p11p/tokens.d": 0o2750,
                     "/etc/p11p/p11p.toml": 0o640, "/etc/p11p/tokens.d/example.toml.sample": 0o640}


def test_skeleton_and_example_are_valid(tmp_path: Path) -> None:
    make_install(tmp_path)
    etc = tmp_path / "etc/p11p"
    launcher = tmp_path / "usr/local/bin/p11p"
    empty = subprocess.run([str(launcher), "check-config", str(etc / "p11p.toml")],
                           capture_output=True, text=True, timeout=30)
    assert empty.returncode == 1 and "no *.toml token files" in empty.stderr, empty.stderr
    # the example, uncommented as its notes say, is a valid token file
    example = (etc / "tokens.d/example.toml.sample").read_text().splitlines()
    body = [line[2:] if line.startswith("# ") else "" for line in example
            if not line.startswith("##")]
    (etc / "tokens.d/signing.toml").write_text("\n".join(body) + "\n")
    checked = subprocess.run([str(launcher), "check-config", str(etc / "p11p.toml")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "group 'signing' policy=failover members=hsm-a, hsm-b" in checked.stdout


def test_reinstall_keeps_configuration(tmp_path: Path) -> None:
    make_install(tmp_path)
    config = tmp_path / "etc/p11p/p11p.toml"
    config.write_text("# the administrator's\n")
    (tmp_path / "etc/p11p/tokens.d/example.toml.sample").unlink()
    again = make_install(tmp_path)
    assert config.read_text() == "# the administrator's\n"
    assert "p11p.toml kept" in again.stdout
    assert (tmp_path / "etc/p11p/tokens.d/example.toml.sample").exists()


def test_an_existing_p11p_command_is_kept(tmp_path: Path) -> None:
    """A p11p that pip put in $(PREFIX)/bin is not replaced by the launcher, nor
    removed by uninstall."""
    bindir = tmp_path / "usr/local/bin"
    bindir.mkdir(parents=True)
    (bindir / "p11p").write_text("#!/bin/sh\n# pip's\n")
    out = make_install(tmp_path)
    assert "(not ours): kept" in out.stdout
    assert (bindir / "p11p").read_text() == "#!/bin/sh\n# pip's\n"
    make_uninstall(tmp_path)
    assert (bindir / "p11p").exists()


@pytest.mark.parametrize("prefix", ["/usr/local", "/usr"])
def test_uninstall(tmp_path: Path, prefix: str) -> None:
    make_install(tmp_path, f"PREFIX={prefix}")
    make_uninstall(tmp_path, f"PREFIX={prefix}")
    assert files_under(tmp_path) == {"/etc/p11p/p11p.toml",
                                     "/etc/p11p/tokens.d/example.toml.sample"}
    assert not (tmp_path / f"{prefix}/lib/{MULTIARCH}/p11p".lstrip("/")).exists()


def test_sysusers_makes_user_and_group_p11p(tmp_path: Path) -> None:
    """The installed sysusers file, applied to an empty root (not this machine), makes
    user p11p in group p11p, home /var/lib/p11p (the service's StateDirectory=), no
    login; and, where an older install made only the group, adds the user to it."""
    sysusers = Path(ensure_command("systemd-sysusers", "systemd"))
    make_install(tmp_path / "dest")
    conf = tmp_path / "dest/usr/local/lib/sysusers.d/p11p.conf"
    fresh, older = tmp_path / "fresh", tmp_path / "older"
    (fresh / "etc").mkdir(parents=True)
    (older / "etc").mkdir(parents=True)
    (older / "etc/group").write_text("p11p:x:990:\n")
    for root in (fresh, older):
        out = subprocess.run([str(sysusers), f"--root={root}", str(conf)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        users = {line.split(":")[0]: line.split(":")
                 for line in (root / "etc/passwd").read_text().splitlines()}
        groups = {line.split(":")[0]: line.split(":")
                  for line in (root / "etc/group").read_text().splitlines()}
        assert users["p11p"][4:] == ["p11p PKCS#11 proxy", "/var/lib/p11p", "/usr/sbin/nologin"]
        assert users["p11p"][3] == groups["p11p"][2]
    assert groups["p11p"][2] == "990"


@pytest.fixture
def p11p_user() -> Iterator[ServiceUser]:
    """User and group p11p, made for the test when the machine has none (and removed)."""
    user = ServiceUser("p11p")
    try:
        yield user
    finally:
        user.remove()


def test_configuration_is_group_p11p(tmp_path: Path, p11p_user: ServiceUser) -> None:
    """Where group p11p exists, /etc/p11p and the files install puts there are root:p11p;
    a file the administrator adds later gets the group from the folder (setgid)."""
    make_install(tmp_path)
    etc = tmp_path / "etc/p11p"
    for path in (etc, etc / "tokens.d", etc / "p11p.toml", etc / "tokens.d/example.toml.sample"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, p11p_user.gid), path
    added = etc / "tokens.d/signing.toml"
    added.write_text("# the administrator's\n")
    assert added.stat().st_gid == p11p_user.gid
    os.chown(etc / "p11p.toml", 0, 0)  # kept as it is on a second install
    again = make_install(tmp_path)
    assert "p11p.toml kept" in again.stdout
    assert (etc / "p11p.toml").stat().st_gid == 0
