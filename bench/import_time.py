"""How long a fresh interpreter takes to import the service, and to answer its first CREATE_EMAIL.

IIS starts a Python worker per FastCGI instance; each pays the import, then builds the app on its
first request (iis_entry). Each measurement here is a new Python process that times one case
(wall time with perf_counter, and the process's CPU time, which other load on the machine
disturbs less) and reports whether pypsrp (the remote backend's client) was loaded. Runs are
interleaved; the median and the fastest are printed. The cases:

- the floor, what FastAPI costs by itself: `import fastapi`, `from fastapi import FastAPI`, and
  a bare FastAPI app (one POST endpoint with a pydantic body and response model) answering one
  request through a2wsgi, the WSGI bridge the IIS entry uses;
- the service: `vezaprovisioner.api.app` (the app factory), `vezaprovisioner.iis_entry` (what
  wfastcgi imports), and `vezaprovisioner.exchange.remote` (what backend = "remote" adds, loaded
  only then);
- the service's first request: import `vezaprovisioner.iis_entry`, then one CREATE_EMAIL through
  its WSGI `application` as wfastcgi calls it (the configuration read, create_app, the journal
  opened, the simulated Exchange at 0 ms, IIS authentication, 201). Printed as import, first
  request, and the sum;
- a breakdown of one worker's import by CPU, in phases of one process: the bare FastAPI app,
  then the other packages' modules the IIS entry loads, then the service's own modules.

The app minus the floor is what the service adds on top of FastAPI. Bytecode: an installed wheel
has its .pyc files (pip compiles them at install), so by default each child may cache bytecode
(PYTHONPYCACHEPREFIX, a temporary folder warmed by one discarded round) even where
PYTHONDONTWRITEBYTECODE is set, as in this repository's dev environment; `--no-bytecode-cache`
measures that case instead, where the package's own sources (an editable install) are compiled
again by every interpreter.

    .venv/bin/python bench/import_time.py [--runs 7] [--no-bytecode-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench_directory import plain_users

_MEASURE = """
import json, sys, time
started, cpu = time.perf_counter(), time.process_time()
{body}
wall, cpu = time.perf_counter() - started, time.process_time() - cpu
print(json.dumps({{"wall": wall, "cpu": cpu, "pypsrp": "pypsrp" in sys.modules, **extra}}))
"""

#: One request as IIS + wfastcgi hand it over after Basic authentication (tests/harness/iis.py
#: lists the server variables IIS sends; only those the service reads are set here).
_REQUEST = """
import io
_body = json.dumps({"identity": "CONTOSO\\\\bench0"}).encode()
_environ = {
    "REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/VezaProvisioner/api/v1/emails",
    "URL": "/VezaProvisioner/api/v1/emails", "QUERY_STRING": "", "SERVER_NAME": "ex01.contoso.com",
    "SERVER_PORT": "443", "SERVER_PROTOCOL": "HTTP/1.1", "HTTPS": "on", "REMOTE_ADDR": "10.0.0.5",
    "REMOTE_PORT": "50123", "AUTH_TYPE": "Basic", "AUTH_USER": "CONTOSO\\\\svc-veza",
    "REMOTE_USER": "CONTOSO\\\\svc-veza", "LOGON_USER": "CONTOSO\\\\svc-veza",
    "HTTP_HOST": "ex01.contoso.com", "CONTENT_TYPE": "application/json",
    "CONTENT_LENGTH": str(len(_body)), "wsgi.version": (1, 0), "wsgi.url_scheme": "https",
    "wsgi.input": io.BytesIO(_body), "wsgi.errors": io.StringIO(), "wsgi.multithread": False,
    "wsgi.multiprocess": True, "wsgi.run_once": False,
}
_status = []
def _start_response(status, headers, exc_info=None):
    _status.append(status)
    return lambda data: None
_result = application(_environ, _start_response)
_reply = b"".join(_result)
getattr(_result, "close", lambda: None)()
assert _status[0].startswith("201"), (_status, _reply)
"""

_FLOOR_APP = """
from a2wsgi import ASGIMiddleware
from fastapi import FastAPI
from pydantic import BaseModel

class EmailRequest(BaseModel):
    identity: str
    alias: str | None = None

class Created(BaseModel):
    identity: str
    status: str

app = FastAPI()

@app.post("/VezaProvisioner/api/v1/emails", status_code=201)
def create_email(body: EmailRequest) -> Created:
    return Created(identity=body.identity, status="created")

application = ASGIMiddleware(app)
"""


@dataclass(frozen=True)
class Case:
    label: str
    body: str  # timed from the start; sets `extra` (a dict) for the result line
    floor: bool = False


def _import(module: str) -> str:
    return f"import {module}\nextra = {{}}"


_FIRST_REQUEST = "\n".join(
    (
        "from vezaprovisioner.iis_entry import application",
        "imported = time.perf_counter() - started",
        _REQUEST,
        "application.close()",
        "extra = {'import': imported}",
    )
)
_FIRST_REQUEST_LABEL = "iis_entry: import + first CREATE_EMAIL"

_BREAKDOWN_LABEL = "breakdown: bare app, then the service's other packages, then its own modules"
#: Splits a worker's import into phases (CPU): the floor (the bare app, no request), the other
#: third-party and standard library modules the IIS entry loads, then its own modules.
_BREAKDOWN = """
import importlib
def _cpu():
    return time.process_time()
{floor}
floor = _cpu() - cpu
_loaded = len(sys.modules)
for _name in {dependencies!r}:
    try:
        importlib.import_module(_name)
    except Exception:
        pass
