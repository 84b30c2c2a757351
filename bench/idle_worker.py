"""An idle minflow worker, as a service runs one: ``python bench/idle_worker.py DSN``.

It imports minflow and nothing else of the benchmark's, registers two handlers, starts a Worker
with its defaults, prints "ready" once the worker is claiming, and stops when stdin closes (or a
line arrives), so the footprint benchmark can read its memory while it idles.
"""

from __future__ import annotations

import sys

import minflow


def main() -> None:
    app = minflow.App(sys.argv[1])

    @app.handler("send_email")
    def send_email(run: minflow.RunContext) -> None:
        print("would send", run.payload)

    @app.handler("charge_card")
    def charge_card(run: minflow.RunContext) -> dict:
        return {"charged": run.payload.get("amount", 0)}

    worker = app.worker().start()
    print("ready", flush=True)
    sys.stdin.readline()
    worker.stop()
    app.close()


if __name__ == "__main__":
    main()
