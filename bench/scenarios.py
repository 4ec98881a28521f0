"""The scenarios, as lists of cases, and the machinery that runs one case.

A streaming case starts the server under test, a publisher process and two subscriber
worker processes; subscribers connect and handshake (the last one, the latency probe,
connects after all the others so it is served last); the publisher streams; the harness
tells every subscriber how many records it must have received and collects what each got.
Every case reports loss (records expected but not received, sequence breaks, records of
instruments a subscriber did not ask for, sessions that failed) next to its figures.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench.peers import GatewayServer, NatsServer, PeerStatus, RedisServer, Server
from bench.procs import MachineCpu, cpu_seconds, rss_kib
from bench.publishers import PublishJob, PublishReport, publisher_main
from bench.records import FIRST_ID, INSTRUMENTS, REC_LEN, Schedule, delivered_frame_len
from bench.replay import ReplayBench, replay_plan
from bench.subscribers import (
    ConnResult,
    ConnSpec,
    ReadyReport,
    WorkerConfig,
    WorkerResult,
    worker_main,
)

__all__ = ["Case", "Harness", "Plan", "ZSTD_MODES", "ZstdMode", "build_cases", "make_plan"]

CTX: Final = mp.get_context("fork")
#: Peers that do not push back on their publisher (NATS, Redis, ZeroMQ) are paced on the
#: subscribers' progress: at most this many bytes in flight (published, not yet received)
#: across all subscribers and per subscriber, and never less than FLIGHT_MIN per subscriber.
#: The gateway (lossless ingest: it stops reading its publisher) and the raw sender
#: (blocking writes) bound their memory themselves and are not paced.
FLIGHT_BUDGET: Final = 1 << 30
FLIGHT_PER_SUB: Final = 64 << 20
FLIGHT_MIN: Final = 1 << 20
PACED_SYSTEMS: Final = frozenset({"nats", "redis", "zmq"})
PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
SUBS_PER_SESSION: Final = 10


@dataclass(frozen=True)
class Plan:
    quick: bool
    fanout_n: tuple[int, ...]
    filtered_n: tuple[int, ...]
    zstd_n: tuple[int, ...]
    latency_rates: tuple[int, ...]
    latency_n: tuple[int, ...]
    idle_sessions: int
    idle_window_s: float
    idle_heartbeat_s: int
    connect_sessions: int
    duration_s: float
    latency_duration_s: float
    #: subscriber worker processes per case (not the gateway's workers)
    workers: int = 2
    #: the ``workers`` scenario: fan-out sessions for CPU per record, filtered and
    #: zstd-distinct sessions for the scaling curve, and repeats of each (medians)
    scaling_fanout_n: int = 100
    scaling_filtered_n: int = 1000
    scaling_zstd_n: int = 1000
    scaling_repeats: int = 3
    #: zstd-distinct publishes this many records (0: for duration_s, as other cases): the
    #: same work at every worker count — a timed publisher fills the workers' shared ring
    #: (64 MiB by default) besides the sessions' buffers before lossless ingest pushes back,
    #: so N > 1 took in 12x the records of N = 1 in 2 s and its delivery outlasted the collect
    scaling_zstd_records: int = 50_000


def make_plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            quick=True,
            fanout_n=(1, 3),
            filtered_n=(3,),
            zstd_n=(2,),
            latency_rates=(10_000,),
            latency_n=(3,),
            idle_sessions=40,
            idle_window_s=0.5,
            idle_heartbeat_s=5,
            connect_sessions=30,
            duration_s=0.25,
            latency_duration_s=0.5,
            scaling_fanout_n=3,
            scaling_filtered_n=3,
            scaling_zstd_n=2,
            scaling_repeats=1,
            scaling_zstd_records=0,
        )
    return Plan(
        quick=False,
        fanout_n=(1, 10, 100, 1000),
        filtered_n=(10, 100, 1000),
        zstd_n=(1, 10, 100),
        latency_rates=(10_000, 50_000, 100_000),
        latency_n=(10, 100),
        idle_sessions=10_000,
        idle_window_s=6.0,
        idle_heartbeat_s=5,
        connect_sessions=1000,
        duration_s=2.0,
        latency_duration_s=3.0,
    )


@dataclass(frozen=True)
class ZstdMode:
    """One way of serving the zstd scenario's sessions.

    ``gateway_config`` goes into the gateway's config file: the per-session-stream
    baseline (``zstd-per-session``) is the entry that sets ``zstd_mode = "per_session"``.
    """

    name: str
    compression: bool
    #: every session on its own subscription, so nothing can be shared between sessions
    distinct: bool
    gateway_config: dict[str, str | int | float | bool] = field(default_factory=dict)
    description: str = ""
    #: the gateway runs this mode in a single process only (it refuses ``--workers N``)
    single_process: bool = False


ZSTD_MODES: Final[list[ZstdMode]] = [
    ZstdMode(
        "zstd-shared",
        True,
        False,
        description="zstd, every session on one subscription (frames shared)",
    ),
    ZstdMode(
        "zstd-distinct",
        True,
        True,
        description="zstd, every session on a different subscription (no sharing)",
    ),
    ZstdMode(
        "zstd-per-session",
        True,
        False,
        {"zstd_mode": "per_session"},
        description="zstd, one streaming compressor per session (the naive baseline)",
        single_process=True,
    ),
    ZstdMode("none-shared", False, False, description="uncompressed, one subscription"),
    ZstdMode(
        "none-distinct",
        False,
        True,
        description="uncompressed, a different subscription per session",
    ),
]


@dataclass
class Case:
    scenario: str
    system: str
    n: int
    params: dict[str, Any]
    run: Callable[[], dict[str, Any]]

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.params.items() if k != "description")
        return f"{self.scenario} {self.system} N={self.n} {extra}".strip()


# --- helpers ----------------------------------------------------------------------------


@dataclass
class _Child:
    proc: Any
    conn: Connection

    def recv(self, timeout: float, what: str) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        return self.conn.recv()

    def send(self, msg: Any) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            pass

    def stop(self) -> None:
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()  # only this child, by its PID
            self.proc.join(5)


def _zipf_subscriptions(n: int, seed: int = 5) -> list[tuple[int, ...]]:
    """Each session picks 10 of the 1,000 instruments, popular ones far more often."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(INSTRUMENTS)
    weights = 1.0 / np.arange(1, INSTRUMENTS + 1) ** 1.0
    weights /= weights.sum()
    p = np.empty(INSTRUMENTS)
    p[popularity] = weights
    return [
        tuple(
            sorted(
                int(x) + FIRST_ID
                for x in rng.choice(INSTRUMENTS, SUBS_PER_SESSION, replace=False, p=p)
            )
        )
        for _ in range(n)
    ]


