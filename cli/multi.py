"""Daemon tooling: ``stem worker multi start|stop|restart|status`` and
``stem worker healthcheck``.

``multi`` runs N named worker nodes in the background, each with a pid file and a log
file (``--dir``, or ``--pidfile``/``--logfile`` templates with ``%n`` for the node name,
``%h`` the host name, ``%I`` its 1-based index and ``%d`` a UTC timestamp), as
``celery multi`` does. The command a node runs is ``stem worker start --app APP
[--queue ...] [--worker-args ...]``, or ``--command-line``, or ``STEM_WORKER_COMMAND``.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from stem_cli._app import between, error_line, fail

multi_app = typer.Typer(help="Run several named worker nodes in the background (pid files, "
                             "log files): start, stop, restart, status.", no_args_is_help=True)

#: Exit codes: ``status`` when a node is not running (as LSB init scripts), and
#: ``healthcheck`` (sysexits: 64 usage, 70 software error), as the Dart Stem.
EXIT_NOT_RUNNING = 3
EXIT_USAGE = 64
EXIT_UNHEALTHY = 70
#: A node that exits within this many seconds of ``start`` is reported as failed.
START_CHECK = 0.5

NodesArg = Annotated[list[str] | None, typer.Argument(
    metavar="[NODE]...", help="Node names, or one number N for nodes worker1..workerN "
                              "(default: STEMD_NODES or STEM_WORKER_NODES, else 'worker1').")]
DirOpt = Annotated[Path, typer.Option("--dir", help="Directory of the pid and log files "
                                      "(created if missing).")]
PidOpt = Annotated[str | None, typer.Option(
    "--pidfile", help="Pid file template (default: DIR/%n.pid).")]
LogOpt = Annotated[str | None, typer.Option(
    "--logfile", help="Log file template (default: DIR/%n.log).")]
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", callback=between(0, 86_400, " seconds"),
    help="Seconds `stop` waits after SIGTERM before SIGKILL.")]


def node_names(nodes: list[str] | None) -> list[str]:
    """The nodes asked for: names, or ``N`` for worker1..workerN; else the environment."""
    if not nodes:
        env = os.environ.get("STEMD_NODES") or os.environ.get("STEM_WORKER_NODES") or ""
        nodes = env.split() or ["worker1"]
    if len(nodes) == 1 and nodes[0].isdigit():
        n = int(nodes[0])
        if not 1 <= n <= 1000:
            raise fail(f"{n} nodes: give 1..1000")
        return [f"worker{i}" for i in range(1, n + 1)]
    for name in nodes:
        if not name or "/" in name or name.startswith((".", "-")):
            raise fail(f"node name {name!r}: not empty, no '/', not starting with '.' or '-'")
    return list(dict.fromkeys(nodes))


def expand(template: str, node: str, index: int) -> Path:
    """``%n`` node, ``%h`` host name, ``%I`` 1-based index, ``%d`` UTC timestamp, ``%%``."""
    stamp = datetime.now(UTC).isoformat().replace(":", "-").replace(".", "-")
    out, i = [], 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            key = template[i + 1]
            out.append({"n": node, "h": socket.gethostname(), "I": str(index), "d": stamp,
                        "%": "%"}.get(key, "%" + key))
            i += 2
        else:
            out.append(c)
            i += 1
    return Path("".join(out))


def _files(directory: Path, pidfile: str | None, logfile: str | None, node: str, index: int
           ) -> tuple[Path, Path]:
    return (expand(pidfile or str(directory / "%n.pid"), node, index),
            expand(logfile or str(directory / "%n.log"), node, index))


def read_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile``; None when missing, unreadable or not a positive number."""
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def node_health(pidfile: Path, node: str | None = None, logfile: Path | None = None
                ) -> dict[str, Any]:
    """The healthcheck's report: ``status`` ok or error, node, pidfile, logfile, pid,
    since (the pid file's change time), uptimeSeconds, error (pidfile-missing,
    invalid-pid or process-not-running)."""
    report: dict[str, Any] = {"status": "error", "node": node or pidfile.name.split(".")[0],
                              "pidfile": str(pidfile)}
    if logfile is not None:
        report["logfile"] = str(logfile)
    try:
        since = pidfile.stat().st_ctime
    except OSError:
        report["error"] = "pidfile-missing"
        return report
    report["since"] = datetime.fromtimestamp(since, UTC).isoformat()
    pid = read_pid(pidfile)
    if pid is None:
        report["error"] = "invalid-pid"
        return report
    report["pid"] = pid
    if not alive(pid):
        report["error"] = "process-not-running"
        return report
    report.update(status="ok", uptimeSeconds=round(max(0.0, time.time() - since), 3))
    return report


