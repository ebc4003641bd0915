"""Access control: each group names the users and groups allowed; others see no such
slot and get CKR_SLOT_ID_INVALID if they guess one; the socket is in a directory of its
own, mode 0660, owned by the configured group; refusals are logged with uid and pid."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import CLIENT_SO, Daemon, SoftHSM, one_member_group

USER, GROUP = "p11ptest-user", "p11ptest"

PROBE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <p11-kit/pkcs11.h>
int main(int argc, char **argv)
{
	CK_FUNCTION_LIST_PTR f;
	CK_ULONG n = 0;
	CK_SLOT_INFO info;
	void *h = dlopen(argv[1], RTLD_NOW);
	CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
	(void)argc;
	get(&f);
	f->C_Initialize(NULL);
	f->C_GetSlotList(CK_FALSE, NULL, &n);
	printf("%lu", n);
	for (CK_SLOT_ID s = 0; s < 2; s++)
		printf(" %#lx", f->C_GetSlotInfo(s, &info));
	printf("\n");
	f->C_Finalize(NULL);
	return 0;
}
"""


@pytest.fixture(scope="module")
def test_user() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("creating a test user needs root")
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
        gid = grp.getgrnam(GROUP).gr_gid
    try:
        uid = pwd.getpwnam(USER).pw_uid
    except KeyError:
        subprocess.run(["useradd", "-M", "-N", "-g", GROUP, "-s", "/usr/sbin/nologin", USER], check=True)
        uid = pwd.getpwnam(USER).pw_uid
    return uid, gid


def as_user(uid: int, gid: int, *cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", *cmd],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse (pytest's own is private)."""
    path = Path(tempfile.mkdtemp(prefix="p11p-access-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_groups_are_seen_only_by_who_they_allow(softhsm: SoftHSM, open_tmp: Path,
                                                test_user: tuple[int, int]) -> None:
    uid, gid = test_user
    tmp_path = open_tmp
    d = Daemon(tmp_path / "p11p", {
        "a-root": one_member_group("root-only", softhsm, "tokA", 'allow_users = ["root"]'),
        "b-team": one_member_group("team", softhsm, "tokB", f'allow_groups = ["{GROUP}"]'),
    }, daemon_extra=f'socket_group = "{GROUP}"\n')
    os.chmod(tmp_path / "p11p", 0o755)
    probe = tmp_path / "probe"
    src = tmp_path / "probe.c"
    src.write_text(PROBE)
    subprocess.run(["gcc", "-I/usr/include/p11-kit-1", "-o", str(probe), str(src), "-ldl"], check=True)
    d.start()
    try:
        sock = d.socket
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and sock.stat().st_gid == gid
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750 and sock.parent.stat().st_gid == gid
        env = {"PATH": "/usr/bin:/bin", **d.env}
        # root sees its group only, the team member sees the team's only
        r = subprocess.run(["pkcs11-tool", "--module", str(CLIENT_SO), "-L"], capture_output=True,
                           text=True, env=env)
        assert "root-only" in r.stdout and "team" not in r.stdout, r.stdout
        r = as_user(uid, gid, "pkcs11-tool", "--module", str(CLIENT_SO), "-L", env=env)
        assert r.returncode == 0, r.stderr
        assert "team" in r.stdout and "root-only" not in r.stdout, r.stdout
        # guessing the other slot: CKR_SLOT_ID_INVALID (slots are 0 = root-only, 1 = team)
        r = as_user(uid, gid, str(probe), str(CLIENT_SO), env=env)
        assert r.stdout.split() == ["1", "0x3", "0"], r.stdout + r.stderr
        log = d.log_text()
        assert re.search(rf"access refused: uid={uid} pid=\d+ slot=0", log), log[-2000:]
        # someone in neither: cannot even reach the socket's directory
        nobody = pwd.getpwnam("nobody")
        r = as_user(nobody.pw_uid, nobody.pw_gid, str(probe), str(CLIENT_SO), env=env)
        assert r.stdout.split()[0] == "0"
    finally:
        d.stop()
