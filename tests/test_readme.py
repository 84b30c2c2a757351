"""The README's Python blocks run as written (blocks tagged `py` are reference-only)."""

from __future__ import annotations

import re

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 3


def test_readme_blocks_stay_in_their_directory():
    """The blocks run in a temporary directory: a three-slash SQLite DSN is an absolute path,
    which would write outside it (and keep state between runs)."""
    absolute = [dsn for block in BLOCKS for dsn in re.findall(r"sqlite3?:///[^\"']*", block)]
    assert absolute == []


def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINFLOW_DSN", raising=False)
    namespace: dict = {"__name__": "__main__"}  # as `python jobs.py` runs the first block
    for block in BLOCKS:
        exec(compile(block, "README.md", "exec"), namespace)
    # Blocks that define test functions (the "testing your handlers" example) are run too.
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert tests
    for index, test in enumerate(tests):
        directory = tmp_path / f"t{index}"
        directory.mkdir()
        test(directory)
