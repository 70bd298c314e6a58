"""The malloc tuning used by train / predict / cluster: applied on glibc, and opt-out-able."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CALL = "from hitanno_cli.host import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("HITANNO_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["HITANNO_KEEP_FREED_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", CALL], capture_output=True, text=True, check=True, env=env).stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_once_and_can_be_turned_off() -> None:
    assert _run(None).split() == ["True", "True"]  # applied, and a second call is a no-op success
    assert _run("0").split() == ["False", "False"]
