"""Types: what a type checker sees of minflow, vendored or installed (README "Type checking")."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT


def mypy(cwd, *args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--no-error-summary", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_handler_keeps_the_signature_and_rejects_a_wrong_one(tmp_path):
    shutil.copy(ROOT / "minflow.py", tmp_path)
    (tmp_path / "user.py").write_text(
        textwrap.dedent(
            """
            import minflow

            app = minflow.App()

            @app.handler("good")
            async def good(run: minflow.RunContext, *, extra: int = 0) -> dict[str, int]:
                return {"attempt": run.attempt}

            @app.handler("bad")
            def bad(order: int) -> None: ...

            reveal_type(good)
            """
        )
    )
    result = mypy(tmp_path, "--strict", "--follow-imports=silent", "user.py")
    lines = result.stdout.splitlines()
    # Older mypy versions spell builtins out.
    reveal = [line.replace("builtins.", "") for line in lines if "Revealed type" in line]
    assert (
        reveal
        and (
            "def (run: minflow.RunContext, *, extra: int =) -> "
            "typing.Coroutine[Any, Any, dict[str, int]]"
        )
        in reveal[0]
    )
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1 and "user.py:10:" in errors[0] and "type variable" in errors[0]


def test_installed_module_is_read_with_follow_untyped_imports(tmp_path):
    # What `pip install minflow` leaves: one minflow.py in site-packages, without py.typed.
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next(env.glob("lib/python3*/site-packages"))
    shutil.copy(ROOT / "minflow.py", site)
    project = tmp_path / "project"
    project.mkdir()
    (project / "user.py").write_text(
        'import minflow\n\nrun_id: int = minflow.Client("sqlite://x.db").submit("t")\n'
    )
    python = f"--python-executable={env / 'bin' / 'python'}"
    skipped = mypy(project, "--strict", python, "user.py")
    assert "missing library stubs or py.typed marker" in skipped.stdout
    (project / "pyproject.toml").write_text(
        '[[tool.mypy.overrides]]\nmodule = ["minflow"]\nfollow_untyped_imports = true\n'
    )
    read = mypy(project, "--strict", python, "user.py")
    errors = [line for line in read.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'expression has type "_RunId", variable has type "int"' in errors[0]


def test_typed_module_runs(tmp_path, monkeypatch):
    # The module mypy checks is real code: its producer, inspector and async route work.
    monkeypatch.setenv("JOBS_DSN", f"sqlite:///{tmp_path / 'jobs.db'}")
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    sys.modules.pop("typed_app", None)
    import typed_app

    try:
        typed_app.app.migrate()
        db = sqlite3.connect(tmp_path / "jobs.db")
        ids = typed_app.produce(db)
        db.close()
        assert len(ids) == 2
        assert typed_app.work() == 2
        assert typed_app.inspect(ids[1])[:2] == (
            "succeeded",
            ["created", "leased", "started", "succeeded"],
        )
        answer = asyncio.run(typed_app.request_invoice(44))
        assert answer["status"] == "pending" and answer["recent"] == "3"
    finally:
        typed_app.app.close()
        sys.modules.pop("typed_app", None)
