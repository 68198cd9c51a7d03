"""The README's curl examples, run in order against `./dev demo` and compared with what the README
shows. In the README's expected output, `…` stands for any text and `<guid>` for a GUID; every
shown line must appear, in order, in what the command printed."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
DEMO_ADDRESS = "127.0.0.1:8000"


@dataclass
class Example:
    line: int
    command: str
    expected: list[str] = field(default_factory=list)


def examples(text: str) -> list[Example]:
    """The curl commands of the README's ```sh blocks, each with the `# ` lines after it."""
    found: list[Example] = []
    current: Example | None = None  # the example that `# ` lines belong to
    in_block = False
    pending: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if line.startswith("```"):
            in_block = line == "```sh" and not in_block
            pending, current = [], None
        elif not in_block:
            continue
        elif pending:
            pending.append(line.removesuffix("\\").strip())
            if not line.endswith("\\"):
                current = Example(number, " ".join(pending))
                found.append(current)
                pending = []
        elif line.startswith("curl ") and line.endswith("\\"):
            pending = [line.removesuffix("\\").strip()]
        elif line.startswith("curl "):
            current = Example(number, line)
            found.append(current)
        elif line.startswith("#  ") and current is not None and current.expected:
            current.expected[-1] += line[3:].strip()  # a wrapped line continues
        elif line.startswith("# ") and current is not None:
            current.expected.append(line[2:])
        else:
            current = None
    return [example for example in found if DEMO_ADDRESS in example.command]


def pattern(expected: str) -> re.Pattern[str]:
    parts = re.split(r"(…|<guid>)", expected)
    regex = "".join(
        ".*?" if part == "…" else "[0-9a-f-]{36}" if part == "<guid>" else re.escape(part)
        for part in parts
    )
    return re.compile(regex)


def test_the_readme_has_examples_with_outputs() -> None:
    found = examples(README.read_text(encoding="utf-8"))
    assert len(found) >= 10
    assert sum(1 for example in found if example.expected) >= 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`./dev demo --port 0` with a fresh journal; yields the address it listens on."""
    data = tmp_path_factory.mktemp("demo") / "data"
    process = subprocess.Popen(
        ["./dev", "demo", "--port", "0"],
        cwd=REPO_ROOT,
        env={**os.environ, "VEZAPROVISIONER_DATA_DIR": str(data)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        address = None
        for line in process.stdout:  # the banner names the port, once the socket listens
            match = re.search(r"backend, http://(127\.0\.0\.1:\d+)/", line)
            if match:
                address = match.group(1)
                break
        assert address, "the demo did not start"
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_readme_examples_print_what_the_readme_shows(demo: str) -> None:
    failures = []
    for example in examples(README.read_text(encoding="utf-8")):
        command = example.command.replace(DEMO_ADDRESS, demo)
        done = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        printed = [line.rstrip("\r") for line in done.stdout.splitlines()]
        if done.returncode != 0 and "grep" not in command:
            failures.append(f"README line {example.line}: exit {done.returncode}: {command}")
            continue
        position = 0
        for expected in example.expected:
            regex = pattern(expected)
            while position < len(printed) and not regex.fullmatch(printed[position]):
                position += 1
            if position == len(printed):
                failures.append(
                    f"README line {example.line}: {command}\n  expected: {expected}\n"
                    f"  printed:  {chr(10).join(printed)}"
                )
                break
            position += 1
    assert not failures, "\n\n".join(failures)


def test_the_demo_answers_on_the_chosen_port(demo: str) -> None:
    assert demo.rsplit(":", 1)[1] != "8000"  # --port 0 picked a free port


def test_dev_demo_installs_runtime_dependencies_only(tmp_path: Path) -> None:
    """./dev demo with a stub interpreter: pip is asked for the package, not its test extra."""
    (tmp_path / "dev").write_bytes((REPO_ROOT / "dev").read_bytes())
    (tmp_path / "dev").chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("# stands in for the project's\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for name in ("python", "vezaprovisioner"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        stub.chmod(0o755)
    done = subprocess.run(
        ["./dev", "demo", "--port", "8123"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert "python -m pip install --quiet --disable-pip-version-check -e ." in calls
    assert not any("[test]" in call for call in calls)
    assert calls[-1].startswith("vezaprovisioner serve --config examples/demo.toml")
    assert calls[-1].endswith("--port 8123")
    # A second run finds the stamp and installs nothing.
    log.unlink()
    subprocess.run(["./dev", "demo"], cwd=tmp_path, timeout=60, check=True, capture_output=True)
    assert [c for c in log.read_text().splitlines() if "pip" in c] == []
