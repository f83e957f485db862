"""tools/check_sizes.py on small made-up trees: a module over its line limit, a function
(sync, async, a method, a nested one) over its limit only in the packages it applies to."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from tools import check_sizes


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def function(name: str, lines: int, *, indent: str = "", kind: str = "def") -> str:
    """A function of exactly ``lines`` lines (its ``def`` line included)."""
    body = "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))
    return f"{indent}{kind} {name}() -> None:\n{body}"


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    write(tmp_path, "src/devagent/daemon/ok.py", function("short", 5))
    assert check_sizes.offenders(tmp_path, max_module=10, max_function=5) == []
    assert check_sizes.main(["--root", str(tmp_path)]) == 0


def test_a_long_module_is_named_with_its_line_count(tmp_path: Path) -> None:
    write(tmp_path, "src/devagent/lab/big.py", "x = 1\n" * 11)
    write(tmp_path, "src/devagent/lab/fits.py", "x = 1\n" * 10)
    assert check_sizes.offenders(tmp_path, max_module=10) == [
        "src/devagent/lab/big.py: module of 11 lines (limit 10)"
    ]


def test_long_functions_are_found_in_daemon_and_agent_only(tmp_path: Path) -> None:
    long_ones = (
        function("plain", 6)
        + function("waits", 7, kind="async def")
        + "class Job:\n"
        + function("run", 6, indent="    ")
        + function("outer", 3)
        + function("inner", 6, indent="    ")
        + "@staticmethod\n"  # decorators do not count
        + function("decorated", 5)
    )
    write(tmp_path, "src/devagent/daemon/jobs.py", long_ones)
    write(tmp_path, "src/devagent/agent/fine.py", function("fits", 5))
    write(tmp_path, "src/devagent/cli/free.py", function("anything", 50))
    found = check_sizes.offenders(tmp_path, max_module=1000, max_function=5)
    assert found == [
        "src/devagent/daemon/jobs.py:1: function plain of 6 lines (limit 5)",
        "src/devagent/daemon/jobs.py:7: function waits of 7 lines (limit 5)",
        "src/devagent/daemon/jobs.py:15: function Job.run of 6 lines (limit 5)",
        "src/devagent/daemon/jobs.py:21: function outer of 9 lines (limit 5)",
        "src/devagent/daemon/jobs.py:24: function outer.inner of 6 lines (limit 5)",
    ]


def test_main_fails_and_lists_the_offenders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "src/devagent/agent/huge.py", function("f", 61))
    assert check_sizes.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "src/devagent/agent/huge.py:1: function f of 61 lines (limit 60)" in out
