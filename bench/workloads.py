"""The benchmark workloads W0-W4 against a broker, next to the raw floor in the same run.

W0 start → first task (median of 3 cold starts of ``stem worker start``, the task
enqueued before the process is spawned) and the idle worker's RSS; W1 enqueue N
one-by-one and with enqueue_many; W2 drain an N-task backlog with one worker process;
W3 enqueue→start latency on an idle worker (300 sequential trips); W4 2,000 tasks of
``asyncio.sleep(0.05)`` at concurrency 200 (ideal ≈ 0.5 s).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

import stem
from bench import bench_app
from stem.signing import SigningConfig

PEERS = {  # the peers' published figures: best peer per figure on this kind of machine
    "redis": {"drain": 3436, "enqueue_one": 8986, "enqueue_bulk": 9261, "p50": 0.25, "p99": 0.73},
    "postgres": {"drain": 894, "enqueue_one": 1403, "enqueue_bulk": 21634, "p50": 2.85,
                 "p99": 7.03},
}
#: arq's start → first task and idle RSS: the best peer for W0 whatever the broker.
W0_PEER = {"start_ms": 131.0, "idle_rss_mib": 31.0}


@dataclass
class Figures:
    """What one run measured."""

    values: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _kind(url: str) -> str:
    scheme = url.split(":", 1)[0]
    return {"postgresql": "postgres", "rediss": "redis"}.get(scheme, scheme)


def is_local(url: str) -> bool:
    """True for a URL whose server is on this machine (loopback or a Unix socket)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite" or parts.scheme == "memory":
        return True
    hosts = [parts.hostname or ""]
    query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
    if "host" in query:
        hosts = [query["host"]]
    return all(h in ("", "localhost", "127.0.0.1", "::1") or h.startswith("/") for h in hosts)


def run_floor(kind: str, url: str, floor_dir: Path, n: int) -> dict[str, float]:
    """Run the floor script floor_<kind>.py of ``floor_dir`` against the same server and
    database (it keeps to keys under a random prefix and deletes them); parse its line."""
    script = floor_dir / f"floor_{kind}.py"
    if not script.exists():
        return {}
    env = {**os.environ, "N": str(n)}
    if kind == "redis":
        env["URL"] = url.split("?", 1)[0]
    else:
        env["DSN"] = url.split("?", 1)[0]
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=600)
    nums = {k: float(v.replace(",", "")) for k, v in re.findall(
        r"(pipelined|one-by-one|drain[^0-9]*|COPY|executemany) ([\d,]+)/s", out.stdout)}
    res: dict[str, float] = {}
    for k, v in nums.items():
        if k.startswith("drain"):
            res["drain"] = v
        elif k in ("pipelined", "executemany"):
            res["enqueue_bulk"] = v
        elif k == "one-by-one":
            res["enqueue_one"] = v
        elif k == "COPY":
            res["copy"] = v
    return res


_W3_FLOOR_CONSUMER = """
import asyncio, sys, time
import redis.asyncio as redis

async def main():
    r = redis.from_url(sys.argv[1])
    key = sys.argv[2]
    while True:
        resp = await r.xreadgroup("g", "c", {key: ">"}, count=10, block=1000)
        if not resp:
            continue
        now = time.time()
        p = r.pipeline(transaction=False)
        p.rpush(key + ":done", repr(now))
        p.xack(key, "g", *[m for m, _ in resp[0][1]])
        await p.execute()

asyncio.run(main())
"""


async def w3_floor_redis(url: str, trips: int = 300) -> dict[str, float]:
    """W3 with no framework: XADD, and a blocked XREADGROUP consumer in another process
    notes when it got the entry; the least enqueue → start latency this machine allows."""
    import redis.asyncio as redis

    r = redis.from_url(url)
    key = f"stem-w3-floor-{uuid.uuid4().hex[:8]}"  # only keys of our own
    await r.xgroup_create(key, "g", id="0", mkstream=True)
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child we kill, never wait on
        [sys.executable, "-c", _W3_FLOOR_CONSUMER, url, key])
    try:
        await r.xadd(key, {"p": b"warm-up"})
        await r.blpop([key + ":done"], timeout=30)
        lat: list[float] = []
        for _ in range(trips):
            t0 = time.time()
            await r.xadd(key, {"p": b'{"id":"x"}'})
            got = await r.blpop([key + ":done"], timeout=10)
            if got:
                lat.append((float(got[1]) - t0) * 1000)
    finally:
        proc.kill()
        await r.delete(key, key + ":done")
        await r.aclose()
    lat.sort()
    return {"p50": statistics.median(lat), "p95": lat[int(0.95 * len(lat)) - 1],
            "p99": lat[int(0.99 * len(lat)) - 1], "max": lat[-1]}


