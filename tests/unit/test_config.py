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
    fields = Config.__dataclass_fields__
    for setting in SETTINGS:
        assert setting.attr in fields, setting.key
        assert setting.doc
    assert Config().default_queue == "celery"
