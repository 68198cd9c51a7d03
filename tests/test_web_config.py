"""web.config, read as XML the way IIS and wfastcgi read it: handler, appSettings, limits."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path, PureWindowsPath

import pytest

from tests.conftest import REPO_ROOT, TEST_DIRECTORY
from vezaprovisioner.api.middleware import MAX_BODY_BYTES
from vezaprovisioner.iis_entry import IisApplication

WEB_CONFIG = REPO_ROOT / "web.config"


@pytest.fixture(scope="module")
def config() -> ET.Element:
    return ET.parse(WEB_CONFIG).getroot()


@pytest.fixture(scope="module")
def settings(config: ET.Element) -> dict[str, str]:
    return {add.attrib["key"]: add.attrib["value"] for add in config.iterfind("appSettings/add")}


def resolve_handler(dotted: str) -> object:
    """What wfastcgi does with WSGI_HANDLER: import the longest importable module, then getattr."""
    module_name, attributes = dotted, list[str]()
    while module_name:
        try:
            target: object = importlib.import_module(module_name)
        except ImportError:
            module_name, _, attribute = module_name.rpartition(".")
            attributes.insert(0, attribute)
            continue
        for attribute in attributes:
            target = getattr(target, attribute)
        return target
    raise ImportError(dotted)


def test_the_one_handler_is_fastcgi_for_every_path(config: ET.Element) -> None:
    handlers = config.find("system.webServer/handlers")
    assert handlers is not None
    assert [child.tag for child in handlers] == ["clear", "add"]
    handler = handlers[1].attrib
    assert handler["modules"] == "FastCgiModule"
    assert (handler["path"], handler["verb"]) == ("*", "*")
    assert handler["resourceType"] == "Unspecified"
    python, wfastcgi = handler["scriptProcessor"].split("|")
    assert PureWindowsPath(python).is_absolute()
    assert PureWindowsPath(python).name == "python.exe"
    assert PureWindowsPath(wfastcgi).name == "wfastcgi.py"
    # The venv's python runs the venv's wfastcgi (install.ps1 registers the same pair in fastCgi).
    venv = PureWindowsPath(python).parents[1]
    assert PureWindowsPath(wfastcgi) == venv / "Lib" / "site-packages" / "wfastcgi.py"


def test_wsgi_handler_names_the_iis_entry(settings: dict[str, str]) -> None:
    assert settings["WSGI_HANDLER"] == "vezaprovisioner.iis_entry.application"
    handler = resolve_handler(settings["WSGI_HANDLER"])
    assert isinstance(handler, IisApplication)


def test_app_settings_are_paths_and_no_secrets(
    config: ET.Element, settings: dict[str, str]
) -> None:
    assert set(settings) == {
        "WSGI_HANDLER",
        "PYTHONPATH",
        "VEZAPROVISIONER_CONFIG",
        "WSGI_RESTART_FILE_REGEX",
    }
    handler = config.find("system.webServer/handlers/add")
    assert handler is not None
    wfastcgi = PureWindowsPath(handler.attrib["scriptProcessor"].split("|")[1])
    assert [PureWindowsPath(p) for p in settings["PYTHONPATH"].split(";")] == [wfastcgi.parent]
    config_file = PureWindowsPath(settings["VEZAPROVISIONER_CONFIG"])
    assert config_file.is_absolute()
    assert config_file.suffix == ".toml"
    text = WEB_CONFIG.read_text(encoding="utf-8")
    assert not re.search(r"password\s*=|scrypt\$|connectionString", text, re.IGNORECASE)
    assert "WSGI_PTVSD_SECRET" not in settings
    assert "WSGI_LOG" not in settings  # wfastcgi's debug log would record every request


def test_only_web_config_changes_restart_the_processes(settings: dict[str, str]) -> None:
    restart = re.compile(settings["WSGI_RESTART_FILE_REGEX"])  # wfastcgi: re.match on the name
    assert restart.match("web.config")
    assert restart.match("Web.config")
    for name in (
        "logs\\vezaprovisioner-2026-11-26.log",
        "data\\journal.jsonl",
        "vezaprovisioner.toml",
        "app.py",
        "sub\\web.config",
        "web.config.bak",
    ):
        assert not restart.match(name), name


def test_request_filtering_limits(config: ET.Element) -> None:
    filtering = config.find("system.webServer/security/requestFiltering")
    assert filtering is not None
    assert filtering.attrib["allowDoubleEscaping"] == "false"
    limits = filtering.find("requestLimits")
    assert limits is not None
    # Small, but above the app's own limit so callers get its problem+json 413, not IIS's page.
    assert MAX_BODY_BYTES < int(limits.attrib["maxAllowedContentLength"]) <= 64 * 1024
    assert int(limits.attrib["maxUrl"]) <= 4096
    assert int(limits.attrib["maxQueryString"]) <= 2048
    verbs = filtering.find("verbs")
    assert verbs is not None
    assert verbs.attrib["allowUnlisted"] == "false"
    assert {v.attrib["verb"] for v in verbs if v.attrib["allowed"] == "true"} == {
        "GET",
        "HEAD",
        "POST",
    }


def test_problem_responses_pass_through_iis(config: ET.Element) -> None:
    errors = config.find("system.webServer/httpErrors")
    assert errors is not None
    assert errors.attrib["existingResponse"] == "PassThrough"


def test_no_redirect_is_inherited_from_the_site(config: ET.Element) -> None:
    """Exchange admins commonly redirect Default Web Site to /owa (httpRedirect, a section a
    web.config may set: IIS Manager writes it there); the application turns it off for itself."""
    redirect = config.find("system.webServer/httpRedirect")
    assert redirect is not None
    assert redirect.attrib == {"enabled": "false"}


def test_locked_sections_are_left_to_install_ps1(config: ET.Element) -> None:
    """authentication, access (Require SSL) and fastCgi are locked or AppHostOnly: a web.config
    that sets them makes IIS answer 500.19 for every request."""
    web_server = config.find("system.webServer")
    assert web_server is not None
    assert web_server.find("security/authentication") is None
    assert web_server.find("security/access") is None
    assert web_server.find("fastCgi") is None


@pytest.mark.slow
def test_a_wfastcgi_like_host_serves_the_app_named_in_web_config(tmp_path: Path) -> None:
    """web.config as install.ps1 writes it (config path set), served the way wfastcgi does."""
    data = tmp_path / "data"
    config = tmp_path / "vezaprovisioner.toml"
    config.write_text(
        f'backend = "simulated"\nnot_found_retry_seconds = 0\ndata_dir = {json.dumps(str(data))}\n'
        f'[simulated]\ndirectory = {json.dumps(str(TEST_DIRECTORY))}\n[auth]\nmode = "iis"\n',
        encoding="utf-8",
    )
    tree = ET.parse(WEB_CONFIG)
    for add in tree.getroot().iterfind("appSettings/add"):
        if add.attrib["key"] == "VEZAPROVISIONER_CONFIG":
            add.set("value", str(config))
        if add.attrib["key"] == "PYTHONPATH":
            add.set("value", str(REPO_ROOT / "src"))
    web_config = tmp_path / "web.config"
    tree.write(web_config)
    iis = {
        "SERVER_NAME": "ex01.contoso.com",
        "SERVER_PORT": "443",
        "SERVER_PORT_SECURE": "1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTPS": "on",
        "REMOTE_ADDR": "10.0.0.5",
        "REMOTE_PORT": "50123",
        "APPL_PHYSICAL_PATH": str(tmp_path),
        "QUERY_STRING": "",
    }
    user = {"AUTH_TYPE": "Basic", "AUTH_USER": "CONTOSO\\svc-veza"}
    user |= {"REMOTE_USER": "CONTOSO\\svc-veza", "LOGON_USER": "CONTOSO\\svc-veza"}
    post = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/json"}
    emails = "/VezaProvisioner/api/v1/emails"
    requests = [
        {**iis, "REQUEST_METHOD": "GET", "PATH_INFO": "/VezaProvisioner/health"},
        {**iis, **post, "PATH_INFO": emails, "body": '{"identity": "plain"}'},
        {**iis, **user, **post, "PATH_INFO": emails, "body": '{"identity": "plain"}'},
        {**iis, **user, "REQUEST_METHOD": "GET", "PATH_INFO": f"{emails}/plain"},
    ]
    requests_file = tmp_path / "requests.json"
    requests_file.write_text(json.dumps(requests), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEZAPROVISIONER_")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.fakes.wfastcgi_host", str(web_config), str(requests_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [reply["status"].split()[0] for reply in replies] == ["200", "401", "201", "200"]
    assert json.loads(replies[3]["body"])["has_mailbox"] is True
    logs = list((data / "logs").glob("vezaprovisioner-*.log"))
    assert len(logs) == 1
    assert "started under IIS" in logs[0].read_text(encoding="utf-8")