class Bench:
    """One benchmark run against ``url`` (broker and result backend on the same store)."""

    def __init__(self, url: str, *, n: int, redis_counter_url: str | None,
                 concurrency: int = 100, signing: str = "none") -> None:
        self.url = url
        self.n = n
        self.namespace = "bench" + uuid.uuid4().hex[:8]
        self.redis_counter_url = redis_counter_url
        self.concurrency = concurrency
        # The producer signs with the whole config; the worker gets what a worker needs
        # (Ed25519: the public key alone).
        producer_env, self.worker_env = signing_env(signing)
        self.app = stem.Stem("bench-producer", broker=url, backend=url, namespace=self.namespace,
                             signing=SigningConfig.from_env(producer_env))
        for d in bench_app.app.tasks.values():
            self.app.register(stem.TaskDefinition(d.name, d.func, options=d.options))

    async def cleanup(self) -> None:
        """Delete what this run wrote: its namespace's keys and the INCR counter (Redis);
        on Postgres the queue was purged and the tables are the schema's own."""
        import redis.asyncio as redis

        targets = [u for u in (self.url if _kind(self.url) == "redis" else None,
                               self.redis_counter_url) if u]
        for url in dict.fromkeys(targets):
            r = redis.from_url(url.split("?", 1)[0])
            try:
                for pattern in (f"{self.namespace}:*", f"{{{self.namespace}:*"):
                    batch = [k async for k in r.scan_iter(match=pattern, count=1000)]
                    for s in range(0, len(batch), 500):
                        await r.delete(*batch[s:s + 500])
            finally:
                await r.aclose()

    def _worker(self, concurrency: int, *, counter: bool = True,
                runtime: Runtime | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "STEM_BROKER_URL": self.url, "STEM_NAMESPACE": self.namespace,
               "BENCH_COUNTER": f"{self.namespace}:counter",
               "BENCH_POOL": str(max(concurrency, 32)), **self.worker_env}
        env.pop("STEM_RESULT_BACKEND_URL", None)
        env.pop("BENCH_REDIS_URL", None)
        if self.redis_counter_url and counter:
            env["BENCH_REDIS_URL"] = self.redis_counter_url
        python = sys.executable
        if runtime is not None:
            python = runtime.python
            env["PYTHONPATH"] = runtime.path
        return subprocess.Popen(
            [python, "-m", "stem_cli", "worker", "start", "--app",
             "bench.bench_app:app", "-c", str(concurrency), "--log-level", "WARNING",
             "--block-time", "1"], env=env)

    @staticmethod
    def _rss_mib(pid: int) -> float:
        """The process's resident set (``VmRSS`` of ``/proc/<pid>/status``) in MiB."""
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    async def _drained(self, ids: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = await self.app.broker.stats("default")
            if stats.pending == 0 and stats.in_flight == 0 and stats.delayed == 0:
                break
            await asyncio.sleep(0.2)
        out: dict[str, Any] = {}
        for s in range(0, len(ids), 1000):
            got = await self.app.backend.get_many(ids[s:s + 1000])
            out.update({k: v.payload for k, v in got.items() if v.state.value == "succeeded"})
        return out

    async def w0(self, fig: Figures, starts: int = 3, *, runtime: Runtime | None = None,
                 suffix: str = "", label: str = "") -> None:
        """Start → first task: a ``bench.start`` task waits in the queue before the worker
        process is spawned; the clock runs from just before the spawn to the time the
        handler started (its return value). Median of ``starts`` cold starts. Then the
        idle RSS of the last worker, once it ran that task and sat idle for a second.
        ``runtime``: the Python (and path) that runs the worker, else this one."""
        if runtime is None:
            _compile_bytecode()
        definition = self.app.definition("bench.start")
        times: list[float] = []
        rss: list[float] = []
        for _ in range(starts):
            tid = await definition.enqueue()
            t0 = time.time()
            # No INCR: a Redis client in a Postgres worker would count in its RSS.
            proc = self._worker(self.concurrency, counter=False, runtime=runtime)
            try:
                res = await self.app.wait(tid, timeout=60)
                times.append((float(cast(float, res.value)) - t0) * 1000)
                await asyncio.sleep(1.0)
                rss.append(self._rss_mib(proc.pid))
            finally:
                self._stop(proc)
        fig.values["start_ms" + suffix] = statistics.median(times)
        fig.values["idle_rss_mib" + suffix] = statistics.median(rss)
        fig.notes.append(f"W0{label} starts ms: " + ", ".join(f"{t:.0f}" for t in times)
                         + "; idle RSS MiB: " + ", ".join(f"{r:.1f}" for r in rss))

    async def w1(self, fig: Figures) -> None:
        call = self.app.definition("bench.noop").call()
        n1 = min(self.n, 5000)
        t = time.perf_counter()
        for _ in range(n1):
            await self.app.enqueue_call(call)
        fig.values["enqueue_one"] = n1 / (time.perf_counter() - t)
        calls = [call] * self.n
        t = time.perf_counter()
        for s in range(0, self.n, 500):
            await self.app.enqueue_many(calls[s:s + 500])
        fig.values["enqueue_bulk"] = self.n / (time.perf_counter() - t)
        await self.app.broker.purge("default")

    async def w2(self, fig: Figures, *, incr: bool = False) -> None:
        """Drain a backlog; ``incr`` adds the per-task Redis INCR the peer figures carry."""
        call = self.app.definition("bench.noop").call(incr=incr)
        ids: list[str] = []
        for s in range(0, self.n, 1000):
            ids += await self.app.enqueue_many([call] * min(1000, self.n - s))
        proc = self._worker(self.concurrency)
        try:
            done = await self._drained(ids, timeout=300)
        finally:
            self._stop(proc)
        if len(done) < len(ids):
            fig.notes.append(f"W2: only {len(done)}/{len(ids)} finished")
        ts = sorted(float(v) for v in done.values())
        key = "drain_incr" if incr else "drain"
        fig.values[key] = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0

    async def w3(self, fig: Figures, trips: int = 300) -> None:
        proc = self._worker(self.concurrency)
        try:
            definition = self.app.definition("bench.start")
            await self.app.wait(await definition.enqueue(), timeout=60)  # worker is up
            lat: list[float] = []
            for _ in range(trips):
                t0 = time.time()
                tid = await definition.enqueue()
                res = await self.app.wait(tid, timeout=30)
                lat.append((float(res.value) - t0) * 1000)
        finally:
            self._stop(proc)
        lat.sort()
        fig.values["p50"] = statistics.median(lat)
        fig.values["p95"] = lat[int(0.95 * len(lat)) - 1]
        fig.values["p99"] = lat[int(0.99 * len(lat)) - 1]
        fig.values["max"] = lat[-1]

    async def w4(self, fig: Figures, n: int = 2000) -> None:
        call = self.app.definition("bench.sleep").call(seconds=0.05)
        ids = await self.app.enqueue_many([call] * n)
        proc = self._worker(200)
        try:
            done = await self._drained(ids, timeout=120)
        finally:
            self._stop(proc)
        spans = list(done.values())
        fig.values["w4_seconds"] = max(e for _, e in spans) - min(s for s, _ in spans)


@dataclass(frozen=True)
class Runtime:
    """A Python and the PYTHONPATH its worker processes get."""

    python: str
    path: str


#: Stem's extras a W0 worker is installed with (one broker each; both here).
_W0_EXTRAS = ("redis", "postgres")
_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?")


def _runtime_requirements() -> list[str]:
    """``stem-tasks[redis,postgres]``'s requirements, pinned to the versions installed
    here (so both W0 figures run the same libraries)."""
    from importlib.metadata import requires, version

    out: list[str] = []
    for req in requires("stem-tasks") or []:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
        if extra is not None and extra.group(1) not in _W0_EXTRAS:
            continue
        m = _REQ.match(spec)
        if m is None:
            continue
        out.append(f"{m.group(1)}{m.group(2) or ''}=={version(m.group(1))}")
    return sorted(set(out))


def installed_runtime(root: Path = Path(".stem")) -> Runtime | str:
    """A Python that runs this checkout's Stem as ``pip install
    'stem-tasks[redis,postgres]'`` would, or why there is none.

    The development venv is not what a deployment runs: Stem is an editable install
    there (an import hook in every start-up) and the test extras are installed, among
    them the OpenTelemetry SDK, which redis-py imports whenever it is present (about
    35 ms and 3.5 MiB of a Redis worker's start). So W0 is measured in a venv with only
    Stem's runtime dependencies (made once under ``.stem/bench-venv`` by pip, from its
    cache or the index) and a fresh copy of this checkout's ``stem`` and ``stem_cli``
    (as a wheel installs them), and again in the development venv.
    """
    import compileall
    import shutil

    venv = root / "bench-venv"
    python = venv / "bin" / "python"
    reqs = "\n".join(_runtime_requirements()) + "\n"
    stamp = venv / "stem-bench-requirements.txt"
    try:
        if not (python.exists() and stamp.exists() and stamp.read_text() == reqs):
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=300)
            (venv / "requirements.txt").write_text(reqs)
            subprocess.run([str(python), "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", "-r", str(venv / "requirements.txt")],
                           check=True, capture_output=True, timeout=600)
            stamp.write_text(reqs)
        src = root / "bench-src"
        shutil.rmtree(src, ignore_errors=True)
        repo = Path(stem.__file__).resolve().parent.parent
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(repo / "stem", src / "stem", ignore=skip)
        shutil.copytree(repo / "cli", src / "stem_cli", ignore=skip)
        subprocess.run([str(python), "-c",
                        "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=1)",
                        str(src)], check=True, capture_output=True, timeout=300)
        compileall.compile_dir(Path(bench_app.__file__).parent, quiet=1)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"no installed-like venv ({exc}; {detail.decode(errors='replace')[-200:]})"
    return Runtime(str(python.absolute()),
                   os.pathsep.join([str(src.absolute()), str(repo)]))


