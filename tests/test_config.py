"""Configuration: validation, environment, URLs, namespaces, and the public names."""

from __future__ import annotations

import pytest

import dedupcall
from dedupcall import Config, ConfigError, Dedup
from dedupcall.config import config_from_env, redact, url_from_env
from dedupcall.keys import KeySpace


def test_defaults_match_the_design() -> None:
    c = Config()
    assert (c.max_concurrent, c.max_retries, c.retry_delay, c.lock_timeout) == (100, 3, 1.0, 30.0)
    assert (c.execution_timeout, c.result_ttl, c.retention, c.drain_timeout) == (
        60.0,
        3600.0,
        3600.0,
        10.0,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"max_concurrent": 0},
        {"max_concurrent": 1.5},
        {"max_concurrent": True},
        {"max_retries": -1},
        {"retry_delay": -0.1},
        {"lock_timeout": 0},
        {"lock_timeout": float("inf")},
        {"result_ttl": float("nan")},
        {"execution_timeout": "5"},
        {"no_such_option": 1},
    ],
)
def test_invalid_config_is_a_config_error_and_a_value_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        Dedup("redis://127.0.0.1:6379/0", **bad)
    assert isinstance(info.value, ValueError)


def test_from_env_reads_original_variables_and_dedupcall_settings() -> None:
    env = {
        "REDIS_HOST": "10.0.0.5",
        "REDIS_PORT": "6380",
        "REDIS_PASSWORD": "p@ss word",
        "REDIS_DB": "2",
        "DEDUPCALL_MAX_CONCURRENT": "7",
        "DEDUPCALL_LOCK_TIMEOUT": "12.5",
        "DEDUPCALL_NAMESPACE": "svc",
    }
    dedup = Dedup.from_env(env)
    assert dedup.url == "redis://:p%40ss%20word@10.0.0.5:6380/2"
    assert (dedup.config.max_concurrent, dedup.config.lock_timeout) == (7, 12.5)
    assert dedup.namespace == "svc"
    assert "p@ss" not in repr(dedup) and "p%40ss" not in repr(dedup)
    assert url_from_env({"REDIS_URL": "rediss://h:1/0", "REDIS_HOST": "x"}) == "rediss://h:1/0"
    assert config_from_env({"DEDUPCALL_MAX_CONCURRENT": "none"}) == {"max_concurrent": None}
    with pytest.raises(ConfigError):
        config_from_env({"DEDUPCALL_MAX_RETRIES": "many"})
    with pytest.raises(ConfigError):
        Dedup.from_env({})


def test_urls_and_secrets() -> None:
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    with pytest.raises(ConfigError):
        Dedup("http://127.0.0.1:6379")


@pytest.mark.parametrize("ns", ["", "a{b}", "a*", "has space", "x" * 65, "a]b"])
def test_namespaces_that_would_break_hash_tags_or_acl_globs_are_refused(ns: str) -> None:
    with pytest.raises(ConfigError):
        KeySpace(ns)


def test_every_name_of_a_namespace_shares_its_hash_tag() -> None:
    keys = KeySpace("app.v1")
    names = [
        keys.config,
        keys.queue,
        keys.delayed,
        keys.running,
        keys.instances,
        keys.seq,
        keys.flight("i"),
        keys.holders("i"),
        keys.result("i"),
        keys.active("d"),
        keys.cache("d"),
        keys.held("x"),
        keys.instance_info("x"),
        keys.done_channel,
        keys.control_channel,
        keys.instance_channel("x"),
    ]
    assert all(name.startswith("{app.v1}:") for name in names)


def test_all_is_sorted_and_exports_what_exists() -> None:
    assert dedupcall.__all__ == sorted(dedupcall.__all__)
    for name in dedupcall.__all__:
        assert getattr(dedupcall, name).__doc__, name
    public = {n for n in vars(dedupcall) if not n.startswith("_")} - {"__version__"}
    modules = {n for n in public if type(getattr(dedupcall, n)).__name__ == "module"}
    assert public - modules == set(dedupcall.__all__)


def test_sentinel_urls() -> None:
    from dedupcall.config import parse_sentinel_url

    t = parse_sentinel_url(
        "redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?sentinel_password=sp"
    )
    assert t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (t.service, t.db, t.username, t.password, t.sentinel_password, t.tls) == (
        "mymaster",
        2,
        "app",
        "pw",
        "sp",
        False,
    )
    assert redact("redis+sentinel://app:pw@h1:1,h2:2/m") == "redis+sentinel://app:***@h1:1,h2:2/m"
    for bad in ("redis+sentinel://h1/m", "redis+sentinel://h1:1", "redis+sentinel://h1:1/m/x"):
        with pytest.raises(ConfigError):
            Dedup(bad)


def test_secrets_in_query_strings_are_redacted() -> None:
    url = "redis+sentinel://h1:26379,h2:26379/mymaster?sentinel_password=s3cret"
    assert "s3cret" not in redact(url)
    assert "s3cret" not in repr(Dedup(url))
    with pytest.raises(ConfigError) as info:
        Dedup("redis+sentinel://h1:26379/mymaster/x?sentinel_password=s3cret")
    assert "s3cret" not in str(info.value)
