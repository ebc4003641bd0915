"""The `p11p` command: daemon, check-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from p11p.daemon.config import DEFAULT_CONFIG, ConfigError, load


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s p11p %(levelname)s %(name)s: %(message)s")


def cmd_daemon(args: argparse.Namespace) -> int:
    try:
        config = load(Path(args.config))
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    _setup_logging(args.log_level or config.log_level)
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        logging.getLogger("p11p").warning("uvloop not available; using asyncio's loop")
    from p11p.daemon.service import Daemon

    async def main() -> None:
        daemon = Daemon(config)
        await daemon.start()
        await daemon.run()

    asyncio.run(main())
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p11p", description="PKCS#11 proxy with HA across HSMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("daemon", help="run the daemon in the foreground")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_daemon)
    p = sub.add_parser("check-config", help="validate a configuration")
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=cmd_check_config)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