def _percentiles(encoded: list[str]) -> dict[str, Any] | None:
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram(1, 600_000_000, 3)
    for e in encoded:
        if e:
            hist.decode_and_add(e.encode())
    if hist.get_total_count() == 0:
        return None
    out: dict[str, Any] = {f"p{p:g}": hist.get_value_at_percentile(p) for p in PERCENTILES}
    out["max"] = hist.get_max_value()
    out["mean"] = round(hist.get_mean_value(), 1)
    out["count"] = hist.get_total_count()
    cdf_points = np.unique(np.r_[np.linspace(0, 90, 19), 100 - np.logspace(1, -3, 25)])
    out["cdf"] = [[round(float(p), 4), hist.get_value_at_percentile(float(p))] for p in cdf_points]
    out["unit"] = "us"
    return out


class Harness:
    def __init__(
        self, outdir: Path, plan: Plan, peers: dict[str, PeerStatus], profile: bool = False
    ) -> None:
        self.outdir = outdir
        self.plan = plan
        self.peers = peers
        self.profile = profile
        self.workdir = outdir / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.schedule = Schedule()
        self.case_no = 0
        #: the gateway's worker processes for the case being run (``--workers``); peers
        #: never change with it
        self.gateway_workers = 1
        #: py-spy's sampling rate and output format for ``--profile``
        self.profile_rate = 200
        self.profile_format = "flamegraph"
        #: called once every case has run (e.g. removing a scenario's journal)
        self.cleanups: list[Callable[[], None]] = []

    def close(self) -> None:
        for cleanup in self.cleanups:
            cleanup()

    # --- servers ----------------------------------------------------------------------

    def start_server(self, system: str, gateway_config: dict[str, Any] | None = None) -> Server:
        if system == "gateway":
            return GatewayServer(
                self.workdir, extra_config=gateway_config, workers=self.gateway_workers
            ).start()
        if system == "nats":
            return NatsServer(self.workdir, self.peers["nats"].path).start()
        if system == "redis":
            return RedisServer(self.workdir, self.peers["redis"].path).start()
        return Server(system)

    @contextmanager
    def profiler(self, server: Server, label: str) -> Iterator[None]:
        """py-spy attached to the gateway for the case (``--profile``)."""
        if not self.profile or server.name != "gateway" or not server.pid:
            yield
            return
        import shutil
        import sys

        local = Path(sys.executable).parent / "py-spy"
        pyspy = shutil.which("py-spy") or str(local)
        name = "profile-" + "".join(ch if ch.isalnum() else "-" for ch in label)[:80]
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.profile_format]
        out = self.outdir / f"{name}.{ext}"
        proc = subprocess.Popen(
            pyspy_command(
                pyspy,
                server.pid,
                out,
                rate=self.profile_rate,
                fmt=self.profile_format,
                subprocesses=self.gateway_workers > 1,
            ),
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "py-spy.log", "ab"),
        )
        time.sleep(0.5)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # --- processes --------------------------------------------------------------------

    def start_publisher(self, job: PublishJob, progress: Any) -> tuple[_Child, int]:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=publisher_main, args=(child, job, progress), daemon=True)
        proc.start()
        child.close()
        pub = _Child(proc, parent)
        port = job.port
        while True:
            msg = pub.recv(60, "the publisher")
            if msg[0] == "listening":
                port = int(msg[1])
            elif msg[0] == "ready":
                return pub, port
            elif msg[0] == "done":
                raise RuntimeError(f"publisher failed: {msg[1].error}")

    def start_workers(self, cfg: WorkerConfig, progress: Any) -> list[_Child]:
        workers = []
        for _ in range(self.plan.workers):
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=worker_main, args=(child, cfg, progress), daemon=True)
            proc.start()
            child.close()
            workers.append(_Child(proc, parent))
        return workers

    @staticmethod
    def connect(
        workers: list[_Child], specs: list[ConnSpec], inflight: int, timeout: float = 120.0
    ) -> ReadyReport:
        """Connect ``specs`` spread over the workers, all at once; the merged report."""
        shares: list[list[ConnSpec]] = [[] for _ in workers]
        for i, spec in enumerate(specs):
            shares[i % len(workers)].append(spec)
        busy = []
        for w, share in zip(workers, shares, strict=True):
            if share:
                w.send(("connect", share, inflight, timeout))
                busy.append(w)
        report = ReadyReport()
        for w in busy:
            msg = w.recv(timeout + 30, "subscribers to connect")
            part: ReadyReport = msg[1]
            report.ready.update(part.ready)
            report.failed.update(part.failed)
        return report

    @staticmethod
    def check_ready(ready: ReadyReport, progress: Any) -> None:
        """Fail fast when nobody got streaming; publishers must not wait for the dead."""
        if not ready.ready:
            why = next(iter(ready.failed.values()), "no subscriber")
            raise RuntimeError(f"no subscriber got streaming: {why}")
        for index in ready.failed:
            progress[index] = 1 << 62

    @staticmethod
    def collect(
        workers: list[_Child], expected: dict[int, int], timeout: float
    ) -> list[WorkerResult]:
        for w in workers:
            w.send(("expect", expected, timeout))
        return [w.recv(timeout + 60, "subscriber results")[1] for w in workers]

    @staticmethod
    def worker_config(
        system: str, n: int, *, per_instrument: bool = False, latency_every: int = 0
    ) -> WorkerConfig:
        # Latency runs parse in small bites so that one parse never holds up the other
        # connections' receive stamps for long; throughput runs in big ones.
        if latency_every:
            buffer = 128 << 10
        else:
            buffer = (1 << 20) if n <= 100 else (256 << 10)
        return WorkerConfig(
            per_instrument=per_instrument,
            latency_every=latency_every,
            conn_buffer=buffer,
            frame_len=delivered_frame_len(system, per_instrument),
        )

    @staticmethod
    def window(system: str, shares: list[float]) -> int:
        """Pacing window (records of the stream) for subscribers receiving these shares of
        it; 0 (no pacing) for systems that push back on their publisher themselves."""
        if system not in PACED_SYSTEMS:
            return 0
        total = sum(shares) * REC_LEN
        per_sub = max(shares) * REC_LEN
        floor = FLIGHT_MIN / per_sub
        return int(max(floor, min(FLIGHT_BUDGET / total, FLIGHT_PER_SUB / per_sub)))

    # --- one streaming case -----------------------------------------------------------

    def stream_case(
        self,
        *,
        scenario: str,
        system: str,
        specs: list[ConnSpec],
        cfg: WorkerConfig,
        job: PublishJob,
        label: str,
        gateway_config: dict[str, Any] | None = None,
        during: Callable[[Server], AbstractContextManager[dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        """One streaming case; ``during(server)``, when given, is entered just before the
        publisher starts and left once every subscriber has reported (other load on the
        server while the case is measured: what it puts in its dict is ``beside``)."""
        n = len(specs)
        result: dict[str, Any] = {}
        server = self.start_server(system, gateway_config)
        progress = CTX.RawArray("q", max(n, 1))
        pub: _Child | None = None
        workers: list[_Child] = []
        try:
            if system == "gateway":
                job = _replace(job, port=server.ingest_port)  # type: ignore[attr-defined]
            elif server.port:
                job = _replace(job, port=server.port)
            pub, port = self.start_publisher(job, progress)
            if system == "gateway":
                server.wait_feed_up()  # type: ignore[attr-defined]
            specs = [_replace(s, port=server.port or port) for s in specs]
            workers = self.start_workers(cfg, progress)
            first, last = specs[:-1], specs[-1:]
            ready = self.connect(workers, first, 64) if first else ReadyReport()
            more = self.connect(workers[:1], last, 1)
            ready.ready.update(more.ready)
            ready.failed.update(more.failed)
            self.check_ready(ready, progress)
            pid = server.pid or pub.proc.pid
            with self.profiler(server, label):
                split0 = _cpu_split(server)
                cpu0, mach0, rss0 = _cpu(server, pid), MachineCpu.read(), _rss(server, pid)
                with during(server) if during is not None else nullcontext({}) as beside:
                    pub.send(("go",))
                    budget = job.duration_s + (60 if job.rate else 120)
                    report: PublishReport = pub.recv(budget, "the publisher to finish")[1]
                    expected = self.expected_counts(specs, report.records, cfg.per_instrument)
                    results = self.collect(workers, expected, 30 + n * 0.02)
                    cpu1, mach1, rss1 = _cpu(server, pid), MachineCpu.read(), _rss(server, pid)
                    split1 = _cpu_split(server)
            result = self.summarize(specs, expected, results, ready, report)
            if beside:
                result["beside"] = beside
            delivered = result["delivered"]
            result.update(
                server_cpu_s=round(cpu1 - cpu0, 3),
                server_rss_kib=rss1,
                server_rss_growth_kib=rss1 - rss0,
                machine_busy=round(mach1.since(mach0), 3),
                window_records=job.window,
                paced_s=round(report.paced_s, 3),
                publisher_error=report.error,
                publisher_notes=report.notes,
            )
            if delivered:
                result["server_cpu_s_per_m"] = round((cpu1 - cpu0) / delivered * 1e6, 4)
            if split1:  # a multi-worker gateway: where its CPU went
                result["server_cpu_by_process_s"] = {
                    k: round(v - split0.get(k, 0.0), 3) for k, v in split1.items()
                }
            if not server.proc or server.alive():
                pass
            else:
                result["server_exit"] = server.proc.returncode
        finally:
            _shut_down(workers, pub, server)
        return result

    def expected_counts(
        self, specs: list[ConnSpec], records: int, per_instrument: bool
    ) -> dict[int, int]:
        if not per_instrument:
            return {s.index: records for s in specs}
        counts = self.schedule.published_per_instrument(records)
        return {
            s.index: int(counts[np.asarray(s.instruments or (), dtype=np.int64) - FIRST_ID].sum())
            if s.instruments is not None
            else records
            for s in specs
        }

    def summarize(
        self,
        specs: list[ConnSpec],
        expected: dict[int, int],
        results: list[WorkerResult],
        ready: ReadyReport,
        report: PublishReport,
    ) -> dict[str, Any]:
        conns: list[ConnResult] = [c for r in results for c in r.conns]
        got = {c.index: c for c in conns}
        lost = 0
        extra = 0
        gaps = 0
        unexpected = 0
        notes: list[str] = []
        failed = dict(ready.failed)
        for spec in specs:
            c = got.get(spec.index)
            want = expected[spec.index]
            if c is None:
                lost += want
                failed.setdefault(spec.index, "no result")
                continue
            lost += max(0, want - c.records)
            extra += max(0, c.records - want)
            gaps += c.gaps
            unexpected += c.unexpected
            if c.closed and spec.index not in failed:
                failed[spec.index] = c.closed
            for note in c.notes:
                if len(notes) < 8:
                    notes.append(f"subscriber {spec.index}: {note}")
        for index, why in list(failed.items())[:5]:
            notes.append(f"subscriber {index} failed: {why}")
        firsts = [c.first_ns for c in conns if c.first_ns]
        lasts = [c.last_ns for c in conns if c.last_ns]
        delivered = sum(min(c.records, expected.get(c.index, 0)) for c in conns)
        span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
        ingest_span = (max(lasts) - report.start_ns) / 1e9 if lasts and report.start_ns else 0.0
        wire = sum(c.wire_bytes for c in conns)
        plain = sum(c.plain_bytes for c in conns)
        out: dict[str, Any] = {
            "status": "ok",
            "published": report.records,
            "expected": sum(expected.values()),
            "delivered": delivered,
            "lost": lost,
            "extra": extra,
            "gaps": gaps,
            "unexpected": unexpected,
            "failed_sessions": len(failed),
            "span_s": round(span, 4),
            "throughput_rps": round(delivered / span) if span > 0 else 0,
            "ingest_rps": round(report.records / ingest_span) if ingest_span > 0 else 0,
            "wire_bytes": wire,
            "plain_bytes": plain,
            "compression_ratio": round(plain / wire, 3) if wire else 0.0,
            "notes": notes,
        }
        all_lat = _percentiles([r.latency_all for r in results])
        probe_lat = _percentiles([r.latency_probe for r in results])
        if all_lat or probe_lat:
            out["latency"] = {"all": all_lat, "probe": probe_lat}
            out["achieved_rate"] = (
                round(report.records / ((report.end_ns - report.start_ns) / 1e9))
                if report.end_ns > report.start_ns
                else 0
            )
        out["loss_free"] = (
            lost == 0
            and extra == 0
            and gaps == 0
            and unexpected == 0
            and not failed
            and not report.error
        )
        return out

    # --- scenarios --------------------------------------------------------------------

    def fanout(
        self, system: str, n: int, gateway_config: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        specs = [ConnSpec(i, system, 0) for i in range(n)]
        job = PublishJob(
            system,
            duration_s=self.plan.duration_s,
            expect_peers=n,
            window=self.window(system, [1.0] * n),
        )
        return self.stream_case(
            scenario="fanout",
            system=system,
            specs=specs,
            cfg=self.worker_config(system, n),
            job=job,
            label=f"fanout-{system}-{n}",
            gateway_config=gateway_config,
        )

    def filtered(self, system: str, n: int) -> dict[str, Any]:
        subs = _zipf_subscriptions(n)
        specs = [ConnSpec(i, system, 0, instruments=s) for i, s in enumerate(subs)]
        shares = [len(s) / INSTRUMENTS for s in subs]
        job = PublishJob(
            system,
            per_instrument=True,
            with_mappings=True,
            duration_s=self.plan.duration_s,
            expect_peers=sum(len(s) for s in subs),
            window=self.window(system, shares),
            subscriptions=tuple(subs),
        )
        res = self.stream_case(
            scenario="filtered",
            system=system,
            specs=specs,
            cfg=self.worker_config(system, n, per_instrument=True),
            job=job,
            label=f"filtered-{system}-{n}",
        )
        distinct = len({s for s in subs})
        res["distinct_subscriptions"] = distinct
        return res

    def zstd(self, mode: ZstdMode, n: int, max_records: int = 0) -> dict[str, Any]:
        specs = [
            ConnSpec(
                i,
                "gateway",
                0,
                zstd=mode.compression,
                distinct_tag=(900_000 + i) if mode.distinct else None,
            )
            for i in range(n)
        ]
        job = PublishJob(
            "gateway",
            duration_s=self.plan.duration_s if not max_records else 600.0,
            window=self.window("gateway", [1.0] * n),
            max_records=max_records or (1 << 31),
        )
        return self.stream_case(
            scenario="zstd",
            system="gateway",
            specs=specs,
            cfg=self.worker_config("gateway", n),
            job=job,
            label=f"zstd-{mode.name}-{n}",
            gateway_config=mode.gateway_config,
        )

    def latency(
        self,
        system: str,
        n: int,
        rate: int,
        *,
        duration_s: float | None = None,
        gateway_config: dict[str, Any] | None = None,
        during: Callable[[Server], AbstractContextManager[dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        specs = [ConnSpec(i, system, 0, probe=(i == n - 1)) for i in range(n)]
        every = max(1, rate // 10_000)
        duration = duration_s or self.plan.latency_duration_s
        job = PublishJob(
            system,
            duration_s=duration,
            rate=float(rate),
            warmup_s=min(0.5, duration * 0.2),
            expect_peers=n,
        )
        res = self.stream_case(
            scenario="latency",
            system=system,
            specs=specs,
            cfg=self.worker_config(system, n, latency_every=every),
            job=job,
            label=f"latency-{system}-{n}-{rate}",
            gateway_config=gateway_config,
            during=during,
        )
        res["rate"] = rate
        achieved = res.get("achieved_rate", 0)
        res["overloaded"] = bool(achieved and achieved < 0.95 * rate)
        return res

    def _burst_publisher(
        self, server: Any, system: str, n: int, progress: Any
    ) -> tuple[_Child, int, int]:
        """A publisher that waits for n peers, then sends one 800-record burst; returns it,
        the port clients use, and the pid whose RSS and CPU are measured."""
        job = PublishJob(system, duration_s=60, max_records=800, expect_peers=n)
        if system == "gateway":
            job = _replace(job, port=server.ingest_port)
        elif server.port:
            job = _replace(job, port=server.port)
        pub, port = self.start_publisher(job, progress)
        if system == "gateway":
            server.wait_feed_up()
        return pub, port, server.pid or pub.proc.pid

    def idle(self, system: str, n: int) -> dict[str, Any]:
        """n idle sessions: server RSS per session, CPU while idle, then one burst."""
        plan = self.plan
        server = self.start_server(system)
        progress = CTX.RawArray("q", max(n, 1))
        pub: _Child | None = None
        workers: list[_Child] = []
        try:
            pub, port, pid = self._burst_publisher(server, system, n, progress)
            hb = plan.idle_heartbeat_s if system == "gateway" else None
            specs = [ConnSpec(i, system, server.port or port, heartbeat_s=hb) for i in range(n)]
            workers = self.start_workers(WorkerConfig(), progress)
            time.sleep(0.3)
            rss0 = _rss(server, pid)
            t0 = time.perf_counter()
            ready = self.connect(workers, specs, 200, timeout=180)
            self.check_ready(ready, progress)
            connect_s = time.perf_counter() - t0
            time.sleep(1.0)
            rss1 = _rss(server, pid)
            cpu0, mach0 = _cpu(server, pid), MachineCpu.read()
            time.sleep(plan.idle_window_s)
            cpu1, mach1 = _cpu(server, pid), MachineCpu.read()
            heartbeats = 0
            with_hb = 0
            for w in workers:
                w.send(("stats",))
            for w in workers:
                stats = w.recv(60, "subscriber stats")[1]
                for _records, _control, hb_count in stats.values():
                    heartbeats += hb_count
                    with_hb += hb_count > 0
            with self.profiler(server, f"idle-burst-{system}-{n}"):
                pub.send(("go",))
                report: PublishReport = pub.recv(120, "the burst")[1]
                expected = self.expected_counts(specs, report.records, False)
                results = self.collect(workers, expected, 60 + n * 0.01)
            res = self.summarize(specs, expected, results, ready, report)
            lasts = [c.last_ns for r in results for c in r.conns if c.last_ns]
            sessions = len(ready.ready)
            res.update(
                sessions=sessions,
                connect_s=round(connect_s, 3),
                rss_before_kib=rss0,
                rss_after_kib=rss1,
                rss_per_session_kib=round((rss1 - rss0) / sessions, 2) if sessions else 0,
                idle_window_s=plan.idle_window_s,
                idle_cpu_fraction=round((cpu1 - cpu0) / plan.idle_window_s, 4),
                machine_busy=round(mach1.since(mach0), 3),
                heartbeat_interval_s=hb,
                heartbeats=heartbeats,
                sessions_with_heartbeat=with_hb,
                burst_records=report.records,
                burst_s=round((max(lasts) - report.start_ns) / 1e9, 4) if lasts else 0.0,
            )
            return res
        finally:
            _shut_down(workers, pub, server)

    def connect_storm(self, system: str, n: int) -> dict[str, Any]:
        """n connect+auth+subscribe at once: time until all are streaming; then a burst."""
        server = self.start_server(system)
        progress = CTX.RawArray("q", max(n, 1))
        pub: _Child | None = None
        workers: list[_Child] = []
        try:
            pub, port, pid = self._burst_publisher(server, system, n, progress)
            specs = [ConnSpec(i, system, server.port or port) for i in range(n)]
            workers = self.start_workers(WorkerConfig(), progress)
            time.sleep(0.3)
            cpu0 = _cpu(server, pid)
            with self.profiler(server, f"connect-{system}-{n}"):
                ready = self.connect(workers, specs, n, timeout=120)
                self.check_ready(ready, progress)
                cpu1 = _cpu(server, pid)
                pub.send(("go",))
                report: PublishReport = pub.recv(120, "the burst")[1]
                expected = self.expected_counts(specs, report.records, False)
                results = self.collect(workers, expected, 60)
            res = self.summarize(specs, expected, results, ready, report)
            times = np.array([r - s for s, r in ready.ready.values()], dtype=np.float64) / 1e6
            if len(times):
                start = min(s for s, _ in ready.ready.values())
                end = max(r for _, r in ready.ready.values())
                res.update(
                    sessions=len(times),
                    all_streaming_s=round((end - start) / 1e9, 4),
                    per_session_ms={
                        "p50": round(float(np.percentile(times, 50)), 2),
                        "p99": round(float(np.percentile(times, 99)), 2),
                        "max": round(float(times.max()), 2),
                    },
                    server_cpu_s=round(cpu1 - cpu0, 3),
                )
            return res
        finally:
            _shut_down(workers, pub, server)


def _cpu(server: Server, pid: int) -> float:
    """CPU seconds of the server under test: the whole gateway (supervisor and workers),
    else the process ``pid``."""
    if isinstance(server, GatewayServer):
        return server.cpu_seconds()
    return cpu_seconds(pid)


def _cpu_split(server: Server) -> dict[str, float]:
    """Per process CPU of a multi-worker gateway (supervisor, w0, w1…); {} otherwise."""
    if isinstance(server, GatewayServer) and server.worker_pids:
        return server.cpu_by_process()
    return {}


def _rss(server: Server, pid: int) -> int:
    if isinstance(server, GatewayServer):
        return server.rss_kib()
    return rss_kib(pid)


def pyspy_command(
    pyspy: str, pid: int, out: Path, *, rate: int, fmt: str, subprocesses: bool
) -> list[str]:
    """``py-spy record`` of ``pid`` (and its child processes: a multi-worker gateway)."""
    cmd = [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking"]
    cmd += ["--format", fmt, "-o", str(out)]
    if subprocesses:
        cmd.append("--subprocesses")
    return cmd


def _shut_down(workers: list[_Child], pub: _Child | None, server: Any) -> None:
    """Close the subscriber workers and the publisher, then stop the server."""
    for w in workers:
        w.send(("close",))
    if pub is not None:
        pub.send(("exit",))
    for w in workers:
        w.stop()
    if pub is not None:
        pub.stop()
    server.stop()


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


SCENARIOS: Final = (
    "fanout",
    "filtered",
    "zstd",
    "latency",
    "idle",
    "connect",
    "replay",
    "relay",
    "books",
    "workers",
)
#: what ``python -m bench`` runs without ``--scenarios`` (``workers`` joins them when
#: ``--workers`` names counts)
DEFAULT_SCENARIOS: Final = SCENARIOS[:-1]
SYSTEMS: Final = ("gateway", "raw", "nats", "redis", "zmq")
#: the ``workers`` scenario's parts: what each measures at every worker count
SCALING_PARTS: Final = ("fanout-cpu", "filtered", "zstd-distinct")
SCENARIO_SYSTEMS: Final = {
    "fanout": ("raw", "gateway", "nats", "redis", "zmq"),
    "filtered": ("gateway", "nats", "redis", "zmq"),
    "zstd": ("gateway",),
    "latency": ("gateway", "nats", "redis", "zmq"),
    "idle": ("gateway", "nats", "redis"),
    "connect": ("gateway", "nats", "redis", "zmq"),
    "replay": ("gateway",),
    "relay": ("gateway", "raw"),
    "books": ("gateway",),
    "workers": ("gateway",),
}
#: scenarios a ``--quick`` run leaves out unless ``--scenarios`` names them (``relay``:
#: four extra gateways per repeat; ``--quick --scenarios relay`` is its correctness run)
QUICK_OPT_IN: Final = ("relay", "books")


def _at_workers(h: Harness, workers: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one case with the gateway at ``workers`` processes."""
    before = h.gateway_workers
    h.gateway_workers = workers
    try:
        res = run()
    finally:
        h.gateway_workers = before
    res["gateway_workers"] = workers
    return res


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def _single_process_only(scenario: str, params: dict[str, Any]) -> str:
    """Why a case cannot run with workers ("" when it can)."""
    mode = next((m for m in ZSTD_MODES if m.name == params.get("mode")), None)
    if scenario == "zstd" and mode is not None and mode.single_process:
        return f"{mode.name}: the gateway runs {mode.gateway_config} in one process only"
    return ""


def parse_worker_counts(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> (1, 2, 4, 8): distinct, in the order given; ValueError naming the
    bad item otherwise."""
    counts: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--workers: {item!r} is not a worker count (an integer >= 1)")
        if int(item) not in counts:
            counts.append(int(item))
    if not counts:
        raise ValueError("--workers: no worker count given (e.g. --workers 1,2)")
    return tuple(counts)


def build_cases(
    h: Harness,
    scenarios: list[str],
    systems: list[str],
    workers: tuple[int, ...] = (1,),
    repeats: int | None = None,
) -> list[Case]:
    """The cases to run. Every gateway case runs once per count in ``workers`` (its params
    then say ``workers=N``; peers run once); the ``workers`` scenario runs its parts at
    every count, 1 included, ``repeats`` times (default the plan's), interleaved so that a
    drift of the machine touches every count alike."""
    plan = h.plan
    cases: list[Case] = []
    tagged = tuple(workers) != (1,)

    def add(
        scenario: str,
        system: str,
        n: int,
        params: dict[str, Any],
        run: Callable[[], dict[str, Any]],
    ) -> None:
        if system != "gateway" or scenario == "workers":
            cases.append(Case(scenario, system, n, params, run))
            return
        why = _single_process_only(scenario, params)
        for count in workers:
            p = {**params, "workers": count} if tagged else params
            run_at = (
                partial(_skipped, why) if why and count > 1 else partial(_at_workers, h, count, run)
            )
            cases.append(Case(scenario, system, n, p, run_at))

    for scenario in scenarios:
        wanted = [s for s in SCENARIO_SYSTEMS[scenario] if s in systems]
        if scenario == "fanout":
            for n in plan.fanout_n:
                for s in wanted:
                    add(scenario, s, n, {}, partial(h.fanout, s, n))
        elif scenario == "filtered":
            params: dict[str, Any] = {"instruments": INSTRUMENTS, "per_session": SUBS_PER_SESSION}
            for n in plan.filtered_n:
                for s in wanted:
                    add(scenario, s, n, params, partial(h.filtered, s, n))
        elif scenario == "zstd" and "gateway" in systems:
            for n in plan.zstd_n:
                for mode in ZSTD_MODES:
                    zparams = {"mode": mode.name, "description": mode.description}
                    add(scenario, "gateway", n, zparams, partial(h.zstd, mode, n))
        elif scenario == "latency":
            for n in plan.latency_n:
                for rate in plan.latency_rates:
                    for s in wanted:
                        add(scenario, s, n, {"rate": rate}, partial(h.latency, s, n, rate))
        elif scenario == "idle":
            for s in wanted:
                add(scenario, s, plan.idle_sessions, {}, partial(h.idle, s, plan.idle_sessions))
        elif scenario == "connect":
            for s in wanted:
                n = plan.connect_sessions
                add(scenario, s, n, {}, partial(h.connect_storm, s, n))
        elif scenario == "replay" and "gateway" in systems:
            rp = replay_plan(plan.quick)
            rb = ReplayBench(h, rp)
            h.cleanups.append(rb.close)
            add(scenario, "gateway", 1, {"part": "sendfile"}, rb.sendfile)
            add(scenario, "gateway", 1, {"part": "filtered"}, rb.filtered)
            add(scenario, "gateway", rp.live_sessions, {"part": "beside-live"}, rb.beside_live)
            add(scenario, "gateway", rp.fanout_n, {"part": "fanout-journal"}, rb.fanout_journal)
        elif scenario == "relay":
            from bench.relay import relay_cases

            for system, n, rparams, run in relay_cases(h, systems, repeats):
                cases.append(Case(scenario, system, n, rparams, run))
        elif scenario == "books" and "gateway" in systems:
            from bench.books_fanout import books_cases

            for system, n, bparams, run in books_cases(h, repeats):
                cases.append(Case(scenario, system, n, bparams, run))
        elif scenario == "workers" and "gateway" in systems:
            counts = (1, *[c for c in workers if c != 1])
            zmode = next(m for m in ZSTD_MODES if m.name == "zstd-distinct")
            runs: dict[str, tuple[int, Callable[[], dict[str, Any]]]] = {
                "fanout-cpu": (
                    plan.scaling_fanout_n,
                    partial(h.fanout, "gateway", plan.scaling_fanout_n),
                ),
                "filtered": (
                    plan.scaling_filtered_n,
                    partial(h.filtered, "gateway", plan.scaling_filtered_n),
                ),
                "zstd-distinct": (
                    plan.scaling_zstd_n,
                    partial(h.zstd, zmode, plan.scaling_zstd_n, plan.scaling_zstd_records),
                ),
            }
            for rep in range(repeats or plan.scaling_repeats):
                for part in SCALING_PARTS:
                    n, run = runs[part]
                    for count in counts:
                        wparams = {"part": part, "workers": count, "repeat": rep}
                        add(scenario, "gateway", n, wparams, partial(_at_workers, h, count, run))
    return cases


def run_case(case: Case, peers: dict[str, PeerStatus]) -> dict[str, Any]:
    """Run one case; a skipped peer or a failure becomes a result row, never an exception."""
    base: dict[str, Any] = {
        "scenario": case.scenario,
        "system": case.system,
        "n": case.n,
        "params": case.params,
    }
    peer = peers.get(case.system)
    if peer is not None and not peer.available:
        return {**base, "status": "skipped", "reason": peer.reason}
    started = time.perf_counter()
    try:
        res = case.run()
    except Exception as exc:
        return {
            **base,
            "status": "error",
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
            "elapsed_s": round(time.perf_counter() - started, 2),
        }
    res = {**base, **res, "elapsed_s": round(time.perf_counter() - started, 2)}
    return res


def peer_table(peers: dict[str, PeerStatus]) -> list[dict[str, Any]]:
    return [asdict(p) for p in peers.values()]
