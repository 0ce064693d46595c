from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from topology import Ports, Topology, TopologyError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topology")
    parser.add_argument("command", choices=("up", "down", "reset", "status"))
    parser.add_argument("--base", type=int, default=25400, help="port base (default 25400)")
    parser.add_argument("--state-dir", type=Path, default=Path(".local/demo"),
                        help="state directory; relative paths are taken from the repository root")
    args = parser.parse_args(argv)
    topo = Topology(state_dir=args.state_dir, ports=Ports.from_base(args.base))
    started = time.monotonic()
    try:
        if args.command == "up":
            topo.up()
        elif args.command == "down":
            topo.down()
        elif args.command == "reset":
            topo.reset()
    except TopologyError as error:
        print(f"topology {args.command} failed: {error}", file=sys.stderr)
        return 1
    if args.command == "status":
        print(json.dumps(topo.status(), indent=2))
    else:
        print(f"topology {args.command}: done in {time.monotonic() - started:.1f}s ({topo.state_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
