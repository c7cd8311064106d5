from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import pytest

from flask_tasks.config import (
    CELERY_NAMES,
    SETTINGS,
    Config,
    Setting,
    load,
)
from flask_tasks.config.settings import _milliseconds_as_seconds
from flask_tasks.exceptions import ConfigWarning, ImproperlyConfigured


def test_defaults() -> None:
    config = load({}, "/srv/instance")
    assert config.broker_url is None and config.result_backend is None
    assert config.accept_content == ("json",)
    assert config.result_expires == 86400.0
    assert config.default_queue == "celery"
    assert config.embedded_dir == "/srv/instance"


def test_celery_fallbacks_and_precedence() -> None:
    config = load({"CELERY_BROKER_URL": "redis://a", "CELERY_RESULT_BACKEND": "redis://b"})
    assert (config.broker_url, config.result_backend) == ("redis://a", "redis://b")
    config = load({"BROKER_URL": "redis://x", "CELERY_BROKER_URL": "redis://a"})
    assert config.broker_url == "redis://x"


def test_tasks_prefix_settings() -> None:
    config = load({"TASKS_ACCEPT_CONTENT": ["json", "pickle"], "TASKS_RESULT_EXPIRES": 0,
                   "TASKS_ALWAYS_EAGER": True})
    assert config.accept_content == ("json", "pickle")
    assert config.result_expires is None
    assert config.always_eager is True


@pytest.mark.parametrize("key,value", [("TASKS_ALWAYS_EAGER", "yes"),
                                       ("TASKS_RESULT_EXPIRES", "1 day"),
                                       ("TASKS_RESULT_EXPIRES", True),
                                       ("BROKER_URL", 6379)])
def test_wrong_types_are_reported_with_the_key(key: str, value: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=key):
        load({key: value})


def test_every_setting_is_a_config_field_with_the_same_default() -> None:
    defaults = Config()
    for setting in SETTINGS:
        assert setting.doc, setting.key
        value = getattr(defaults, setting.attr)  # AttributeError: no such field
        expected = setting.default
        if isinstance(expected, (list, tuple)):
            value, expected = list(value), list(expected)
        assert value == expected, f"{setting.key}: table says {expected!r}, Config has {value!r}"


@pytest.mark.parametrize("value,per_second", [("10/s", 10.0), ("120/m", 2.0), ("36/h", 0.01),
                                              ("4", 4.0), (2.5, 2.5)])
def test_parse_rate(value: object, per_second: float) -> None:
    from flask_tasks.config import parse_rate

    assert parse_rate(value) == pytest.approx(per_second)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["10/d", "fast", "0/s", "-1/s"])
def test_parse_rate_rejects(value: str) -> None:
    from flask_tasks.config import parse_rate

    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate(value)


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [s.key for s in SETTINGS if f"`{s.key}`" not in page]
    assert not missing, f"not in docs/configuration.md: {missing}"


# -- app.config["CELERY"]: the Flask docs' pattern, with Celery's lowercase names -------------

CELERY_PAIRS = sorted((name, setting.key) for name, setting in CELERY_NAMES.items())


def _sample(setting: Setting, variant: int) -> Any:
    """A value of the setting's type that differs from its default and from the other variant
    (a setting with two choices: the other one, then the default)."""
    if setting.choices:
        others = [choice for choice in setting.choices if choice != setting.default]
        return others[0] if variant == 1 else (others[1:] or [setting.default])[0]
    if bool in setting.types:
        return (variant == 1) != bool(setting.default)
    if str in setting.types:
        return f"from-{variant}"
    if int in setting.types:
        return 6 + variant
    if dict in setting.types:
        return {"variant": variant}
    assert list in setting.types, setting.key
    return [f"module{variant}"]