def _command(app_spec: str | None, command_line: str | None, queues: list[str] | None,
             extra: list[str]) -> list[str]:
    if app_spec and command_line:
        raise fail("give --app or --command-line, not both")
    if app_spec:
        cmd = [sys.executable, "-m", "stem_cli", "worker", "start", "--app", app_spec]
    else:
        line = (command_line or os.environ.get("STEM_WORKER_COMMAND")
                or os.environ.get("STEMD_COMMAND"))
        if not line:
            raise fail("no worker command: give --app, --command-line or STEM_WORKER_COMMAND",
                       EXIT_USAGE)
        cmd = shlex.split(line)
    for q in queues or []:
        cmd += ["--queue", q]
    return cmd + extra


def _env_file(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    env: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise fail(f"--env-file {path}: {exc.strerror or exc}") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


WorkerArgsOpt = Annotated[str | None, typer.Option(
    "--worker-args", help="More arguments for each node's command, as one string, e.g. "
                          "'--concurrency 4 --block-time 0.5'.")]


@multi_app.command("start")
def multi_start(
    nodes: NodesArg = None,
    app_spec: Annotated[str | None, typer.Option("--app", "-A", help="Run `stem worker start "
                        "--app APP` (arguments after `--` are added).")] = None,
    command_line: Annotated[str | None, typer.Option(
        "--command-line", help="The command each node runs, as one string (default: "
                               "STEM_WORKER_COMMAND).")] = None,
    queue: Annotated[list[str] | None, typer.Option("--queue", "-Q", help="Queue for every "
                     "node (repeatable; added as --queue to the command).")] = None,
    directory: DirOpt = Path(".stem/multi"),
    pidfile: PidOpt = None,
    logfile: LogOpt = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Run nodes in this "
                       "directory (default: the current one).")] = None,
    env_file: Annotated[Path | None, typer.Option("--env-file", help="KEY=VALUE lines added "
                        "to each node's environment.")] = None,
    worker_args: WorkerArgsOpt = None,
    detach: Annotated[bool, typer.Option("--detach/--no-detach", help="--no-detach runs one "
                      "node in the foreground (for systemd): the pid file holds this "
                      "process, which becomes the worker.")] = True,
) -> None:
    """Start nodes in the background; each gets a pid file and a log file.

    A node whose pid file names a live process is left alone. Each node's environment
    has ``STEM_WORKER_NODE``, ``STEM_WORKER_INDEX``, ``STEM_WORKER_PIDFILE`` and
    ``STEM_WORKER_LOGFILE``.
    """
    names = node_names(nodes)
    cmd = _command(app_spec, command_line, queue, shlex.split(worker_args or ""))
    extra_env = _env_file(env_file)
    if not detach and len(names) != 1:
        raise fail("--no-detach runs one node in the foreground; name exactly one")
    failed = 0
    for index, node in enumerate(names, 1):
        pid_path, log_path = _files(directory, pidfile, logfile, node, index)
        old = read_pid(pid_path)
        if old is not None and alive(old):
            typer.echo(f"{node}: already running (pid {old}).")
            continue
        for p in (pid_path, log_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **extra_env, "STEM_WORKER_NODE": node,
               "STEM_WORKER_INDEX": str(index), "STEM_WORKER_PIDFILE": str(pid_path.resolve()),
               "STEM_WORKER_LOGFILE": str(log_path.resolve()),
               "STEM_WORKER_HOST": socket.gethostname()}
        if queue:
            env["STEM_WORKER_QUEUES"] = ",".join(queue)
        if not detach:
            pid_path.write_text(f"{os.getpid()}\n")
            if workdir is not None:
                os.chdir(workdir)
            sys.stdout.flush()
            os.execvpe(cmd[0], cmd, env)
        with open(log_path, "ab") as log:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                        start_new_session=True)
            except OSError as exc:
                error_line(f"{node}: cannot run {cmd[0]!r}: {exc.strerror or exc}")
                failed += 1
                continue
        pid_path.write_text(f"{proc.pid}\n")
        try:
            code = proc.wait(START_CHECK)
        except subprocess.TimeoutExpired:
            typer.echo(f"{node}: started (pid {proc.pid}), log {log_path}")
            continue
        pid_path.unlink(missing_ok=True)
        error_line(f"{node}: exited at once with status {code}; see {log_path}")
        failed += 1
    if failed:
        raise typer.Exit(1)


