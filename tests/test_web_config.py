"""web.config, read as XML the way IIS and wfastcgi read it: handler, appSettings, limits."""

from __future__ import annotations

import importlib
import re
import xml.etree.ElementTree as ET
from pathlib import PureWindowsPath

import pytest

from tests.conftest import REPO_ROOT
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


def test_application_initialization_requests_the_apps_warm_up_page(config: ET.Element) -> None:
    """IIS requests initializationPage, relative to the application, when the pool starts; the
    app serves that path (without credentials) and the doctor checks the same path."""
    from fastapi import APIRouter
    from fastapi.routing import APIRoute

    from vezaprovisioner.api.routes import routes
    from vezaprovisioner.iis_settings import WARMUP_PAGE

    init = config.find("system.webServer/applicationInitialization")
    assert init is not None
    assert init.attrib["doAppInitAfterRestart"] == "true"
    assert [add.attrib["initializationPage"] for add in init.iterfind("add")] == [WARMUP_PAGE]
    router = APIRouter()
    routes.add_to(router)
    served = {route.path: route.methods for route in router.routes if isinstance(route, APIRoute)}
    assert served[WARMUP_PAGE] == {"GET"}  # what Application Initialization sends