def _ours(setting: Setting, value: Any) -> Any:
    """What ``Config`` holds for ``value`` given under the setting's Celery name."""
    if setting.from_celery is _milliseconds_as_seconds:
        return value / 1000
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("celery_name,key", CELERY_PAIRS)
def test_celery_dict_maps_each_supported_name(celery_name: str, key: str) -> None:
    setting = CELERY_NAMES[celery_name]
    value = _sample(setting, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported name never warns
        config = load({"CELERY": {celery_name: value}})
    assert getattr(config, setting.attr) == _ours(setting, value)
    assert getattr(config, setting.attr) != getattr(Config(), setting.attr)


@pytest.mark.parametrize("celery_name,key", CELERY_PAIRS)
def test_an_app_config_key_wins_over_the_celery_dict(celery_name: str, key: str) -> None:
    setting = CELERY_NAMES[celery_name]
    explicit, from_celery = _sample(setting, 1), _sample(setting, 2)
    config = load({key: explicit, "CELERY": {celery_name: from_celery}})
    expected = tuple(explicit) if isinstance(explicit, list) else explicit
    assert getattr(config, setting.attr) == expected


def test_celery_fallback_keys_win_over_the_celery_dict() -> None:
    config = load({"CELERY_BROKER_URL": "redis://fallback", "CELERY_RESULT_BACKEND": "redis://r",
                   "CELERY": {"broker_url": "redis://dict", "result_backend": "redis://d"}})
    assert (config.broker_url, config.result_backend) == ("redis://fallback", "redis://r")
    # None in app.config means unset, so the CELERY dict applies
    config = load({"TASKS_ACKS_LATE": None, "CELERY": {"task_acks_late": True}})
    assert config.acks_late is True


def test_the_flask_docs_example() -> None:
    config = load({"CELERY": {"broker_url": "redis://localhost", "result_backend":
                              "redis://localhost", "task_ignore_result": True}})
    assert config.broker_url == config.result_backend == "redis://localhost"
    assert config.ignore_result is True


def test_celery_milliseconds_become_seconds() -> None:
    config = load({"CELERY": {"result_backend_base_sleep_between_retries_ms": 250,
                              "result_backend_max_sleep_between_retries_ms": 20000}})
    assert config.result_backend_base_sleep_between_retries == pytest.approx(0.25)
    assert config.result_backend_max_sleep_between_retries == pytest.approx(20.0)
    # our own key is seconds, and wins
    config = load({"TASKS_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES": 0.5,
                   "CELERY": {"result_backend_base_sleep_between_retries_ms": 250}})
    assert config.result_backend_base_sleep_between_retries == 0.5


def test_celery_values_in_celery_units() -> None:
    config = load({"CELERY": {"result_expires": timedelta(hours=2),
                              "result_backend_max_retries": float("inf")}})
    assert config.result_expires == 7200.0
    assert config.result_backend_max_retries is None  # Celery's "forever"
    assert load({"CELERY": {"result_expires": None}}).result_expires is None  # keep forever
    assert load({"CELERY": {"result_expires": 60}}).result_expires == 60
    assert load({"CELERY": {"task_time_limit": None}}).time_limit is None


def test_celery_imports_and_include_are_joined() -> None:
    config = load({"CELERY": {"imports": ["a.tasks"], "include": ("b.tasks",)}})
    assert config.imports == ("a.tasks", "b.tasks")
    assert load({"CELERY": {"include": ["b.tasks"]}}).imports == ("b.tasks",)
    assert load({"TASKS_IMPORTS": ["x"], "CELERY": {"include": ["b"]}}).imports == ("x",)


def test_an_unsupported_celery_name_warns_and_is_ignored() -> None:
    with pytest.warns(ConfigWarning, match=r"'timezone'.*not support.*ignored") as record:
        config = load({"CELERY": {"timezone": "Europe/Paris", "task_acks_late": True}})
    assert config.acks_late is True
    assert len(record) == 1 and "task_acks_late" not in str(record[0].message)
    with pytest.warns(ConfigWarning, match=r"'enable_utc', 'worker_send_task_events'.*they are"):
        load({"CELERY": {"enable_utc": True, "worker_send_task_events": True}})
    with pytest.warns(ConfigWarning, match="'CELERY_TASK_SERIALIZER'"):  # old names: not read
        config = load({"CELERY": {"CELERY_TASK_SERIALIZER": "pickle"}})
    assert config.serializer == "json"


@pytest.mark.parametrize("celery,match", [
    ({"task_acks_late": "yes"},
     r"app.config\['CELERY'\]\['task_acks_late'\] \(TASKS_ACKS_LATE\) must be bool"),
    ({"result_expires": "1 day"}, r"\['result_expires'\].*must be int or float"),
    ({"worker_concurrency": True}, r"\['worker_concurrency'\].*must be a number"),
    ({"result_backend_max_sleep_between_retries_ms": "10s"},
     r"\['result_backend_max_sleep_between_retries_ms'\]"),
    ({"accept_content": "json"}, r"\['accept_content'\].*must be list or tuple"),
    ({"broker_url": 6379}, r"\['broker_url'\] \(BROKER_URL\) must be str"),
])
def test_wrong_types_in_the_celery_dict_name_the_celery_key(celery: dict[str, Any],
                                                            match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        load({"CELERY": celery})


@pytest.mark.parametrize("value", ["redis://:secret@localhost", ["broker_url"], 3])
def test_celery_must_be_a_mapping(value: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"app.config\['CELERY'\] must be a dict") as e:
        load({"CELERY": value})
    assert "secret" not in str(e.value)


def test_unset_celery_dict_is_fine() -> None:
    assert load({"CELERY": None}) == load({}) == load({"CELERY": {}})


def test_every_celery_name_is_a_celery_setting() -> None:
    defaults = pytest.importorskip("celery.app.defaults")  # a test-only extra
    unknown = sorted(set(CELERY_NAMES) - set(defaults.SETTING_KEYS))
    assert not unknown, f"not Celery settings: {unknown}"


@pytest.mark.parametrize("page", ["configuration.md", "celery-compatibility.md"])
def test_every_celery_name_is_documented(page: str) -> None:
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / "docs" / page).read_text().splitlines()
    missing = [f"{name} -> {setting.key}" for name, setting in CELERY_NAMES.items()
               if not any(f"`{name}`" in line and f"`{setting.key}`" in line for line in lines)]
    assert not missing, f"no line of docs/{page} maps these Celery names: {missing}"


def test_result_expires_none_means_forever() -> None:
    assert load({"TASKS_RESULT_EXPIRES": None}).result_expires is None
    assert load({}).result_expires == 86400.0
