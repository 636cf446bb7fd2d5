"""What the agent reads from its host: os-release (quoted values), update.conf (override
order), the boot id, and what happens when files are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluo.errors import ConfigError
from cluo_host.host_facts import parse_env_file, read_boot_id, read_host_facts

BOOT_ID = "8b1f2c1e-7a53-4b55-9d0e-3d0c2f3f4a10"

# Flatcar's /etc/os-release (a symlink to /usr/lib/os-release), quotes as shipped.
FLATCAR_OS_RELEASE = """NAME="Flatcar Container Linux by Kinvolk"
ID=flatcar
ID_LIKE=coreos
VERSION=4081.2.0
VERSION_ID=4081.2.0
BUILD_ID=2024-11-14-1938
SYSEXT_LEVEL=1.0
PRETTY_NAME="Flatcar Container Linux by Kinvolk 4081.2.0 (Oklo)"
ANSI_COLOR="38;5;75"
HOME_URL="https://flatcar.org/"
"""


def host(root: Path, files: dict[str, str], boot_id: str | None = BOOT_ID + "\n") -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if boot_id is not None:
        path = root / "proc/sys/kernel/random/boot_id"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(boot_id)
    return root


# -- os-release -----------------------------------------------------------------------------


def test_reads_flatcar_os_release(tmp_path: Path) -> None:
    facts = read_host_facts(host(tmp_path, {"etc/os-release": FLATCAR_OS_RELEASE}))
    assert facts.os_id == "flatcar"
    assert facts.os_version == "4081.2.0"
    assert facts.boot_id == BOOT_ID


@pytest.mark.parametrize(("line", "value"), [
    ('VERSION="4081.2.0"', "4081.2.0"),  # FLUO crash-looped on these quotes
    ("VERSION='4081.2.0'", "4081.2.0"),
    ("VERSION=4081.2.0", "4081.2.0"),
    ('VERSION="4081.2.0"   ', "4081.2.0"),
    ('VERSION="4081.2.0" # the LTS', "4081.2.0"),
    ('VERSION="4081.2.0 (Oklo)"', "4081.2.0 (Oklo)"),
    ('VERSION="say \\"hi\\""', 'say "hi"'),
    ('VERSION="unbalanced', "unbalanced"),
])
def test_quoted_values_lose_their_quotes(tmp_path: Path, line: str, value: str) -> None:
    facts = read_host_facts(host(tmp_path, {"etc/os-release": f"ID=flatcar\n{line}\n"}))
    assert facts.os_version == value


def test_comments_blank_lines_and_junk_are_ignored() -> None:
    text = "# a comment\n\n   \nnot an assignment\nID=\"flatcar\"\n  VERSION_ID = 1.2.3\n"
    assert parse_env_file(text) == {"ID": "flatcar", "VERSION_ID": "1.2.3"}


def test_version_id_is_used_when_version_is_missing(tmp_path: Path) -> None:
    facts = read_host_facts(host(tmp_path, {"etc/os-release": 'ID=debian\nVERSION_ID="12"\n'}))
    assert facts.os_version == "12"


def test_etc_os_release_wins_over_usr_lib(tmp_path: Path) -> None:
    root = host(tmp_path, {
        "etc/os-release": "ID=flatcar\nVERSION=2\n",
        "usr/lib/os-release": "ID=other\nVERSION=1\n",
    })
    facts = read_host_facts(root)
    assert (facts.os_id, facts.os_version) == ("flatcar", "2")


def test_usr_lib_os_release_is_the_fallback(tmp_path: Path) -> None:
    facts = read_host_facts(host(tmp_path, {"usr/lib/os-release": "ID=flatcar\nVERSION=3\n"}))
    assert (facts.os_id, facts.os_version) == ("flatcar", "3")


def test_missing_os_release_gives_empty_values(tmp_path: Path) -> None:
    facts = read_host_facts(host(tmp_path, {}))
    assert (facts.os_id, facts.os_version) == ("", "")


# -- update.conf ----------------------------------------------------------------------------


def test_etc_update_conf_overrides_the_image_default(tmp_path: Path) -> None:
    root = host(tmp_path, {
        "usr/share/flatcar/update.conf": "GROUP=stable\nSERVER=https://public.update.flatcar-linux.net/v1/update/\n",
        "etc/flatcar/update.conf": 'GROUP="beta"\n',
    })
    assert read_host_facts(root).group == "beta"


def test_image_default_group_when_etc_has_no_group(tmp_path: Path) -> None:
    root = host(tmp_path, {
        "usr/share/flatcar/update.conf": "GROUP=stable\n",
        "etc/flatcar/update.conf": "REBOOT_STRATEGY=off\n",
    })
    assert read_host_facts(root).group == "stable"


def test_etc_update_conf_alone(tmp_path: Path) -> None:
    assert read_host_facts(host(tmp_path, {"etc/flatcar/update.conf": "GROUP='alpha'\n"})) \
        .group == "alpha"


def test_missing_update_conf_gives_no_group(tmp_path: Path) -> None:
    assert read_host_facts(host(tmp_path, {"etc/os-release": FLATCAR_OS_RELEASE})).group == ""


# -- boot id --------------------------------------------------------------------------------


def test_boot_id_is_stripped(tmp_path: Path) -> None:
    assert read_boot_id(host(tmp_path, {}, boot_id=f"  {BOOT_ID}\n\n")) == BOOT_ID


@pytest.mark.parametrize("content", ["", "\n", "   \n"])
def test_empty_boot_id_is_a_config_error(tmp_path: Path, content: str) -> None:
    root = host(tmp_path, {"etc/os-release": FLATCAR_OS_RELEASE}, boot_id=content)
    with pytest.raises(ConfigError, match=r"proc/sys/kernel/random/boot_id is empty"):
        read_host_facts(root)


def test_missing_boot_id_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    root = host(tmp_path, {"etc/os-release": FLATCAR_OS_RELEASE}, boot_id=None)
    with pytest.raises(ConfigError, match=r"cannot read the boot id from .*boot_id"):
        read_host_facts(root)
