"""cluo_host.reboot_required: the file's state, and the inotify watch on a real directory."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cluo.errors import CluoError
from cluo_host.reboot_required import (
    MAX_REASON,
    RebootRequired,
    RebootRequiredWatch,
    read_reboot_required,
)

TIMEOUT = 5.0


def test_absent_file_reads_as_none(tmp_path: Path) -> None:
    assert read_reboot_required(tmp_path / "reboot-required") is None


def test_present_file_without_a_package_list(tmp_path: Path) -> None:
    (tmp_path / "reboot-required").write_text("*** System restart required ***\n")
    found = read_reboot_required(tmp_path / "reboot-required")
    assert found == RebootRequired()
    assert found.describe() == "/run/reboot-required"


def test_package_list_is_read_once_per_name_in_order(tmp_path: Path) -> None:
    (tmp_path / "reboot-required").touch()
    (tmp_path / "reboot-required.pkgs").write_text("containerd\n\nkubernetes\ncontainerd\n")
    found = read_reboot_required(tmp_path / "reboot-required")
    assert found is not None
    assert found.describe() == "/run/reboot-required (packages: containerd, kubernetes)"


def test_a_long_package_list_is_cut() -> None:
    text = RebootRequired(tuple(f"package-{n}" for n in range(200))).describe()
    assert len(text) == MAX_REASON
    assert text.endswith("...")


async def _next(changes: asyncio.Queue[RebootRequired | None], what: str) -> RebootRequired | None:
    try:
        return await asyncio.wait_for(changes.get(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"no inotify change within {TIMEOUT} s: {what}") from None


def test_the_watch_reports_creation_a_rename_into_place_the_list_and_removal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "reboot-required"

    async def scenario() -> list[RebootRequired | None]:
        changes: asyncio.Queue[RebootRequired | None] = asyncio.Queue()
        watch = RebootRequiredWatch(path, changes.put_nowait)
        seen = [watch.start()]
        try:
            (tmp_path / "unrelated").touch()  # another file of /run: no report
            path.touch()
            seen.append(await _next(changes, "the file created"))
            (tmp_path / "reboot-required.pkgs").write_text("kubernetes\n")
            seen.append(await _next(changes, "the package list written"))
            path.unlink()
            seen.append(await _next(changes, "the file removed"))
            (tmp_path / "staged").write_text("")
            os.rename(tmp_path / "staged", path)
            seen.append(await _next(changes, "the file renamed into place"))
            assert changes.empty()
        finally:
            watch.close()
        return seen

    assert asyncio.run(scenario()) == [
        None,
        RebootRequired(),
        RebootRequired(("kubernetes",)),
        None,
        RebootRequired(("kubernetes",)),
    ]


def start_and_close(path: Path) -> RebootRequired | None:
    """What ``start()`` of a watch of ``path`` reports (on an event loop of its own)."""

    async def scenario() -> RebootRequired | None:
        watch = RebootRequiredWatch(path, lambda _: None)
        try:
            return watch.start()
        finally:
            watch.close()

    return asyncio.run(scenario())


def test_a_file_there_before_the_start_is_reported_by_start(tmp_path: Path) -> None:
    path = tmp_path / "reboot-required"
    path.touch()
    assert start_and_close(path) == RebootRequired()


def test_a_missing_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "reboot-required"

    async def scenario() -> None:
        RebootRequiredWatch(path, lambda _: None).start()

    with pytest.raises(CluoError, match=r"no-such-dir.*does not exist"):
        asyncio.run(scenario())


def test_starting_the_watch_runs_no_program(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's start-up forks nothing: the C library is the one already loaded (a
    lookup by name, ctypes.util.find_library, would run ``ldconfig -p``)."""

    def no_program(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a program was run: {args}")

    monkeypatch.setattr("subprocess.Popen.__init__", no_program)
    assert start_and_close(tmp_path / "reboot-required") is None
