"""Authenticode signing: `build_msi.py --sign PFX` signs every .ps1 of the bundle and the MSI with
osslsigncode, and the signatures verify; an unsigned build says so.

The certificate is a throwaway self-signed one made here with openssl (code signing usage), and
`osslsigncode verify -CAfile` checks each signature against it: the digest of the file's
content, the PKCS#7 structure and the certificate chain. What Windows adds on top (UAC's
publisher name, the AllSigned execution policy, AppLocker or WDAC rules trusting the
organisation's certificate) is verified only by reading; deploy/msi/README.md gives the
admin's command that checks it on the server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_powershell

from tests.test_msi import (
    BUILD_SCRIPT,
    build_msi_module,
    extracted,
    make_bundle,
    run_build,
    tree_digest,
)
from vezaprovisioner.exchange.local.backend import HOST_SCRIPT

_TOOLS = ("osslsigncode", "openssl", "wixl", "msibuild", "msiinfo", "msiextract")
_MISSING = [tool for tool in _TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{', '.join(_MISSING)} not installed: apt-get install osslsigncode openssl wixl"
    " msitools (.ci/run does)",
)
PASSWORD = "throwaway pass"
SIGNATURE_START = b"# SIG # Begin signature block"


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed code-signing certificate in `folder`: (PKCS#12 file protected by
    PASSWORD, the certificate as PEM)."""
    key, pem, pfx = folder / "key.pem", folder / "cert.pem", folder / "signing.pfx"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=VezaProvisioner Test Signing",
            "-keyout",
            str(key),
            "-out",
            str(pem),
            "-addext",
            "extendedKeyUsage=codeSigning",
            "-addext",
            "keyUsage=digitalSignature",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-export",
            "-inkey",
            str(key),
            "-in",
            str(pem),
            "-out",
            str(pfx),
            "-passout",
            f"pass:{PASSWORD}",
        ],
        check=True,
        capture_output=True,
    )
    return pfx, pem


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("certificate"))


def verify(path: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["osslsigncode", "verify", "-in", str(path), "-CAfile", str(ca)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def signed_build(bundle: Path, out: Path, pfx: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, str(BUILD_SCRIPT)),
            *("--bundle", str(bundle), "--output-dir", str(out), "--sign", str(pfx)),
        ],
        env={**os.environ, build_msi_module.SIGN_PASSWORD_ENV: PASSWORD},
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )


def test_a_signed_build_signs_the_msi_and_every_script(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    pfx, ca = certificate
    bundle = make_bundle(tmp_path / "bundle")
    before = tree_digest(bundle)
    done = signed_build(bundle, tmp_path / "dist", pfx)
    assert done.returncode == 0, done.stderr
    assert "UNSIGNED" not in done.stderr
    msi = Path(done.stdout.strip())
    checked = verify(msi, ca)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Signature verification: ok" in checked.stdout
    installed = extracted(msi, tmp_path / "out")
    scripts = sorted(installed.rglob("*.ps1"))
    assert [p.name for p in scripts] == ["install.ps1", "uninstall.ps1"]
    for script in scripts:
        assert SIGNATURE_START in script.read_bytes()
        assert verify(script, ca).returncode == 0, script
        # The code before the signature block is the bundle's, byte for byte.
        original = (bundle / script.relative_to(installed)).read_bytes()
        assert script.read_bytes().startswith(original)
    assert tree_digest(bundle) == before  # the admin's folder is never signed in place


def test_a_tampered_file_fails_verification(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    """The check above means something: one changed byte and the signature no longer holds."""
    pfx, ca = certificate
    done = signed_build(make_bundle(tmp_path / "bundle"), tmp_path / "dist", pfx)
    installed = extracted(Path(done.stdout.strip()), tmp_path / "out")
    script = installed / "deploy" / "iis" / "install.ps1"
    script.write_bytes(script.read_bytes().replace(b"install", b"Install", 1))
    assert verify(script, ca).returncode != 0


def test_an_unsigned_build_says_so(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    _, ca = certificate
    done = run_build("--bundle", make_bundle(tmp_path / "bundle"), "--output-dir", tmp_path)
    assert done.returncode == 0
    assert "UNSIGNED build" in done.stderr
    assert "AllSigned" in done.stderr
    assert verify(Path(done.stdout.strip()), ca).returncode != 0


def test_a_wrong_password_fails_the_build(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    pfx, _ = certificate
    done = subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--bundle",
            str(make_bundle(tmp_path / "b")),
            "--output-dir",
            str(tmp_path / "d"),
            "--sign",
            str(pfx),
        ],
        env={**os.environ, build_msi_module.SIGN_PASSWORD_ENV: "wrong"},
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert done.returncode == 1
    assert "osslsigncode failed" in done.stderr
    assert PASSWORD not in done.stderr
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_a_signed_host_ps1_keeps_what_the_local_backend_expects(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    """The bundle build signs host.ps1 before it builds the package wheel, so the installed
    host.ps1 (HOST_SCRIPT, which the fake powershell compares byte for byte with the shipped
    file) is the signed one. Signed, it stays ASCII (test_local_host_script reads it as
    ASCII), its code is unchanged (the block is appended), and it still parses as PowerShell:
    the signature block is comments only."""
    pfx, ca = certificate
    copy = tmp_path / "host.ps1"
    shutil.copy2(HOST_SCRIPT, copy)
    os.environ[build_msi_module.SIGN_PASSWORD_ENV] = PASSWORD
    try:
        build_msi_module.sign(copy, pfx, None, tmp_path)
    finally:
        del os.environ[build_msi_module.SIGN_PASSWORD_ENV]
    assert verify(copy, ca).returncode == 0
    signed = copy.read_bytes()
    signed.decode("ascii")
    original = HOST_SCRIPT.read_bytes()
    assert signed.startswith(original)
    block = signed[len(original) :]
    assert block.strip().startswith(SIGNATURE_START)
    assert all(line.startswith(b"# ") for line in block.strip().splitlines())
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    root = parser.parse(signed).root_node
    assert not root.has_error
    comments = [n for n in root.children if n.type == "comment"]
    assert len(comments) >= len(block.strip().splitlines())