def _compile_bytecode() -> None:
    """Write the bytecode of Stem, its CLI and the bench app, as an installed package has
    it: a checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (the image sets it) would
    otherwise compile them from source at every start and W0 would time the compiler."""
    import compileall
    from importlib.util import find_spec

    cli = find_spec("stem_cli")
    files = [stem.__file__, bench_app.__file__, cli.origin if cli else None]
    for file in filter(None, files):
        compileall.compile_dir(Path(file).parent, quiet=1)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.0%}" if a and b else "-"


def report(kind: str, fig: Figures, console: Console) -> None:
    """Print our figures next to the floor and the best peer."""
    peer = PEERS.get(kind, {})
    t = Table("figure", "stem", "floor (same run)", "stem / floor", "best peer", "stem / peer",
              title=f"make bench — {kind}")
    for label, key, fmt in (("W0 start → first task ms", "start_ms", "{:.0f}"),
                            ("W0 idle RSS MiB", "idle_rss_mib", "{:.1f}"),
                            ("W0 start ms, this dev venv", "start_ms_dev", "{:.0f}"),
                            ("W0 idle RSS MiB, this dev venv", "idle_rss_mib_dev", "{:.1f}")):
        w0 = fig.values.get(key)
        if w0 is None and key.endswith("_dev"):
            continue
        arq = W0_PEER[key.removesuffix("_dev")]
        t.add_row(label, fmt.format(w0) if w0 else "-", "-", "-", f"{arq:.0f} (arq)",
                  f"{w0 / arq:.1f}x" if w0 else "-")
    rows = [("W1 enqueue one-by-one /s", "enqueue_one"), ("W1 enqueue_many /s", "enqueue_bulk"),
            ("W2 drain no-op /s (vs floor)", "drain"),
            ("W2 drain +INCR /s (vs peers)", "drain_incr")]
    for label, key in rows:
        v = fig.values.get(key)
        # The floor does no INCR and the peers all did one per task: compare like with like.
        f = fig.floor.get(key) if key != "drain_incr" else None
        p = peer.get("drain" if key == "drain_incr" else key) if key != "drain" else None
        t.add_row(label, f"{v:,.0f}" if v else "-", f"{f:,.0f}" if f else "-", _ratio(v, f),
                  f"{p:,.0f}" if p else "-", f"{v / p:.1f}x" if v and p else "-")
    for key in ("p50", "p95", "p99", "max"):
        v = fig.values.get(key)
        f = fig.floor.get(f"w3_{key}")
        p = peer.get(key)
        t.add_row(f"W3 latency {key} ms", f"{v:.2f}" if v is not None else "-",
                  f"{f:.2f}" if f is not None else "-",
                  f"{v / f:.1f}x floor" if v is not None and f else "-",
                  f"{p}" if p else "-", "-")
    w4 = fig.values.get("w4_seconds")
    t.add_row("W4 2000x sleep(0.05) @200 s", f"{w4:.3f}" if w4 else "-", "ideal 0.500",
              f"{w4 / 0.5 - 1:+.0%} vs ideal" if w4 else "-", "-", "-")
    console.print(t)
    for note in fig.notes:
        console.print(f"[yellow]{note}[/yellow]")


