"""What ``import minflow`` does (the Header section): the modules only some paths need are not
imported, its loggers and patterns are made on first use, and the value types, made without the
dataclasses module, behave as the frozen dataclasses they replace. The time the import takes is
measured in bench/test_footprint.py, never asserted here."""

from __future__ import annotations

import ast
import datetime as dt
import logging
import os
import pickle
import subprocess
import sys

import pytest
from conftest import ROOT

import minflow

# Imported by minflow only where used: each costs a millisecond or more of a start-up (with what
# it imports in turn), and most processes that import minflow never use it.
DEFERRED = {
    "argparse",
    "asyncio",
    "base64",
    "dataclasses",
    "email.utils",
    "hashlib",
    "hmac",
    "http.client",
    "http.server",
    "inspect",
    "json",
    "logging",
    "queue",
    "random",
    "re",
    "selectors",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "tokenize",
    "traceback",
    "typing",
    "urllib.parse",
    "uuid",
}

# What the Header imports, besides what any interpreter has imported once it has started.
EAGER = (
    "__future__",
    "builtins",
    "collections",
    "collections.abc",
    "contextlib",
    "datetime",
    "errno",
    "functools",
    "importlib",
    "io",
    "itertools",
    "math",
    "os",
    "sys",
    "threading",
    "time",
)


