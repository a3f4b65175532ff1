from __future__ import annotations

from pathlib import Path

import pytest

from railwatch.config import effective_detector, load_settings, masked_dump
from railwatch.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "railwatch.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load_settings(environ={}, cwd=tmp_path)
    assert s.source == "defaults"
    assert s.imagery.provider == "files"
    assert s.aoi.dir == tmp_path / "aoi"
    assert s.imagery.files.root == tmp_path / "var/archive"
    assert s.store.url == f"sqlite:///{tmp_path}/var/railwatch.db"


def test_required_keys_exist_with_their_names(tmp_path: Path) -> None:
    p = write(tmp_path, '[aoi]\ndir = "a"\n[imagery]\nprovider = "files"\n[imagery.files]\nroot = "r"\n'
                        '[store]\nurl = "sqlite:///x.db"\n')
    s = load_settings(p, environ={}, cwd=tmp_path)
    assert s.aoi.dir == tmp_path / "a"
    assert s.imagery.files.root == tmp_path / "r"
    assert s.store.url == f"sqlite:///{tmp_path}/x.db"


def test_env_override_and_unknown_override(tmp_path: Path) -> None:
    p = write(tmp_path, "[store]\nurl = 'sqlite:///a.db'\n")
    s = load_settings(p, environ={"RAILWATCH_STORE__URL": "sqlite:////abs/b.db",
                                  "RAILWATCH_DETECTOR__ALERT_SIGMA": "5.5"}, cwd=tmp_path)
    assert s.store.url == "sqlite:////abs/b.db"
    assert s.detector.alert_sigma == 5.5
    with pytest.raises(ConfigError) as e:
        load_settings(p, environ={"RAILWATCH_STORE__NOPE": "1"}, cwd=tmp_path)
    assert "RAILWATCH_STORE__NOPE" in str(e.value)


def test_env_overrides_reach_list_entries_by_index(tmp_path: Path) -> None:
    """``RAILWATCH_SUBSCRIBERS__<i>__<KEY>`` overrides one [[subscribers]] entry; the next index adds
    one (a deployment configured from the environment alone, as in Docker)."""
    p = write(tmp_path, '[[subscribers]]\nname = "ops"\nkind = "webhook"\nurl = "http://127.0.0.1:9/x"\n'
                        'secret_env = "HOOK_KEY"\n')
    env = {
        "HOOK_KEY": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "RAILWATCH_SUBSCRIBERS__0__URL": "http://127.0.0.1:8080/hook",
        "RAILWATCH_SUBSCRIBERS__1__NAME": "desk",
        "RAILWATCH_SUBSCRIBERS__1__KIND": "email",
        "RAILWATCH_SUBSCRIBERS__1__TO": '["desk@example.org"]',
        "RAILWATCH_SUBSCRIBERS__1__FROM": "railwatch@example.org",
        "RAILWATCH_SUBSCRIBERS__1__SMTP_HOST": "127.0.0.1",
    }
    s = load_settings(p, environ=env, cwd=tmp_path)
    assert [sub.name for sub in s.subscribers] == ["ops", "desk"]
    assert s.subscribers[0].url == "http://127.0.0.1:8080/hook"
    assert s.subscribers[1].to == ["desk@example.org"]
    for name, why in (("RAILWATCH_SUBSCRIBERS__3__URL", "there is no entry 3"),
                      ("RAILWATCH_SUBSCRIBERS__0", "names no known configuration key"),
                      ("RAILWATCH_SUBSCRIBERS__0__NOPE", "names no known configuration key"),
                      ("RAILWATCH_SUBSCRIBERS__X__URL", "names no known configuration key")):
        with pytest.raises(ConfigError) as e:
            load_settings(p, environ={"HOOK_KEY": env["HOOK_KEY"], name: "http://127.0.0.1:1/"}, cwd=tmp_path)
        assert name in str(e.value) and why in str(e.value)


