"""System-test kit: the tools the tests drive (installed when missing), `make install`
into a temporary DESTDIR, a private mount namespace that shows the installed files at
their real paths, and a datagram socket that plays the service manager for sd_notify.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit import ROOT

MULTIARCH = subprocess.run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], capture_output=True,
                           text=True).stdout.strip() or "x86_64-linux-gnu"
PREFIX = "/usr/local"
P11P_LIBDIR = Path(f"{PREFIX}/lib/{MULTIARCH}/p11p")
P11KIT_MODULEDIR = Path("/usr/share/p11-kit/modules")
P11KIT_PROXY = Path(f"/usr/lib/{MULTIARCH}/p11-kit-proxy.so")


def ensure_command(command: str, package: str) -> str:
    """The path of `command`; its Debian package is installed first when it is missing."""
    path = shutil.which(command)
    if path is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", package]
        try:
            if subprocess.run(install, env=env, capture_output=True, timeout=300).returncode:
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                               timeout=300)
                subprocess.run(install, env=env, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"{command} is missing and apt-get could not install {package}: {exc}")
        path = shutil.which(command)
    if path is None:
        pytest.skip(f"{command} is missing and apt-get could not install {package}")
    return path


def make_install(destdir: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    """`make install-files` from install.mk into `destdir` (the build must exist)."""
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-f", "install.mk", "install-files",
         f"DESTDIR={destdir}", f"PYTHON={sys.executable}", *variables],
        capture_output=True, text=True, timeout=60, check=True)


def private_mounts() -> None:
    """Skips unless this process may make a private mount namespace (root, CAP_SYS_ADMIN)."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip("a private mount namespace is needed to show the installed files at "
                    f"their real paths (unshare: {probe.stderr.strip()})")


def installed_at(destdir: Path, target: Path) -> tuple[Path, Path]:
    """A bind that shows `target` as installed under `destdir`: the deepest directory at
    or above `target` that exists on this machine (a mount point must exist), bound from
    the same place under `destdir`."""
    point = target
    while not point.is_dir():
        point = point.parent
    return destdir / point.relative_to("/"), point


def in_namespace(binds: list[tuple[Path, Path]], argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace where each (source, target) directory is
    bind-mounted, in order, with what is mounted under it (so a bind may carry earlier
    ones); nothing leaks to the machine's mounts."""
    script = []
    args: list[str] = []
    for source, target in binds:
        script.append(f'mount --rbind "${{{len(args) + 1}}}" "${{{len(args) + 2}}}" &&')
        args += [str(source), str(target)]
    script.append(f'shift {len(args)} && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " ".join(script),
            "sh", *args, *argv]


class NotifyListener:
    """The service manager's end of sd_notify: an AF_UNIX datagram socket.

    `path` None: an abstract address (NOTIFY_SOCKET="@name"), as systemd may pass.
    """

    def __init__(self, path: Path | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if path is None:
            name = f"p11p-test-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)

    def receive(self, timeout: float) -> tuple[str, float] | None:
        """The next message and its arrival time (time.monotonic), or None."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return data.decode(), time.monotonic()

    def close(self) -> None:
        self.sock.close()


def connects(path: Path) -> bool:
    """Whether a client connection to `path` is accepted now (no retry)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


# -- user p11p ---------------------------------------------------------------------------


class ServiceUser:
    """User and group `name`, as packaging/p11p.sysusers makes them: made here with
    useradd when missing, and removed by `remove()` only if made here."""

    def __init__(self, name: str = "p11p") -> None:
        self.name = name
        self.made_user = self.made_group = False
        if _getent("passwd", name) is None:
            ensure_command("useradd", "passwd")
            self.made_group = _getent("group", name) is None
            group = ["--user-group"] if self.made_group else ["--gid", name]
            subprocess.run(["useradd", "--system", *group, "--home-dir", "/var/lib/p11p",
                            "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                           capture_output=True, text=True, timeout=30, check=True)
            self.made_user = True
        self.uid, self.gid = int(_getent("passwd", name)[2]), int(_getent("group", name)[2])

    def remove(self) -> None:
        if self.made_user:
            subprocess.run(["userdel", self.name], capture_output=True, timeout=30, check=True)
        if self.made_group and _getent("group", self.name) is not None:
            subprocess.run(["groupdel", self.name], capture_output=True, timeout=30, check=True)


def _getent(database: str, name: str) -> list[str] | None:
    out = subprocess.run(["getent", database, name], capture_output=True, text=True)
    return out.stdout.strip().split(":") if out.returncode == 0 else None


def as_user(user: str, argv: list[str]) -> list[str]:
    """`argv` run as `user`, with its group and supplementary groups, nothing else kept."""
    return ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--", *argv]


def interpreter_binds(user: ServiceUser, scratch: Path) -> list[tuple[Path, Path]]:
    """Binds (for in_namespace) that let `user` run this interpreter when it lives under
    a home directory others may not enter (pyenv's /root/.pyenv): that directory is
    shown as `scratch`, which holds only the interpreter's tree. Empty when not needed."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    for closed in [*reversed(prefix.parents), prefix][1:]:
        if not os.stat(closed).st_mode & 0o001:
            break
    else:
        return []
    inner = closed / prefix.relative_to(closed).parts[0]
    scratch.mkdir(mode=0o755, parents=True, exist_ok=True)
    (scratch / inner.name).mkdir(exist_ok=True)
    return [(inner, scratch / inner.name), (scratch, closed)]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += parents.get(current, [])
    return tree


def uids_of(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and filesystem uid of `pid` (/proc/PID/status Uid:)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(field) for field in line.split()[1:])
    raise AssertionError(f"no Uid: line for {pid}")
