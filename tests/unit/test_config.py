from __future__ import annotations

import pytest

from flask_tasks.config import SETTINGS, Config, load
from flask_tasks.exceptions import ImproperlyConfigured


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
    from flask_tasks.routing import parse_rate

    assert parse_rate(value) == pytest.approx(per_second)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["10/d", "fast", "0/s", "-1/s"])
def test_parse_rate_rejects(value: str) -> None:
    from flask_tasks.routing import parse_rate

    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate(value)


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = [s.key for s in SETTINGS if f"`{s.key}`" not in page]
    assert not missing, f"not in docs/configuration.md: {missing}"