def _stop(names: list[str], directory: Path, pidfile: str | None, timeout: float) -> None:
    pids: dict[str, tuple[int, Path]] = {}
    for index, node in enumerate(names, 1):
        pid_path, _ = _files(directory, pidfile, None, node, index)
        pid = read_pid(pid_path)
        if pid is None or not alive(pid):
            pid_path.unlink(missing_ok=True)
            typer.echo(f"{node}: not running.")
            continue
        os.kill(pid, signal.SIGTERM)
        pids[node] = (pid, pid_path)
    deadline = time.monotonic() + timeout
    while pids:
        for node, (pid, pid_path) in list(pids.items()):
            if not alive(pid):
                pid_path.unlink(missing_ok=True)
                typer.echo(f"{node}: stopped (pid {pid}).")
                del pids[node]
        if pids and time.monotonic() >= deadline:
            for node, (pid, pid_path) in pids.items():
                typer.echo(f"{node}: did not exit within {timeout:g}s; sending SIGKILL.")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid_path.unlink(missing_ok=True)
            return
        time.sleep(0.05)


@multi_app.command("stop")
def multi_stop(nodes: NodesArg = None, directory: DirOpt = Path(".stem/multi"),
               pidfile: PidOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """SIGTERM each node (a graceful drain), wait up to --timeout, then SIGKILL."""
    _stop(node_names(nodes), directory, pidfile, timeout)


@multi_app.command("restart")
def multi_restart(
    nodes: NodesArg = None,
    app_spec: Annotated[str | None, typer.Option("--app", "-A")] = None,
    command_line: Annotated[str | None, typer.Option("--command-line")] = None,
    queue: Annotated[list[str] | None, typer.Option("--queue", "-Q")] = None,
    directory: DirOpt = Path(".stem/multi"),
    pidfile: PidOpt = None,
    logfile: LogOpt = None,
    workdir: Annotated[Path | None, typer.Option("--workdir")] = None,
    env_file: Annotated[Path | None, typer.Option("--env-file")] = None,
    worker_args: WorkerArgsOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Stop, then start (the same options as start)."""
    _stop(node_names(nodes), directory, pidfile, timeout)
    multi_start(nodes, app_spec, command_line, queue, directory, pidfile, logfile,
                workdir, env_file, worker_args, True)


@multi_app.command("status")
def multi_status(nodes: NodesArg = None, directory: DirOpt = Path(".stem/multi"),
                 pidfile: PidOpt = None,
                 json_out: Annotated[bool, typer.Option("--json", help="One JSON object "
                                     "per node (the healthcheck's).")] = False) -> None:
    """``<node>: running (pid N).`` per node; exit 3 when any is not running (a stale pid
    file is removed)."""
    down = 0
    for index, node in enumerate(node_names(nodes), 1):
        pid_path, _ = _files(directory, pidfile, None, node, index)
        report = node_health(pid_path, node)
        if report["status"] != "ok":
            down += 1
            if report["error"] != "pidfile-missing":
                pid_path.unlink(missing_ok=True)
        if json_out:
            typer.echo(orjson.dumps(report).decode())
        elif report["status"] == "ok":
            typer.echo(f"{node}: running (pid {report['pid']}).")
        elif report["error"] == "pidfile-missing":
            typer.echo(f"{node}: not running (no PID file).")
        else:
            typer.echo(f"{node}: not running (stale pid {report.get('pid', '?')}).")
    if down:
        raise typer.Exit(EXIT_NOT_RUNNING)


def healthcheck_command(
    pidfile: Annotated[Path | None, typer.Option("--pidfile", help="The node's pid file "
                       "(required).")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Name to report (default: the "
                    "pid file's name up to its first '.').")] = None,
    logfile: Annotated[Path | None, typer.Option("--logfile", help="Log file to report.")
                       ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit "
                     "status says it.")] = False,
) -> None:
    """Exit 0 when the process in --pidfile runs, 70 when not (64: no --pidfile).

    For a container HEALTHCHECK, systemd or a monitoring probe. ``--json``: status,
    node, pidfile, pid, since, uptimeSeconds and, when unhealthy, error
    (pidfile-missing, invalid-pid, process-not-running).
    """
    if pidfile is None:
        raise fail("--pidfile is required", EXIT_USAGE)
    report = node_health(pidfile, node, logfile)
    if json_out and not quiet:
        typer.echo(orjson.dumps(report).decode())
    elif not quiet:
        if report["status"] == "ok":
            typer.echo(f"{report['node']}: ok (pid {report['pid']}, up "
                       f"{report['uptimeSeconds']:.0f}s)")
        else:
            typer.echo(f"{report['node']}: {report['error']} ({pidfile})")
    if report["status"] != "ok":
        raise typer.Exit(EXIT_UNHEALTHY)
