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


def _repo_init(args: argparse.Namespace) -> int:
    """Create the configured repositories (or the one named) that do not exist yet: the
    explicit way to make one, for a path that must not be created by accident."""
    from vbrd.config import load_config
    from vbrd.errors import UsageError
    from vbrd.repository import Repository

    config = load_config(args.config)
    names = args.repository or list(config.repositories)
    for name in names:
        settings = config.repositories.get(name)
        if settings is None:
            raise UsageError(f"{args.config}: no repository named {name!r} is configured")
        if (settings.path / "config").exists():
            Repository.open(settings.path)
            print(f"repository {name} at {settings.path} is already a repository")
            continue
        repo = Repository.create(settings.path, block_size=settings.block_size,
                                 compression_level=settings.compression_level)
        print(f"created repository {name} at {settings.path} (block size "
              f"{repo.block_size} bytes)")
    return 0


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
    repo = sub.add_parser("repo", help="manage repositories")
    repo_sub = repo.add_subparsers(dest="repo_command", required=True)
    init = repo_sub.add_parser("init", help="create the configured repositories that do not "
                                            "exist yet (or the ones named)")
    init.add_argument("--config", required=True, help="the vbrd TOML configuration")
    init.add_argument("repository", nargs="*", help="only these repositories")
    init.set_defaults(func=_repo_init)
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
