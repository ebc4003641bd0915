"""The admin socket: status, member drain/enable for maintenance, reload, and the
group's token objects per member (`p11p keys`).

One JSON object per line each way, on an AF_UNIX socket only root (the daemon's user)
can open (mode 0600). `p11p status` and `p11p member ...` are its clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p11p.daemon.keys import list_keys
from p11p.daemon.members import Member, MemberState
from p11p.daemon.metrics import prometheus

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.admin")
MAX_LINE = 64 * 1024


class AdminServer:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self.daemon.config.admin_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(path),
                                                       limit=MAX_LINE)
        os.chmod(path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                self.daemon.config.admin_socket.unlink()
            except OSError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                reply = await self.handle(request if isinstance(request, dict) else {})
            except (ValueError, UnicodeDecodeError):
                reply = {"error": "malformed request"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            await self.daemon.direct.count_served()
            return self.daemon.status()
        if cmd == "reload":
            errors = await self.daemon.reload()
            return {"ok": not errors, "errors": errors}
        if cmd == "metrics":
            await self.daemon.direct.count_served()
            return {"text": prometheus(self.daemon.groups)}
        if cmd == "keys":
            pin = request.get("pin")
            return await list_keys(self.daemon, str(request.get("group")),
                                   pin if isinstance(pin, str) else None)
        if cmd in ("drain", "enable"):
            member = self._member(request)
            if member is None:
                return {"error": f"no member {request.get('member')!r} in group "
                                 f"{request.get('group')!r}"}
            if cmd == "drain":
                moved = await self.daemon.drain(member)
                return {"ok": True, "state": member.health.state.value, "moved": moved}
            self.daemon.enable(member)
            return {"ok": True, "state": member.health.state.value}
        return {"error": f"unknown command {cmd!r}"}

    def _member(self, request: dict[str, Any]) -> Member | None:
        for g in self.daemon.groups:
            if g.label == request.get("group"):
                for m in g.members:
                    if m.name == request.get("member"):
                        return m
        return None


def format_status(status: dict[str, Any]) -> str:
    """`p11p status` for people."""
    lines = []
    for g in status["groups"]:
        lines.append(f"group {g['label']} (slot {g['slot']}, policy {g['policy']})")
        lines.append(f"  {'member':<16} {'state':<28} {'sessions':>8} {'in-flight':>9} "
                     f"{'served':>8}  last error")
        for m in g["members"]:
            state = m["state"]
            if state == MemberState.RECOVERING.value:
                state += f" {m['attempt']}/{m['attempts'] or '∞'}"
            elif state == MemberState.FAILED.value and m["last_rv"]:
                state += f" {m['last_rv']}"
            lines.append(f"  {m['name']:<16} {state:<28} {m['sessions']:>8} "
                         f"{m['calls_in_flight']:>9} {m['calls_served']:>8}  "
                         f"{m['last_error'] or '-'}")
            probe = m.get("probe")
            if probe is not None or m.get("held_out"):
                seen = "-" if probe is None else (
                    f"{probe['ago']:.1f} s ago, {probe['latency_ms']:.1f} ms, "
                    + ("OK" if probe["ok"] else f"failed: {probe['error']}"))
                held = f"; held out {m['held_out']:.1f} s more" if m.get("held_out") else ""
                lines.append(f"  {'':<16} last probe: {seen}{held}")
    lines.append(f"applications: {len(status['contexts'])}")
    return "\n".join(lines)


def exchange(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request on the admin socket, from a command (`p11p status`, `p11p doctor`);
    OSError or ValueError when it does not work."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("not a JSON object")
    return reply
