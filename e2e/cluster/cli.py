"""The command line: `python e2e/localcluster.py up|down|status|nodes [FILE]`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from cluster.base import ClusterError, kubectl, log
from cluster.lifecycle import status, stop_all, up
from cluster.nodes import NODES_FILE, apply_nodes


def iter_node_rows() -> Iterator[str]:
    columns = (
        "NAME:.metadata.name,REGION:.metadata.labels.topology\\.kubernetes\\.io/region,"
        "ZONE:.metadata.labels.topology\\.kubernetes\\.io/zone,"
        "GPU:.metadata.labels.nvidia\\.com/gpu\\.product,"
        "GPUS:.status.allocatable.nvidia\\.com/gpu,"
        "READY:.status.conditions[?(@.type=='Ready')].status"
    )
    yield from kubectl("get", "nodes", "-o", f"custom-columns={columns}").splitlines()


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=description or __doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    nodes = sub.add_parser("nodes")
    nodes.add_argument("file", nargs="?", type=Path, default=NODES_FILE)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            stop_all()
            log("stopped")
        elif args.command == "status":
            return 0 if status() else 1
        elif args.command == "nodes":
            apply_nodes(args.file)
            for row in iter_node_rows():
                print(row)
    except ClusterError as error:
        log(f"error: {error}")
        return 1
    return 0
