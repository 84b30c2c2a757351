"""One benchmark worker process: ``python bench/worker.py MODULE BACKEND DSN [options]``.

It imports the system's ``sys_*`` module, lets it build and connect its worker with ``--setting``
(a JSON object only that module interprets; ``{}`` is the system's defaults), prints "ready",
waits for "go" on stdin (so start-up never counts), and processes jobs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys

from harness import Target, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("module")
    parser.add_argument("backend", choices=("postgres", "sqlite"))
    parser.add_argument("dsn")
    parser.add_argument("--setting", type=json.loads, default={})
    parser.add_argument("--mode", choices=("drain", "latency", "record", "soak"), default="drain")
    parser.add_argument("--out")
    args = parser.parse_args()
    mod = load(args.module)

    def ready() -> None:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit(0)  # the harness gave up before starting: leave quietly

    mod.serve(Target(args.backend, args.dsn), args.setting, args.mode, args.out, ready)


if __name__ == "__main__":
    main()
