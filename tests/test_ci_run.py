"""`.ci/run` and `constraints/tested.txt`: what CI installs, in which order, and that no failure passes as green.

`.ci/run` runs here with stand-ins for `python` and `pip` first on PATH. They record each call and exit with the
status a test asks for, so nothing is installed and the script's own logic is what is tested.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAND_IN = """#!/usr/bin/env bash
# Records the call; fails with FAKE_PIP_RC when a pip call mentions $FAKE_PIP_FAIL_ON, pytest exits FAKE_PYTEST_RC.
args="$*"
if [ "$(basename "$0")" = pip ]; then args="-m pip $args"; fi
case "$args" in
    "-m pip "*)
        echo "pip ${args#-m pip }" >> "$FAKE_LOG"
        if [ -n "${FAKE_PIP_FAIL_ON:-}" ] && [[ "$args" == *"$FAKE_PIP_FAIL_ON"* ]]; then exit 1; fi
        exit 0 ;;
    "-m pytest "*)
        echo "pytest HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-unset} ${args#-m pytest }" >> "$FAKE_LOG"
        exit "${FAKE_PYTEST_RC:-0}" ;;
esac
echo "unexpected call: $args" >> "$FAKE_LOG"
exit 99
"""


def run_ci(tmp_path: Path, *args: str, pytest_rc: int = 0, pip_fail_on: str = "") -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "pip"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_PYTEST_RC": str(pytest_rc),
        "FAKE_PIP_FAIL_ON": pip_fail_on,
    }
    env.pop("HF_HUB_OFFLINE", None)  # the script must set it itself
    completed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), *args], env=env, capture_output=True, text=True)
    return completed.returncode, log.read_text().splitlines()


@pytest.mark.parametrize("mode", [[], ["--tested"]], ids=["newest", "tested"])
def test_ci_installs_torch_first_then_the_project_then_runs_pytest_offline(tmp_path, mode):
    status, calls = run_ci(tmp_path, *mode)
    assert status == 0, calls
    pip_calls = [c for c in calls if c.startswith("pip ")]
    assert pip_calls[0].startswith("pip install") and "torch==2.13.0" in pip_calls[0]
    assert any('-e .[test]' in c for c in pip_calls)
    assert calls[-1].startswith("pytest HF_HUB_OFFLINE=1 tests")
    pinned = ["-c constraints/tested.txt" in c for c in pip_calls]
    # --tested pins every install to the constraints; the default resolves the newest releases.
    assert all(pinned) if mode else not any(pinned)


@pytest.mark.parametrize("mode", [[], ["--tested"]], ids=["newest", "tested"])
@pytest.mark.parametrize("pytest_rc", [1, 5])  # 5: pytest collected no tests
def test_ci_fails_when_pytest_fails_or_runs_no_test(tmp_path, mode, pytest_rc):
    status, calls = run_ci(tmp_path, *mode, pytest_rc=pytest_rc)
    assert status != 0
    assert calls[-1].startswith("pytest")


@pytest.mark.parametrize("mode", [[], ["--tested"]], ids=["newest", "tested"])
def test_ci_fails_and_skips_the_tests_when_the_install_fails(tmp_path, mode):
    status, calls = run_ci(tmp_path, *mode, pip_fail_on="[test]")
    assert status != 0
    assert not any(c.startswith("pytest") for c in calls)


def test_ci_rejects_unknown_arguments(tmp_path):
    status, calls = run_ci(tmp_path, "--newest")
    assert status == 2 and calls == []


def _requirements(text: str) -> dict[str, str]:
    """Name -> lower bound of `name>=version` lines."""
    bounds = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)>=([0-9][0-9.]*)\s*", line)
        if match:
            bounds[_canonical(match.group(1))] = match.group(2)
    return bounds


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_tested_constraints_pin_every_dependency_within_the_declared_bounds():
    from packaging.version import Version

    pins = {}
    for line in (ROOT / "constraints" / "tested.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
        pins[_canonical(name)] = version
    # torch without a local "+cpu" label: the plain pin is what installs from the package index.
    assert pins["torch"] == "2.13.0"
    assert "diffusers-unlearn" not in pins  # the project itself is installed from the checkout

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    declared = _requirements(config["options"]["install_requires"])
    for extra in ("bnb", "tracking", "test"):
        declared.update(_requirements(config["options.extras_require"][extra]))
    assert declared, "no bounds parsed from setup.cfg"
    for name, lower in declared.items():
        assert name in pins, f"{name} is declared in setup.cfg but not pinned in constraints/tested.txt"
        assert Version(pins[name]) >= Version(lower), f"{name}: tested {pins[name]} is below the bound {lower}"
