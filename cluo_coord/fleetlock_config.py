"""cluo-coord's flags of the FleetLock server (cluo_coord.fleetlock, docs/fleetlock.md).

Declared here, listed by cluo_coord.config's loader (``FLEETLOCK_SETTINGS``) and read into
a `FleetLockConfig` (``fleetlock_config``). Off unless ``--fleetlock-address`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluo.errors import ConfigError
from cluo.settings import Setting, Values, optional_text, positive_duration
from cluo_coord.fleetlock import TlsFiles

DEFAULT_DRAIN_TIMEOUT = "10m"  # as cluo-agent's --drain-timeout


@dataclass(frozen=True)
class FleetLockConfig:
    host: str = ""
    port: int = -1  # -1: no FleetLock server; 0: a free port (tests)
    tls: TlsFiles | None = None
    drain_timeout: float = 600.0  # seconds, for a FleetLock node's drain

    @property
    def enabled(self) -> bool:
        return self.port >= 0


def _address(value: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' (every address); empty: off."""
    if not value:
        return "", -1
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("not HOST:PORT (e.g. ':8443')")
    return host.strip("[]"), int(port_text)


FLEETLOCK_ADDRESS = Setting(
    "--fleetlock-address", _address,
    "HOST:PORT of a FleetLock server for Zincati hosts, on the same reboot slots "
    "(default: none)", default="")
FLEETLOCK_TLS_CERT = Setting("--fleetlock-tls-cert", optional_text,
                             "PEM certificate (chain) of the FleetLock server: HTTPS "
                             "(default: none, plain HTTP)")
FLEETLOCK_TLS_KEY = Setting("--fleetlock-tls-key", optional_text,
                            "PEM private key of --fleetlock-tls-cert")
FLEETLOCK_DRAIN_TIMEOUT = Setting(
    "--fleetlock-drain-timeout", positive_duration,
    f"how long cluo-coord drains a FleetLock node before it gives up and hands the slot "
    f"back (default: {DEFAULT_DRAIN_TIMEOUT})", default=DEFAULT_DRAIN_TIMEOUT)

FLEETLOCK_SETTINGS = (FLEETLOCK_ADDRESS, FLEETLOCK_TLS_CERT, FLEETLOCK_TLS_KEY,
                      FLEETLOCK_DRAIN_TIMEOUT)


def fleetlock_config(values: Values) -> FleetLockConfig:
    host, port = values[FLEETLOCK_ADDRESS]
    cert, key = values[FLEETLOCK_TLS_CERT], values[FLEETLOCK_TLS_KEY]
    if bool(cert) != bool(key):
        given = FLEETLOCK_TLS_CERT if cert else FLEETLOCK_TLS_KEY
        raise ConfigError(f"{values.describe(given)}: {FLEETLOCK_TLS_CERT.flag} and "
                          f"{FLEETLOCK_TLS_KEY.flag} go together")
    tls = TlsFiles(Path(cert), Path(key)) if cert and key else None
    if tls is not None and port < 0:
        raise ConfigError(f"{values.describe(FLEETLOCK_TLS_CERT)}: needs "
                          f"{FLEETLOCK_ADDRESS.flag}")
    return FleetLockConfig(host=host, port=port, tls=tls,
                           drain_timeout=values[FLEETLOCK_DRAIN_TIMEOUT])
