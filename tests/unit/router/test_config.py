"""The router's config: flags and file into one checked model (scheduler/router/config.py)."""

from __future__ import annotations

import pytest

from scheduler.router.config import load_config
from traces.errors import ConfigError


def write(tmp_path, text: str, name: str = "router.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_file_and_flags_fill_one_config_flags_winning(tmp_path) -> None:
    path = write(
        tmp_path,
        'port = 9000\npolicy = "laps"\n[policy_params]\nwindow_ms = 2.0\n'
        '[[backends]]\nurl = "http://127.0.0.1:8000/"\nprotocol = "sglang"\npools = ["short"]\n',
    )
    cfg = load_config(path, {"port": 9100, "policy_params": {"max_batch": 8}})
    assert cfg.port == 9100 and cfg.policy == "laps"
    assert cfg.policy_params == {"window_ms": 2.0, "max_batch": 8}
    (b,) = cfg.backends
    assert (b.url, b.protocol, b.role, b.pools) == (
        "http://127.0.0.1:8000",
        "sglang",
        "regular",
        ("short",),
    )


def test_yaml_works_as_toml_does(tmp_path) -> None:
    path = write(
        tmp_path, "backends:\n  - url: http://127.0.0.1:8000\n    role: regular\n", "r.yaml"
    )
    assert load_config(path).backends[0].url == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "no backends"),
        ({"backends": [{"url": "ftp://x"}]}, r"backends\[0\]\.url: .*http:// or https://"),
        ({"backends": [{"url": "http://a:1"}, {"url": "http://a:1/"}]}, "repeated: http://a:1"),
        (
            {"backends": [{"url": "http://a:1", "role": "prefill"}]},
            "at least one prefill and one decode",
        ),
        (
            {"backends": [{"url": "http://a:1", "protcol": "vllm"}]},
            r"protcol: unknown key; known keys here: url, protocol",
        ),
        (
            {"backends": [{"url": "http://a:1"}], "admin_key": ""},
            "admin_key: expected at least 12 characters",
        ),
        ({"backends": [{"url": "http://a:1"}], "max_queue": 0}, "max_queue"),
        ({"backends": [{"url": "http://a:1"}], "health": {"interval_s": 0}}, r"health\.interval_s"),
    ],
)
def test_bad_settings_are_named_with_what_was_expected(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_bad_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"router\.toml: not valid TOML"):
        load_config(write(tmp_path, "port = = 3"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_backends_added_at_run_time_must_be_on_allowed_hosts() -> None:
    cfg = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:1"}],
            "allowed_hosts": ["10.0.0.0/8", "gpu-node-1"],
        },
    )
    assert cfg.host_allowed("http://10.3.4.5:8000")
    assert cfg.host_allowed("https://gpu-node-1:443")
    assert not cfg.host_allowed("http://11.0.0.1:8000")
    assert not cfg.host_allowed("file:///etc/passwd")
    assert not cfg.host_allowed("http://127.0.0.1:8000")  # not in this router's list


def test_an_api_key_never_shows_in_the_config_or_its_dump() -> None:
    cfg = load_config(None, {"backends": [{"url": "http://a:1", "api_key": "sk-topsecret"}]})
    assert "sk-topsecret" not in repr(cfg) and "sk-topsecret" not in cfg.model_dump_json()
    assert cfg.backends[0].api_key.get_secret_value() == "sk-topsecret"