def signing_env(kind: str) -> tuple[dict[str, str], dict[str, str]]:
    """Fresh random keys as ``STEM_SIGNING_*`` for the producer and for the worker."""
    if kind == "none":
        return {}, {}
    if kind == "hmac":
        env = {"STEM_SIGNING_ALGORITHM": "hmac-sha256", "STEM_SIGNING_ACTIVE_KEY": "b1",
               "STEM_SIGNING_KEYS": "b1:" + base64.b64encode(os.urandom(32)).decode()}
        return env, env
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = os.urandom(32)
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    worker = {"STEM_SIGNING_ALGORITHM": "ed25519",
              "STEM_SIGNING_PUBLIC_KEYS": "b1:" + base64.b64encode(public).decode()}
    producer = {**worker, "STEM_SIGNING_ACTIVE_KEY": "b1",
                "STEM_SIGNING_PRIVATE_KEYS": "b1:" + base64.b64encode(seed).decode()}
    return producer, worker


async def run(url: str, *, n: int, workloads: set[str], floor_dir: Path | None,
              redis_counter_url: str | None, concurrency: int,
              signing: str = "none") -> Figures:
    """Run the selected workloads (and the floor) and return the figures."""
    fig = Figures()
    kind = _kind(url)
    if floor_dir is not None and kind in ("redis", "postgres"):
        fig.floor = run_floor(kind, url, floor_dir, max(n, 20000))
    bench = Bench(url, n=n, redis_counter_url=redis_counter_url, concurrency=concurrency,
                  signing=signing)
    try:
        await bench.app.broker.purge("default")
        if "W0" in workloads:
            runtime = installed_runtime()
            if isinstance(runtime, Runtime):
                await bench.w0(fig, runtime=runtime, label=" (installed)")
                await bench.w0(fig, suffix="_dev", label=" (dev venv)")
            else:
                fig.notes.append(f"W0 in this dev venv: {runtime}")
                await bench.w0(fig)
        if "W1" in workloads:
            await bench.w1(fig)
        if "W2" in workloads:
            await bench.w2(fig)
            if redis_counter_url:
                await bench.w2(fig, incr=True)
        if "W3" in workloads:
            await bench.w3(fig)
            if kind == "redis" and floor_dir is not None:
                floor = await w3_floor_redis(url.split("?", 1)[0])
                fig.floor.update({f"w3_{k}": v for k, v in floor.items()})
        if "W4" in workloads:
            await bench.w4(fig)
    finally:
        await bench.app.broker.purge("default")
        await bench.app.close()
        await bench.cleanup()
    return fig
