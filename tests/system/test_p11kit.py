"""p11-kit: after `make install`, p11-kit-aware applications see p11p's tokens —
GnuTLS's `p11tool`, and NSS-style loaders through `p11-kit-proxy.so`.

The install goes to a temporary DESTDIR. p11-kit reads no user configuration for root,
so each application runs in a private mount namespace where the installed module file
sits in /usr/share/p11-kit/modules (next to this machine's own module files) and the
installed library at its real path; the machine's files are never touched.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kit import USER_PIN, Daemon, SoftHSM, one_member_group
from syskit import (
    P11KIT_MODULEDIR,
    P11KIT_PROXY,
    P11P_LIBDIR,
    ensure_command,
    in_namespace,
    installed_at,
    make_install,
    private_mounts,
)

pytestmark = pytest.mark.timeout(30, func_only=True)

LABEL = "p11p-kit"


@dataclass
class Installed:
    dest: Path
    binds: list[tuple[Path, Path]]

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(in_namespace(self.binds, argv), env={**os.environ, **env},
                              capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    ensure_command("p11tool", "gnutls-bin")
    ensure_command("pkcs11-tool", "opensc")
    ensure_command("unshare", "util-linux")
    private_mounts()
    root = tmp_path_factory.mktemp("p11kit-install")
    dest = root / "dest"
    make_install(dest)
    module_file = dest / P11KIT_MODULEDIR.relative_to("/") / "p11p.module"
    assert f"module: {P11P_LIBDIR}/p11p-client.so" in module_file.read_text().splitlines()
    # the machine's module files plus the installed one, as after a real install
    modules = root / "modules"
    modules.mkdir()
    for existing in P11KIT_MODULEDIR.glob("*.module"):
        if existing.name != "p11p.module":
            (modules / existing.name).write_bytes(existing.read_bytes())
    (modules / "p11p.module").write_bytes(module_file.read_bytes())
    return Installed(dest, [(modules, P11KIT_MODULEDIR), installed_at(dest, P11P_LIBDIR)])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    hsm = SoftHSM(tmp_path_factory.mktemp("softhsm-p11kit"))
    hsm.init_token("tokKit")
    d = Daemon(tmp_path_factory.mktemp("p11p-kit"),
               {"kit": one_member_group(LABEL, hsm, "tokKit")}).start()
    yield d
    d.stop()


def test_installed_library_is_what_the_module_file_names(installed: Installed) -> None:
    listing = installed.run(["ls", "-l", str(P11P_LIBDIR)], {})
    assert listing.returncode == 0, listing.stderr
    assert "p11p-client.so" in listing.stdout and "p11p-faultsim.so" in listing.stdout
    # the binds stayed inside the namespace
    mount_points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                    .splitlines()}
    for _, target in installed.binds:
        assert str(target) not in mount_points


def test_p11tool_lists_the_p11p_token(installed: Installed, daemon: Daemon) -> None:
    result = installed.run(["p11tool", "--list-tokens"], daemon.env)
    assert result.returncode == 0, result.stdout + result.stderr
    tokens = result.stdout.split("Token ")
    ours = [t for t in tokens if f"Label: {LABEL}\n" in t]
    assert ours, result.stdout
    assert f"Module: {P11P_LIBDIR}/p11p-client.so" in ours[0], ours[0]
    assert f"token={LABEL}" in ours[0]  # its PKCS#11 URI, which GnuTLS applications take


def test_p11kit_lists_the_module(installed: Installed, daemon: Daemon) -> None:
    result = installed.run(["p11-kit", "list-modules"], daemon.env)
    assert result.returncode == 0, result.stderr
    assert f"p11p: {P11P_LIBDIR}/p11p-client.so" in result.stdout, result.stdout
    assert "library-description: p11p PKCS#11 proxy client" in result.stdout
    assert f"token: {LABEL}" in result.stdout


def test_nss_style_access_through_p11kit_proxy(installed: Installed, daemon: Daemon) -> None:
    """p11-kit-proxy.so is the one module NSS (and others) load to reach every
    registered module: the p11p token is there, and a key made and used through it
    lives on the token behind p11p."""
    if not P11KIT_PROXY.exists():
        pytest.skip(f"{P11KIT_PROXY} is missing (Debian package p11-kit-modules)")
    proxy = ["pkcs11-tool", "--module", str(P11KIT_PROXY)]
    listed = installed.run([*proxy, "-L"], daemon.env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"token label        : {LABEL}" in listed.stdout, listed.stdout
    token = ["--token-label", LABEL, "--login", "--pin", USER_PIN]
    made = installed.run([*proxy, *token, "--keypairgen", "--key-type", "EC:prime256v1",
                          "--label", "via-proxy", "--id", "51"], daemon.env)
    assert made.returncode == 0, made.stdout + made.stderr
    data = daemon.root / "data.bin"
    data.write_bytes(hashlib.sha256(b"signed through p11-kit-proxy and p11p").digest())
    signed = installed.run([*proxy, *token, "--sign", "--mechanism", "ECDSA",
                            "--id", "51", "--input-file", str(data),
                            "--output-file", str(daemon.root / "sig.bin")], daemon.env)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    signature = (daemon.root / "sig.bin").read_bytes()
    assert len(signature) == 64  # r || s on P-256
    pub = installed.run([*proxy, "--token-label", LABEL, "--read-object", "--type", "pubkey",
                         "--id", "51", "--output-file", str(daemon.root / "pub.der")],
                        daemon.env)
    assert pub.returncode == 0, pub.stdout + pub.stderr
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    key = load_der_public_key((daemon.root / "pub.der").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                     int.from_bytes(signature[32:], "big"))
    key.verify(der, data.read_bytes(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    # the key is on the token p11p serves, seen without the proxy too
    from kit import CLIENT_SO
    direct = subprocess.run(["pkcs11-tool", "--module", str(CLIENT_SO), *token, "-O"],
                            env={**os.environ, **daemon.env}, capture_output=True, text=True,
                            timeout=30)
    assert "via-proxy" in direct.stdout, direct.stdout + direct.stderr


def test_p11kit_proxy_still_works_without_the_daemon(installed: Installed,
                                                      tmp_path: Path) -> None:
    """Once p11p.module is installed, every p11-kit-proxy user loads p11p-client.so,
    also when the daemon is stopped or the user may not use its socket: the other
    modules (the system trust store, smart cards) must stay usable."""
    if not P11KIT_PROXY.exists():
        pytest.skip(f"{P11KIT_PROXY} is missing (Debian package p11-kit-modules)")
    env = {"P11P_SOCKET": str(tmp_path / "no-daemon.sock")}
    listed = installed.run(["pkcs11-tool", "--module", str(P11KIT_PROXY), "-L"], env)
    assert listed.returncode == 0, listed.stdout + listed.stderr


def test_p11tool_without_the_daemon_lists_the_others(installed: Installed,
                                                     tmp_path: Path) -> None:
    """GnuTLS asks each module on its own: a stopped daemon hides p11p's tokens only."""
    env = {"P11P_SOCKET": str(tmp_path / "no-daemon.sock")}
    result = installed.run(["p11tool", "--list-tokens"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert LABEL not in result.stdout
