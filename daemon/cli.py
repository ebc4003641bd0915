"""The `p11p` command: daemon, check-config, status, member drain/enable, reload, doctor."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from p11p.daemon.config import DEFAULT_CONFIG, ConfigError, admin_socket_of, load


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s p11p %(levelname)s %(name)s: %(message)s")


def _config_path(args: argparse.Namespace) -> Path:
    """--config, else /etc/p11p/p11p.toml, else the default configuration (made once)."""
    if args.config:
        return Path(args.config)
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    from p11p.daemon import defaults
    return defaults.create(defaults.state_dir())


def cmd_daemon(args: argparse.Namespace) -> int:
    try:
        config = load(_config_path(args))
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    _setup_logging(args.log_level or config.log_level)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        logging.getLogger("p11p").warning("uvloop not available; using asyncio's loop")
    from p11p.daemon import systemd
    from p11p.daemon.service import Daemon

    async def main() -> None:
        daemon = Daemon(config)
        await daemon.start(systemd.inherited_socket())
        systemd.notify("READY=1")
        await daemon.run()
        if daemon.leaving:  # for a restart: nothing more is closed (helpers stay)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(0)

    asyncio.run(main())
    return 0


def cmd_init_default(args: argparse.Namespace) -> int:
    from p11p.daemon import defaults
    root = Path(args.state_dir) if args.state_dir else defaults.state_dir()
    main = defaults.create(root, args.faultsim)
    print(main)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load(Path(args.config))
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        print(f"{len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    for g in config.groups:
        print(f"{g.file}: group {g.label!r} policy={g.policy} members="
              + ", ".join(m.name for m in g.members))
    print(f"{config.file}: OK ({len(config.groups)} groups)")
    return 0


def _admin_path(args: argparse.Namespace) -> Path:
    if args.admin_socket:
        return Path(args.admin_socket)
    try:
        return admin_socket_of(Path(args.config))  # the main file only: tokens.d may be mid-edit
    except ConfigError as exc:
        raise SystemExit("\n".join(exc.errors)) from None


def admin_request(path: Path, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    from p11p.daemon.admin import exchange
    try:
        return exchange(path, request, timeout)
    except OSError as exc:
        raise SystemExit(f"p11p: cannot reach the daemon at {path}: "
                         f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise SystemExit(f"p11p: the daemon at {path} answered badly: {exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    from p11p.daemon.admin import format_status
    if args.prometheus:
        print(admin_request(_admin_path(args), {"cmd": "metrics"})["text"], end="")
        return 0
    status = admin_request(_admin_path(args), {"cmd": "status"})
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_member(args: argparse.Namespace) -> int:
    reply = admin_request(_admin_path(args), {"cmd": args.action, "group": args.group,
                                              "member": args.member})
    if "error" in reply:
        print(f"p11p: {reply['error']}", file=sys.stderr)
        return 1
    print(f"{args.group}/{args.member}: {reply['state']}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = admin_request(_admin_path(args), {"cmd": "reload"}, timeout=120)
    if not reply.get("ok"):
        print("\n".join(reply.get("errors") or [reply.get("error", "reload failed")]), file=sys.stderr)
        print("reload refused; the running configuration stays", file=sys.stderr)
        return 1
    print("reloaded")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from p11p.daemon.keys import format_keys
    request: dict[str, Any] = {"cmd": "keys", "group": args.group}
    if args.pin is not None:  # to C_Login only: never shown or logged
        request["pin"] = sys.stdin.readline().rstrip("\n") if args.pin == "-" else args.pin
    reply = admin_request(_admin_path(args), request, timeout=120)
    if "error" in reply:
        print(f"p11p: {reply['error']}", file=sys.stderr)
        return 2
    text, differ = format_keys(reply)
    print(text)
    return 1 if differ else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from p11p.daemon import doctor
    pin = args.pin
    if pin == "-":
        pin = sys.stdin.readline().rstrip("\n")
    return doctor.run(args.config, pin, args.module, args.admin_socket)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p11p", description="PKCS#11 proxy with HA across HSMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("daemon", help="run the daemon in the foreground")
    p.add_argument("--config", help=f"default: {DEFAULT_CONFIG}, else the built-in default")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_daemon)
    p = sub.add_parser("check-config", help="validate a configuration")
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("init-default", help="create the built-in default configuration")
    p.add_argument("--state-dir", help="where (default: $XDG_STATE_HOME/p11p)")
    p.add_argument("--faultsim", help="put each member behind this p11p-faultsim.so")
    p.set_defaults(func=cmd_init_default)
    for name, func, text in (("status", cmd_status, "groups, members, sessions, load"),
                             ("member", cmd_member, "drain or enable a member"),
                             ("keys", cmd_keys, "a group's token objects and the members "
                              "holding each; exit 1 when members differ"),
                             ("reload", cmd_reload, "re-read tokens.d (as SIGHUP does)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG))
        p.add_argument("--admin-socket", help="the daemon's admin socket (else from --config)")
        if name == "status":
            p.add_argument("--json", action="store_true")
            p.add_argument("--prometheus", action="store_true",
                           help="counters in Prometheus text format")
        elif name == "member":
            p.add_argument("action", choices=["drain", "enable"])
            p.add_argument("group")
            p.add_argument("member")
        elif name == "keys":
            p.add_argument("group")
            p.add_argument("--pin", help="log in to see private objects too ('-': read it "
                           "from stdin)")
        p.set_defaults(func=func)
    p = sub.add_parser("doctor", help="check what applications need, in order: "
                       "configuration, socket, daemon, groups, a test operation")
    p.add_argument("--config", help=f"default: {DEFAULT_CONFIG} when present")
    p.add_argument("--admin-socket", help="the daemon's admin socket (else from --config)")
    p.add_argument("--module", help="the client library to test with (default: the build "
                   "or installed p11p-client.so)")
    p.add_argument("--pin", help="also log in with this user PIN ('-': read it from stdin); "
                   "used for C_Login only, never shown")
    p.set_defaults(func=cmd_doctor)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
