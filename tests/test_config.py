"""Configuration: one TOML file, environment overrides, and errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from vezaprovisioner.config import ConfigError, load_settings

HASH = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_demo_configuration_loads(repo_root: Path) -> None:
    settings = load_settings(repo_root / "examples" / "demo.toml", environ={})
    assert settings.backend == "simulated"
    assert settings.auth.mode == "basic"
    assert settings.simulated.directory == repo_root / "examples" / "directory.json"


def test_relative_directory_is_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[simulated]\ndirectory = "data/dir.json"\n')
    settings = load_settings(path, environ={})
    assert settings.simulated.directory == tmp_path / "data" / "dir.json"
    assert settings.data_dir == tmp_path / "data"
    assert settings.auth.mode == "iis"  # the default: IIS authenticates


def test_environment_overrides_nested_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f'[auth]\nmode = "basic"\n[auth.users]\na = "{HASH}"\n')
    env = {
        "VEZAPROVISIONER_AUTH__MODE": "iis",
        "VEZAPROVISIONER_AUTH__ALLOWED_USERS": '["CONTOSO\\\\svc-veza"]',
        "VEZAPROVISIONER_NOT_FOUND_RETRY_SECONDS": "2.5",
        "VEZAPROVISIONER_EXCHANGE__DOMAIN_CONTROLLER": "dc01.contoso.com",
    }
    settings = load_settings(path, environ=env)
    assert settings.auth.mode == "iis"
    assert settings.auth.allowed_users == ("CONTOSO\\svc-veza",)
    assert settings.not_found_retry_seconds == 2.5
    assert settings.exchange.domain_controller == "dc01.contoso.com"


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'backend = "simulated"\n')
    assert load_settings(environ={"VEZAPROVISIONER_CONFIG": str(path)}).source == path


def test_no_configuration_says_how_to_give_one() -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_settings(environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("backnd = 'simulated'\n", "backnd: unknown key"),
        ("backend = 'exchange'\n", "backend"),
        ("base_path = 'VezaProvisioner/'\n", "must start with '/'"),
        ("[exchange]\npowershell_path = 'powershell.exe'\n", "absolute Windows path"),
        ("[exchange]\ndomain_controller = 'dc01; rm'\n", "host or domain name"),
        ("[auth]\nmode = 'basic'\n", "nobody could call the API"),
        ("[auth]\nmode = 'basic'\n[auth.users]\ndemo = 'plaintext'\n", "hash-password"),
        ("[exchange]\nremote_routing_domain = 'contoso.mail.onmicrosoft.com'\n", "mailbox_kind"),
        ("not_found_retry_seconds = -1\n", "not_found_retry_seconds"),
        ("backend = \n", "not valid TOML"),
    ],
)
def test_invalid_configuration_names_the_key_and_the_fix(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert fragment in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "backnd = 1\nmailbox_kind = 'cloud'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "2 problem(s)" in str(caught.value)


def test_masked_settings_hide_password_hashes(tmp_path: Path) -> None:
    path = write(tmp_path, f'[auth]\nmode = "basic"\n[auth.users]\ndemo = "{HASH}"\n')
    masked = load_settings(path, environ={}).masked()
    assert masked["auth"]["users"] == {"demo": "***"}
    assert HASH not in str(masked)


def test_local_section_defaults_and_posix_paths_off_windows(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backend = 'local'\n[exchange]\npowershell_path = '/opt/fake/powershell'\n"
        "[local]\npool_size = 4\n",
    )
    settings = load_settings(path, environ={})
    assert settings.exchange.powershell_path == "/opt/fake/powershell"
    assert settings.local.pool_size == 4
    assert settings.local.startup_timeout_seconds == 180
    assert settings.local.queue_size == 32
    assert load_settings(write(tmp_path, ""), environ={}).local.pool_size == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[local]\npool_size = 17\n", "local.pool_size"),
        ("[local]\npool_size = -1\n", "local.pool_size"),
        ("[local]\nstartup_timeout = 5\n", "local.startup_timeout: unknown key"),
        ("[local]\nmax_commands = 0\n", "local.max_commands"),
        ("[exchange]\nremote_exchange_path = 'bin/RemoteExchange.ps1'\n", "absolute Windows path"),
    ],
)
def test_invalid_local_settings_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert fragment in str(caught.value)


def test_under_iis_pool_size_defaults_to_one_unless_the_file_sets_it() -> None:
    from vezaprovisioner.config import IIS_POOL_SIZE, Settings, for_iis

    assert IIS_POOL_SIZE == 1
    assert Settings().local.pool_size == 2  # uvicorn: one process, concurrent requests
    assert for_iis(Settings()).local.pool_size == 1
    chosen = Settings.model_validate({"local": {"pool_size": 3}})
    assert for_iis(chosen).local.pool_size == 3
    chosen = Settings.model_validate({"local": {"pool_size": 3}, "logging": {"file": "x.log"}})
    assert for_iis(chosen) is chosen


def test_under_iis_an_empty_log_file_means_the_daily_file_under_data_dir() -> None:
    """wfastcgi gives every request a fresh sys.stderr: standard error would reach nobody."""
    from vezaprovisioner.config import IIS_LOG_FILE, Settings, for_iis

    assert Settings().logging.file == ""  # uvicorn and the CLI: standard error
    assert for_iis(Settings()).logging.file == IIS_LOG_FILE == "logs/vezaprovisioner.log"
    chosen = Settings.model_validate({"logging": {"file": "elsewhere/service.log"}})
    assert for_iis(chosen).logging.file == "elsewhere/service.log"
