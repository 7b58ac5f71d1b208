"""``vbrd lab ...``: start, stop and change the vSphere lab from the command line.

:func:`add_lab_parser` adds the ``lab`` command to vbrd's argument parser; ``python -m
vbrd.lab.cli ...`` runs it on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vbrd.errors import VbrdError
from vbrd.lab import lab


def add_lab_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lab up|down|cleanup|status|write|guest|tools`` to ``subparsers``; each sets
    ``func``."""
    parser = subparsers.add_parser("lab", help="the vSphere lab (simulated vCenter, real disks)",
                                   description="Start, stop and change the vSphere lab.")
    commands = parser.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    def with_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", type=Path, default=lab.DEFAULT_DIR,
                       help=f"the lab's directory (default {lab.DEFAULT_DIR})")
        return p

    up = with_dir(commands.add_parser("up", help="start the lab and print the path of lab.json"))
    up.add_argument("--disk-scale", type=float, default=None,
                    help="multiply the VMs' disk sizes (default 1, or $VBRD_LAB_DISK_SCALE)")
    up.set_defaults(func=_up)

    down = with_dir(commands.add_parser("down", help="stop the lab and remove its directory"))
    down.set_defaults(func=_down)

    cleanup = commands.add_parser(
        "cleanup", help="remove the machine state of the lab's Linux guest (its user, sudo "
                        "rule, /var/lib/vbrd-lab) when no lab needs it")
    cleanup.set_defaults(func=_cleanup)

    status = with_dir(commands.add_parser("status", help="show whether the lab runs"))
    status.set_defaults(func=_status)

    write = with_dir(commands.add_parser(
        "write", help="change part of a VM's disk as its guest would (CBT sees it)"))
    write.add_argument("vm", metavar="VM")
    write.add_argument("--disk", type=int, default=None, metavar="KEY",
                       help="device key of the disk (default: the VM's first disk)")
    write.add_argument("--fraction", type=float, required=True, metavar="F",
                       help="part of the disk to change, e.g. 0.02")
    write.add_argument("--seed", type=int, required=True, metavar="S",
                       help="seed for where and what is written")
    write.add_argument("--json", action="store_true", help="print the extents as JSON")
    write.set_defaults(func=_write)

    guest = with_dir(commands.add_parser(
        "guest", help="switch a guest's network endpoint on or off (off forces the VIX path)"))
    guest.add_argument("os", choices=("linux", "windows"))
    guest.add_argument("state", choices=("on", "off"))
    guest.set_defaults(func=_guest)

    tools = with_dir(commands.add_parser(
        "tools", help="switch a VM's VMware Tools on or off (guest operations need them)"))
    tools.add_argument("vm", metavar="VM")
    tools.add_argument("state", choices=("on", "off"))
    tools.set_defaults(func=_tools)


def _up(args: argparse.Namespace) -> int:
    print(lab.up(args.dir, disk_scale=args.disk_scale))
    return 0


def _down(args: argparse.Namespace) -> int:
    lab.down(args.dir)
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    removed = lab.cleanup()
    print("removed " + ", ".join(removed) if removed else "nothing to remove")
    return 0


def _status(args: argparse.Namespace) -> int:
    result = lab.status(args.dir)
    print(json.dumps(result, indent=2))
    return 0 if result["simulator"]["running"] else 3


def _write(args: argparse.Namespace) -> int:
    extents = lab.write(args.dir, args.vm, disk_key=args.disk, fraction=args.fraction,
                        seed=args.seed)
    if args.json:
        print(json.dumps([[e.offset, e.length] for e in extents]))
    else:
        for e in extents:
            print(f"{e.offset} {e.length}")
    return 0


def _guest(args: argparse.Namespace) -> int:
    lab.set_guest(args.dir, args.os, args.state == "on")
    return 0


def _tools(args: argparse.Namespace) -> int:
    lab.set_tools_running(args.dir, args.vm, args.state == "on")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbrd")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except VbrdError as e:
        print(f"vbrd lab: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
