"""``vbrd``: run the daemon, the agent, or the lab."""
from __future__ import annotations

import argparse
import sys

from vbrd import __version__
from vbrd.errors import VbrdError


def _run(args: argparse.Namespace) -> int:
    from vbrd import daemon

    return daemon.run(args.config)


def _agent(args: argparse.Namespace) -> int:
    from vbrd.transport import agent

    if args.fingerprint:
        return agent.print_fingerprint(args.config)
    return agent.run(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbrd", description="VM backup for VMware vSphere")
    parser.add_argument("--version", action="version", version=f"vbrd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the backup daemon in the foreground")
    run.add_argument("--config", required=True, help="the vbrd TOML configuration")
    run.set_defaults(func=_run)
    agent = sub.add_parser("agent", help="run the transport agent of a proxy or repository "
                                         "host in the foreground")
    agent.add_argument("--config", required=True, help="the agent's TOML configuration")
    agent.add_argument("--fingerprint", action="store_true",
                       help="print the agent's certificate fingerprint (making the "
                            "certificate at first use) and exit")
    agent.set_defaults(func=_agent)
    try:
        from vbrd.lab.cli import add_lab_parser
    except ImportError:
        pass
    else:
        add_lab_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VbrdError as e:
        print(f"vbrd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