dependencies = _cpu() - cpu - floor
_added = len(sys.modules) - _loaded
import vezaprovisioner.iis_entry
extra = {{"floor": floor, "dependencies": dependencies, "added": _added}}
"""


def run_python(code: str, env: dict[str, str]) -> str:
    """What a fresh interpreter running `code` prints."""
    return subprocess.run(  # noqa: S603 - this interpreter, the bench's own code
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout


def third_party_modules(env: dict[str, str]) -> list[str]:
    """What importing the IIS entry loads besides the package itself, in load order."""
    out = run_python("import sys, vezaprovisioner.iis_entry; print(' '.join(sys.modules))", env)
    return [name for name in out.split() if not name.startswith(("vezaprovisioner", "__"))]


CASES = (
    Case("`import fastapi`", _import("fastapi"), floor=True),
    Case("`from fastapi import FastAPI`", "from fastapi import FastAPI\nextra = {}", floor=True),
    Case(
        "bare FastAPI app: import + first request",
        _FLOOR_APP + _REQUEST + "extra = {}",
        floor=True,
    ),
    Case("`import vezaprovisioner.api.app`", _import("vezaprovisioner.api.app")),
    Case("`import vezaprovisioner.iis_entry`", _import("vezaprovisioner.iis_entry")),
    Case("`import vezaprovisioner.exchange.remote`", _import("vezaprovisioner.exchange.remote")),
    Case(_FIRST_REQUEST_LABEL, _FIRST_REQUEST),
)


def measure(case: Case, env: dict[str, str]) -> dict[str, float]:
    out = run_python(_MEASURE.format(body=case.body), env)
    return {key: float(value) for key, value in json.loads(out.splitlines()[-1]).items()}


def child_env(work: Path, bytecode_cache: bool) -> dict[str, str]:
    (work / "directory.json").write_text(json.dumps(plain_users(1)), encoding="utf-8")
    config = work / "vezaprovisioner.toml"
    config.write_text(
        "backend = 'simulated'\n"
        f"data_dir = '{work / 'data'}'\n"
        f"[simulated]\ndirectory = '{work / 'directory.json'}'\n"
        "[auth]\nmode = 'iis'\n",
        encoding="utf-8",
    )
    env = dict(os.environ, VEZAPROVISIONER_CONFIG=str(config), TMPDIR=str(work))
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile the package's sources in every interpreter (an editable install with "
        "PYTHONDONTWRITEBYTECODE=1), instead of using cached bytecode as an installed wheel does",
    )
    args = parser.parse_args()
    bytecode_cache = not args.no_bytecode_cache
    with tempfile.TemporaryDirectory(prefix="vzp-bench-import-") as tmp:
        work = Path(tmp)
        env = child_env(work, bytecode_cache)
        dependencies = third_party_modules(env)
        breakdown = _BREAKDOWN.format(floor=_FLOOR_APP, dependencies=dependencies)
        cases = (*CASES, Case(_BREAKDOWN_LABEL, breakdown))
        results: dict[str, list[dict[str, float]]] = {case.label: [] for case in cases}
        if bytecode_cache:
            for case in cases:  # writes the bytecode cache; not counted
                measure(case, env)
        for _ in range(args.runs):
            for case in cases:
                results[case.label].append(measure(case, env))
    load = os.getloadavg()
    print(
        f"import time in a fresh interpreter, {args.runs} interleaved runs each; bytecode "
        f"{'cached (as an installed wheel)' if bytecode_cache else 'compiled in every run'}; "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print()
    print("| case | wall median | wall fastest | CPU median | pypsrp loaded |")
    print("|---|---:|---:|---:|---|")
    for case in cases:
        runs = results[case.label]
        walls = [run["wall"] for run in runs]
        label = f"{case.label} (floor)" if case.floor else case.label
        print(
            f"| {label} | {_ms(walls):.0f} ms | {min(walls) * 1000:.0f} ms "
            f"| {_ms([run['cpu'] for run in runs]):.0f} ms "
            f"| {'yes' if any(run['pypsrp'] for run in runs) else 'no'} |"
        )
    first = results[_FIRST_REQUEST_LABEL]
    print()
    print(
        f"first CREATE_EMAIL of a new IIS worker: import {_ms([r['import'] for r in first]):.0f} "
        f"ms + first request {_ms([r['wall'] - r['import'] for r in first]):.0f} ms "
        f"(wall medians)"
    )

    def cpu(label: str) -> float:
        return _ms([run["cpu"] for run in results[label]])

    def wall(label: str) -> float:
        return _ms([run["wall"] for run in results[label]])

    floor = "`from fastapi import FastAPI`"
    print()
    print("the service minus the floor (medians):")
    for label, base in (
        ("`import vezaprovisioner.api.app`", floor),
        ("`import vezaprovisioner.iis_entry`", floor),
        (_FIRST_REQUEST_LABEL, "bare FastAPI app: import + first request"),
    ):
        print(
            f"- {label} minus {base}: {wall(label) - wall(base):.0f} ms wall, "
            f"{cpu(label) - cpu(base):.0f} ms CPU"
        )
    split = results[_BREAKDOWN_LABEL]
    floor_cpu = _ms([run["floor"] for run in split])
    dependencies_cpu = _ms([run["dependencies"] for run in split])
    own_cpu = _ms([run["cpu"] - run["floor"] - run["dependencies"] for run in split])
    print()
    print(
        f"a worker's import by CPU (medians): the bare FastAPI app {floor_cpu:.0f} ms, then the "
        f"{statistics.median(run['added'] for run in split):.0f} modules of other packages it "
        f"does not load (pydantic-settings, prometheus_client, sqlite3, ...) "
        f"{dependencies_cpu:.0f} ms, then the service's own modules {own_cpu:.0f} ms"
    )


if __name__ == "__main__":
    main()
