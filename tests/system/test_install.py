"""`make install` (install.mk): where each file goes for PREFIX and DESTDIR, that the
configuration skeleton is written once and kept, and that `make uninstall` takes back
what install put down and leaves the administrator's configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kit import ROOT
from syskit import MULTIARCH, make_install

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
    sysusers = (tmp_path / f"{prefix}/lib/sysusers.d/p11p.conf".lstrip("/")).read_text()
    assert "g p11p -" in sysusers.splitlines()


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
