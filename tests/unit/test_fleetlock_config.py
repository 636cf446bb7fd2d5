"""The --fleetlock-* flags of cluo-coord (cluo_coord/fleetlock_config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluo.errors import ConfigError
from cluo_coord.config import load_settings


def test_the_fleetlock_server_is_off_by_default() -> None:
    assert not load_settings([], {}).fleetlock.enabled


def test_fleetlock_flags_are_read() -> None:
    settings = load_settings(["--fleetlock-address", "127.0.0.1:8443",
                              "--fleetlock-tls-cert", "/c.pem", "--fleetlock-tls-key", "/k.pem",
                              "--fleetlock-drain-timeout", "90s"], {})
    config = settings.fleetlock
    assert (config.host, config.port, config.drain_timeout) == ("127.0.0.1", 8443, 90.0)
    assert config.tls is not None and config.tls.cert == Path("/c.pem")


@pytest.mark.parametrize(("argv", "message"), [
    (["--fleetlock-address", "8443"], "HOST:PORT"),
    (["--fleetlock-address", ":1", "--fleetlock-tls-cert", "/c.pem"], "go together"),
    (["--fleetlock-tls-cert", "/c.pem", "--fleetlock-tls-key", "/k.pem"],
     "needs --fleetlock-address"),
    (["--fleetlock-drain-timeout", "0s"], "--fleetlock-drain-timeout: '0s': must be a positive"),
    (["--fleetlock-drain-timeout", "ten"], "--fleetlock-drain-timeout: 'ten': not a duration"),
])
def test_bad_fleetlock_flags_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(argv, {})
