"""compose/docker-compose.yml, the Dockerfile and the systemd units: every command they
run exists in the CLI (``... --help`` succeeds with the same options), and the compose
file is valid for ``docker compose config`` where Docker Compose exists."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def _help_ok(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv + ['--help']`` as the image would (``stem`` is ``python -m stem_cli``):
    options are parsed before --help prints, so an unknown option or subcommand fails."""
    if argv[0] == "stem" or argv[0].endswith("/stem"):
        argv = [sys.executable, "-m", "stem_cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})


def _services() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = doc["services"]
    return services


def test_compose_has_the_stack_and_its_own_image() -> None:
    services = _services()
    assert {"redis", "postgres", "worker", "beat", "producer"} <= set(services)
    ours = {name for name, s in services.items() if s.get("image") == "stem-tasks:dev"}
    assert {"worker", "beat", "producer", "schedules"} <= ours
    for name in ours:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
            ROOT / "Dockerfile")
        assert services[name]["environment"]["STEM_BROKER_URL"].startswith("redis://redis:")
    assert "--connect-timeout" in services["worker"]["command"]
    for volume in services["schedules"].get("volumes", []):
        assert (COMPOSE.parent / volume.split(":")[0]).exists(), volume


@pytest.mark.parametrize("service", sorted(
    n for n, s in yaml.safe_load(COMPOSE.read_text())["services"].items()
    if s.get("image") == "stem-tasks:dev"))
def test_every_compose_command_is_accepted_by_the_cli(service: str) -> None:
    command = _services()[service]["command"]
    assert isinstance(command, list) and command[0] in ("stem", "python")
    out = _help_ok(command)
    assert out.returncode == 0, f"{command}: {out.stdout}{out.stderr}"


def test_docker_compose_config_where_compose_exists() -> None:
    docker = shutil.which("docker")
    has_compose = docker is not None and subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=60).returncode == 0
    if not has_compose:
        # No Compose plugin on this machine: the YAML checks above stand in for it.
        doc = yaml.safe_load(COMPOSE.read_text())
        assert set(doc) <= {"name", "services", "volumes", "networks", "x-stem"}
        return
    assert docker is not None
    out = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_dockerfile_is_slim_non_root_and_health_checked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim\s*$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'HEALTHCHECK[^\n]*\\\n\s*CMD \["stem", "health"\]', text)
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(\S+(?: \S+)*) \S+$", text, re.M):
        for path in src.split():
            if not path.startswith("--from") and not path.startswith("/"):
                assert (ROOT / path).exists(), path


def test_image_healthcheck_command_reports_the_stores(tmp_path: Path) -> None:
    # What the image's HEALTHCHECK runs: exit 0 while the stores answer, 1 when not.
    env = {**os.environ, "STEM_BROKER_URL": f"sqlite:///{tmp_path / 'h.db'}"}
    for key in ("STEM_RESULT_BACKEND_URL", "STEM_REVOKE_STORE_URL", "STEM_RATE_LIMIT_URL"):
        env.pop(key, None)
    stem_cli = [sys.executable, "-m", "stem_cli", "health"]
    ok = subprocess.run(stem_cli, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env["STEM_BROKER_URL"] = "redis://127.0.0.1:1/0"
    down = subprocess.run(stem_cli, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 1, down.stdout + down.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_unit_commands_are_accepted_by_the_cli(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    service = parser["Service"]
    assert service["User"] != "root" and service["Type"] == "simple"
    start = service["ExecStart"].replace("%i", "worker1")
    # systemd puts ${VAR} in as one argument: stand in a plausible value
    argv = [re.sub(r"\$\{(\w+)\}", "x:app", word) for word in shlex.split(start)]
    out = _help_ok(argv)
    assert out.returncode == 0, f"{argv}: {out.stdout}{out.stderr}"
