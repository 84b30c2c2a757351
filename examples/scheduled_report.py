"""A worker that also declares its cron schedule at start-up.

    python examples/scheduled_report.py

Because the schedule has a name, starting this program again updates the schedule instead of
adding a duplicate (the Go library's example piled them up).
"""

from __future__ import annotations

import minflow

app = minflow.App()


@app.handler("report.weekly.v1")
def weekly_report(run: minflow.RunContext) -> dict:
    return {"sent_to": run.payload["to"]}


def declare_schedules(client: minflow.Client) -> str:
    return client.schedule(
        "report.weekly.v1",
        {"to": "team@example.com"},
        cron="0 9 * * MON",
        timezone="America/New_York",
        priority=50,
        name="weekly-report",
    )


if __name__ == "__main__":
    app.migrate()
    declare_schedules(app)
    app.run_worker()  # the worker runs the ticker too; SIGTERM/Ctrl-C stops it gracefully