def test_all_errors_reported_together_with_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, '[aoi]\ndirr = "x"\n[imagery]\nprovider = "ftp"\n[detector]\nalert_sigma = "high"\n'
                        '[imagery.sentinelhub]\nbase_url = "http://example.com"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(p, environ={}, cwd=tmp_path)
    msg = str(e.value)
    assert str(p) in msg
    assert len(e.value.problems) == 4
    assert "[aoi] dirr: unknown key" in msg
    assert "[imagery] provider" in msg
    assert "[detector] alert_sigma" in msg
    assert "[imagery.sentinelhub] base_url" in msg and "https" in msg


def test_invalid_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[aoi\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(p, environ={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", environ={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(environ={"RAILWATCH_CONFIG": str(tmp_path / "nope.toml")}, cwd=tmp_path)


def test_loopback_http_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, '[imagery.sentinelhub]\nbase_url = "http://127.0.0.1:8080"\ntoken_url = "http://localhost:1/t"\n')
    s = load_settings(p, environ={}, cwd=tmp_path)
    assert s.imagery.sentinelhub.base_url == "http://127.0.0.1:8080"


def test_secrets_read_from_env_and_masked(tmp_path: Path) -> None:
    s = load_settings(environ={"RAILWATCH_SENTINELHUB_CLIENT_SECRET": "s3cr3t-value"}, cwd=tmp_path)
    assert s.secrets["imagery.sentinelhub.client_secret_env"].get_secret_value() == "s3cr3t-value"
    dumped = masked_dump(s)
    assert "s3cr3t-value" not in repr(dumped) and "s3cr3t-value" not in repr(s)
    assert dumped["imagery"]["sentinelhub"]["client_secret"] == "********"


def test_aoi_detector_overrides(tmp_path: Path) -> None:
    s = load_settings(environ={}, cwd=tmp_path)
    d = effective_detector(s, {"alert_sigma": 6})
    assert d.alert_sigma == 6 and d.min_history == s.detector.min_history
    with pytest.raises(ConfigError, match="nonsense"):
        effective_detector(s, {"nonsense": 1})


def test_read_ahead_defaults_to_two_scenes_and_is_bounded(tmp_path: Path) -> None:
    assert load_settings(environ={}, cwd=tmp_path).imagery.read_ahead == 2
    p = write(tmp_path, "[imagery]\nread_ahead = 0\n")
    assert load_settings(p, environ={}, cwd=tmp_path).imagery.read_ahead == 0
    assert load_settings(p, environ={"RAILWATCH_IMAGERY__READ_AHEAD": "3"}, cwd=tmp_path).imagery.read_ahead == 3
    for bad, expected in (("5", "less than or equal to 4 (got 5)"), ("-1", "greater than or equal to 0 (got -1)"),
                          ("'two'", "valid integer")):
        with pytest.raises(ConfigError) as err:
            load_settings(write(tmp_path, f"[imagery]\nread_ahead = {bad}\n"), environ={}, cwd=tmp_path)
        assert f"{tmp_path / 'railwatch.toml'}: [imagery] read_ahead: " in str(err.value)
        assert expected in str(err.value)
    with pytest.raises(ConfigError, match=r"\[imagery\] read_ahead: Input should be less than or equal to 4"):
        load_settings(p, environ={"RAILWATCH_IMAGERY__READ_AHEAD": "8"}, cwd=tmp_path)


def test_read_threads_default_to_two_and_are_bounded(tmp_path: Path) -> None:
    assert load_settings(environ={}, cwd=tmp_path).imagery.read_threads == 2
    p = write(tmp_path, "[imagery]\nread_threads = 1\n")
    assert load_settings(p, environ={}, cwd=tmp_path).imagery.read_threads == 1
    for bad in (0, 17):
        with pytest.raises(ConfigError, match=r"\[imagery\] read_threads: "):
            load_settings(write(tmp_path, f"[imagery]\nread_threads = {bad}\n"), environ={}, cwd=tmp_path)


def test_the_files_provider_decodes_with_the_configured_threads(tmp_path: Path) -> None:
    from railwatch.cli import make_provider

    p = write(tmp_path, f"[imagery]\nread_threads = 3\n[imagery.files]\nroot = \"{tmp_path / 'archive'}\"\n")
    provider = make_provider(load_settings(p, environ={}, cwd=tmp_path))
    assert provider.read_threads == 3 and provider.root == tmp_path / "archive"
