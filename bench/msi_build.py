"""Prints how long deploy/msi/build_msi.py takes and how large the MSI gets, by bundle size.

Builds synthetic bundles shaped like the offline bundle (the IIS scripts, a README, a wheelhouse
of incompressible wheels and a tree of compressible source files) and times the build and
`msiextract`. Needs wixl and msitools.

    .venv/bin/python bench/msi_build.py [--sizes-mb 10 60 150]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "msi" / "build_msi.py"
WHEEL_BYTES = 1_000_000


def make_bundle(root: Path, size_mb: int) -> int:
    """A bundle of about `size_mb` MB: 90% wheels (random bytes), 10% small text files."""
    (root / "deploy" / "iis").mkdir(parents=True)
    (root / "deploy" / "iis" / "install.ps1").write_text("param()\n")
    (root / "deploy" / "iis" / "uninstall.ps1").write_text("param()\n")
    (root / "README.md").write_text("# bundle\n")
    (root / "wheelhouse").mkdir()
    for index in range(size_mb * 9 // 10):
        wheel = root / "wheelhouse" / f"pkg{index}-1.0-cp312-cp312-win_amd64.whl"
        wheel.write_bytes(os.urandom(WHEEL_BYTES))
    text_files = size_mb * 10  # ~10 KB each
    for index in range(text_files):
        folder = root / "src" / f"m{index % 25}" / f"sub{index % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index}.py").write_bytes(b"value = %d\n" % index * 800)
    return sum(1 for path in root.rglob("*") if path.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 60, 150])
    args = parser.parse_args()
    msiextract = shutil.which("msiextract")
    if msiextract is None:
        print("msiextract not found: apt-get install wixl msitools", file=sys.stderr)
        return 1
    print(f"{'bundle MB':>9} {'files':>6} {'build s':>8} {'MSI MB':>7} {'extract s':>9}")
    for size_mb in args.sizes_mb:
        with tempfile.TemporaryDirectory() as temp:
            work = Path(temp)
            files = make_bundle(work / "bundle", size_mb)
            started = time.perf_counter()
            build = [sys.executable, str(BUILD_SCRIPT), "--bundle", str(work / "bundle")]
            subprocess.run(  # noqa: S603 (our own script and paths)
                [*build, "--output-dir", str(work / "dist")], check=True, capture_output=True
            )
            build_seconds = time.perf_counter() - started
            (msi,) = (work / "dist").iterdir()
            started = time.perf_counter()
            subprocess.run(  # noqa: S603 (msiextract on our own MSI)
                [msiextract, "-C", str(work / "out"), str(msi)], check=True, capture_output=True
            )
            extract_seconds = time.perf_counter() - started
            msi_mb = msi.stat().st_size / 1e6
            print(
                f"{size_mb:>9} {files:>6} {build_seconds:>8.2f} {msi_mb:>7.1f}"
                f" {extract_seconds:>9.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