def modules_after(code: str, *options: str) -> set[str]:
    """The names in sys.modules once ``code`` has run in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, *options, "-c", f"{code}\nimport sys\nprint(sorted(sys.modules))"],
        cwd=ROOT,  # -c puts the working directory first on sys.path: this checkout's minflow.py
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(ast.literal_eval(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("options", [(), ("-S",)], ids=["site", "no-site"])
def test_import_minflow_imports_none_of_the_deferred_modules(options):
    # Compared with the same interpreter's bare start: what its site imports (with an editable
    # install: re, enum, urllib.parse...) is not minflow's doing. Without site, nothing is.
    bare = modules_after("", *options)
    added = modules_after("import minflow", *options) - bare
    assert "minflow" in added
    assert sorted(added & DEFERRED) == []
    # Nothing at all beyond what the Header imports (datetime, threading, collections.abc, ...)
    # and what those import in turn on this Python.
    needed = modules_after("import " + ", ".join(EAGER), *options) - bare
    assert sorted(added - needed - {"minflow"}) == []


def test_what_a_path_uses_is_imported_when_it_is_used(tmp_path):
    added = modules_after("import minflow\nminflow._build_parser()\nminflow._http_classes()")
    assert {"argparse", "http.server", "socketserver"} <= added
    dsn = f"sqlite:///{tmp_path / 'jobs.db'}"
    code = (
        f"import minflow\napp = minflow.App({dsn!r})\napp.migrate()\napp.submit('t.v1', {{'n': 1}})"
    )
    added = modules_after(code)
    assert {"sqlite3", "json"} <= added
    assert "http.server" not in added and "argparse" not in added


def test_stand_ins_replace_themselves_on_first_use():
    code = (
        "import minflow\n"
        "print(type(minflow._GO_TIME).__name__, type(minflow.log).__name__)\n"
        "minflow._parse_time('2024-05-06 07:08:09.5x')\n"  # unparseable: compiles, logs
        "print(type(minflow._GO_TIME).__name__, type(minflow.log).__name__)\n"
        "print(minflow.log is __import__('logging').getLogger('minflow'))\n"
        "print(type(minflow.sqlite3).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split("\n")[:4] == [
        "_Deferred _Deferred",
        "Pattern Logger",
        "True",
        "_Deferred",
    ]
    assert done.stderr == ""  # the "minflow" logger got its NullHandler before it logged


def test_the_minflow_logger_has_its_null_handler_once_used():
    minflow._parse_time("not a time at all")  # logs a warning through minflow.log
    handlers = logging.getLogger("minflow").handlers
    assert sum(isinstance(h, logging.NullHandler) for h in handlers) == 1


def run_fields(**changes):
    now = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)
    fields = dict.fromkeys(minflow.Run.__match_args__)
    fields.update(
        id="r1",
        type="t.v1",
        payload={"a": [1]},
        status="pending",
        priority=100,
        attempt=0,
        max_attempts=3,
        created_at=now,
    )
    return {**fields, **changes}


def test_value_types_behave_as_frozen_dataclasses():
    run = minflow.Run(**run_fields())
    assert run == minflow.Run(**run_fields()) and run != minflow.Run(**run_fields(attempt=1))
    assert run != (run.id,) and minflow.Run.__eq__(run, object()) is NotImplemented
    assert repr(run).startswith("Run(id='r1', type='t.v1', payload={'a': [1]}, status='pending', ")
    with pytest.raises(AttributeError, match="cannot assign to field 'status'"):
        run.status = "succeeded"
    with pytest.raises(AttributeError):
        del run.id
    job = minflow.Job("t.v1", {"n": 1}, priority=5)
    assert (job.type, job.payload, job.priority, job.max_attempts, job.run_at) == (
        "t.v1",
        {"n": 1},
        5,
        minflow.DEFAULT_MAX_ATTEMPTS,
        None,
    )
    assert hash(minflow.Job("t.v1", priority=5)) == hash(minflow.Job("t.v1", priority=5))
    assert {minflow.Job("a"), minflow.Job("a")} == {minflow.Job("a")}
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'type'"):
        minflow.Job()
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        minflow.Job("t", colour="red")
    with pytest.raises(TypeError):
        minflow.Job("t", None, 1, None, 3, None, None, "one too many")
    assert pickle.loads(pickle.dumps(run)) == run
    match run:
        case minflow.Run(rid, rtype):
            assert (rid, rtype) == ("r1", "t.v1")
    assert run.to_json()["created_at"] == "2024-01-02T00:00:00Z"
    assert list(run.to_json()) == list(minflow.Run.__match_args__)


def test_value_types_answer_the_dataclasses_functions():
    """dataclasses.fields, asdict, replace and is_dataclass work on the value types, as on the
    frozen dataclasses they were, once the application imports dataclasses itself."""
    import dataclasses

    run = minflow.Run(**run_fields())
    assert dataclasses.is_dataclass(minflow.Run) and dataclasses.is_dataclass(run)
    assert [f.name for f in dataclasses.fields(run)] == list(minflow.Run.__match_args__)
    assert dataclasses.asdict(run)["payload"] == {"a": [1]}
    assert dataclasses.asdict(run)["payload"] is not run.payload  # asdict copies, as before
    changed = dataclasses.replace(run, status="succeeded")
    assert changed.status == "succeeded" and changed.id == run.id and run.status == "pending"
    job = dataclasses.replace(minflow.Job("t.v1"), priority=5)
    assert job == minflow.Job("t.v1", priority=5)
    assert dataclasses.astuple(minflow.Job("t"))[:3] == ("t", None, minflow.DEFAULT_PRIORITY)
    assert minflow.Job.__dataclass_params__.frozen
    completion = minflow._Completion("r1", 1, minflow._SUCCEEDED)
    assert dataclasses.replace(completion, delay=2.0).delay == 2.0


def test_a_mutable_private_value_type_is_not_hashable_and_keeps_hidden_fields_out_of_repr():
    text = minflow._Text("body", "text/plain")
    assert text.headers == {} and text.headers is not minflow._Text("b", "t").headers
    dsn = minflow._parse_dsn("postgres://someone:s3cret@db.example/app")
    assert "s3cret" not in repr(dsn) and dsn.password == "s3cret"
    completion = minflow._Completion("r1", 1, minflow._SUCCEEDED)
    with pytest.raises(TypeError, match="unhashable"):
        hash(completion)
    completion.error = "changed"  # not frozen
    assert minflow._replace(completion, delay=2.0) == minflow._Completion(
        "r1", 1, minflow._SUCCEEDED, error="changed", delay=2.0
    )
