"""The six benchmarks. Each takes the run's ``Config`` and returns a ``Section`` of figures.

Every benchmark starts its own sandbox process (a fresh one: no state carried over) and
runs hms-sync as a child process, so the cost of each is measured apart.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import rawhttp
from bench.common import (
    API_TOKEN,
    OMS_KEY,
    Daemon,
    SandboxProc,
    cpu_seconds,
    free_port,
    hms_env,
    hms_sync_cmd,
    log,
    median,
    parse_json_tail,
    percentile,
    run_measured,
    wait_until,
)
from bench.tee import Tee

STATUS_TO_STATE = {"pending": "to_execute", "processing": "in_progress", "completed": "done"}


@dataclass
class Config:
    quick: bool = False
    full: bool = False
    concurrency: int = 4
    profile_dir: Path | None = None
    workdir: Path = Path("/tmp")
    backfill_orders: int | None = None

    def n(self, default: int, quick: int) -> int:
        return quick if self.quick else default


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    met: bool | None = None


@dataclass
class Section:
    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.figures.append(Figure(name, value, target, met))


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _sub(sandbox: SandboxProc, name: str) -> Path:
    path = sandbox.workdir / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sync_all(sb: SandboxProc, db: Path, cfg: Config, *, timeout: float,
              profile: Path | None = None, concurrency: int | None = None) -> tuple[Any, Any]:
    env = hms_env(sb, db, HMS_SYNC_CONCURRENCY=str(concurrency or cfg.concurrency))
    cmd = hms_sync_cmd() + ["sync-all", "--json"]
    if profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [spy, "record", "--format", "speedscope", "--rate", "200", "-o", str(profile),
               "--"] + cmd
    run = run_measured(cmd, env, timeout=timeout, sandbox=sb)
    if run.code not in (0, 1):
        raise RuntimeError(f"sync-all exited {run.code}: {run.stderr[-2000:]}")
    return run, parse_json_tail(run.stdout)


def _stats_line(stats: dict[str, Any]) -> str:
    r = stats["requests"]
    return ", ".join(f"{k} {r[k]:,}" for k in ("list", "get", "create", "update"))


# -- 6. the sandbox's own ceiling -------------------------------------------------------------


def ceiling(cfg: Config) -> Section:
    sec = Section("ceiling", "Sandbox ceiling (what the sandbox alone can serve)")
    seconds = 2.0 if cfg.quick else 5.0
    clients = 2
    with SandboxProc(cfg.workdir) as sb:
        sb.seed_api(1000)
        cmd = [sys.executable, "-m", "bench.load", "ceiling", "--api", sb.api_url,
               "--oms", sb.oms_url, "--concurrency", str(max(1, cfg.concurrency // clients)),
               "--seconds", str(seconds), "--orders", "1000"]
        sb0, t0 = sb.cpu(), time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        wall = time.perf_counter() - t0
        busy = (sb.cpu() - sb0) / wall
    get = sum(o["get"] for o in outs)
    patch = sum(o["patch"] for o in outs)
    per_core = (get + patch) / 2 / busy if busy > 0 else 0.0
    sec.data = {"get_per_s": get, "patch_per_s": patch, "sandbox_cpu_share": busy,
                "per_core_estimate": per_core}
    sec.add("API GET by id", f"{_fmt(get, 0)} req/s")
    sec.add("API PATCH (status)", f"{_fmt(patch, 0)} req/s")
    sec.add("sandbox CPU while loaded", f"{busy:.0%} of one core")
    sec.add("sandbox capacity (requests / sandbox CPU)",
            f"~{_fmt(per_core, 0)} req/s per core of sandbox CPU "
            f"({1000 / per_core if per_core else 0:.2f} ms per request)")
    sec.notes.append(
        f"{clients} load processes (`python -m bench.load ceiling`) x {cfg.concurrency // clients}"
        f" connections = concurrency {cfg.concurrency}, {seconds:.0f} s per phase. The sandbox "
        "is one Python process (uvicorn with h11, both systems on one event loop), so it can "
        "use one core at most; the load clients share the second core with it. When the "
        "sandbox is well below 100% busy, the load clients (httpx) were the bottleneck and "
        "the sandbox could serve more: the capacity line divides by the sandbox's CPU share."
    )
    return sec


# -- 1. backfill ------------------------------------------------------------------------------


def _backfill_pair(cfg: Config, n: int, c: int, profile: Path | None = None,
                   ) -> dict[str, Any]:
    """The limit script, then hms-sync, each against a fresh sandbox seeded with n orders."""
    timeout = 900.0
    with SandboxProc(cfg.workdir) as sb:
        sb.seed_api(n)
        log(f"backfill: limit script over {n:,} orders (concurrency {c})")
        lim = run_measured([sys.executable, "-m", "bench.load", "limit", "--api", sb.api_url,
                            "--oms", sb.oms_url, "--concurrency", str(c)], timeout=timeout,
                           sandbox=sb)
        if lim.code != 0:
            raise RuntimeError(f"limit script failed: {lim.stderr[-2000:]}")
        lim_doc = parse_json_tail(lim.stdout)
        lim_stats = {s: sb.stats(s) for s in ("api", "oms")}
    with SandboxProc(cfg.workdir) as sb:
        sb.seed_api(n)
        log(f"backfill: hms-sync sync-all over {n:,} orders (HMS_SYNC_CONCURRENCY={c})")
        run, doc = _sync_all(sb, _sub(sb, f"backfill-{n}-{c}") / "hms-sync.db", cfg,
                             timeout=timeout, profile=profile, concurrency=c)
        stats = {s: sb.stats(s) for s in ("api", "oms")}
        oms_orders = len(sb.admin("oms", "GET", "orders")["orders"])
    return {"run": run, "doc": doc, "stats": stats, "oms_orders": oms_orders,
            "lim": lim, "lim_doc": lim_doc, "lim_stats": lim_stats}


def backfill(cfg: Config) -> Section:
    n = cfg.backfill_orders or cfg.n(20_000, 1_000)
    c = cfg.concurrency
    sec = Section("backfill", f"Backfill: sync-all of {n:,} new API orders into an empty OMS")
    profile = cfg.profile_dir / "sync-all.speedscope.json" if cfg.profile_dir else None
    r = _backfill_pair(cfg, n, c, profile)
    run, doc, stats, oms_orders = r["run"], r["doc"], r["stats"], r["oms_orders"]
    lim, lim_doc, lim_stats = r["lim"], r["lim_doc"], r["lim_stats"]
    ratio = run.wall / lim.wall
    total_requests = sum(sum(stats[s]["requests"].values()) for s in stats)
    writes = stats["oms"]["requests"]["create"] + stats["oms"]["requests"]["update"] + \
        stats["api"]["requests"]["update"] + stats["api"]["requests"]["create"]
    summary = doc.get("summary", {})
    sec.data = {
        "orders": n, "concurrency": c, "hms_wall": run.wall, "hms_seconds": doc.get("seconds"),
        "hms_cpu": run.cpu, "hms_rss_mb": run.max_rss_mb, "limit_wall": lim.wall,
        "limit_seconds": lim_doc["seconds"], "limit_cpu": lim.cpu, "ratio": ratio,
        "cpu_ratio": run.cpu / lim.cpu,
        "requests": {s: stats[s]["requests"] for s in stats},
        "limit_requests": {s: lim_stats[s]["requests"] for s in lim_stats},
        "summary": summary, "oms_orders": oms_orders,
        "sandbox_cpu": {"hms": run.sandbox_cpu, "limit": lim.sandbox_cpu},
    }
    ok = oms_orders == n and summary.get("error", 0) == 0
    sec.add("hms-sync", f"{_fmt(n / run.wall)} orders/s ({_fmt(run.wall)} s wall, "
            f"{_fmt(run.cpu)} s CPU)")
    sec.add("limit (bare httpx, same requests)",
            f"{_fmt(n / lim.wall)} orders/s ({_fmt(lim.wall)} s wall, {_fmt(lim.cpu)} s CPU)")
    sec.add(f"hms-sync time / limit time (concurrency {c})", f"{ratio:.2f}x", "<= 1.25x",
            ratio <= 1.25)
    sec.add("same, by CPU seconds (less sensitive to other load on the machine)",
            f"{run.cpu / lim.cpu:.2f}x; hms-sync's own CPU beyond the limit's: "
            f"{(run.cpu - lim.cpu) / n * 1000:.2f} ms per order")
    sec.add("requests per order (hms-sync)", f"{total_requests / n:.3f} "
            f"(writes {writes / n:.3f})", "~2 writes + list pages",
            abs(writes / n - 2) < 0.01 and total_requests / n < 2.05)
    sec.add("sandbox requests (hms-sync)",
            f"HMS-API: {_stats_line(stats['api'])}; HMS-OMS: {_stats_line(stats['oms'])}")
    sec.add("sandbox requests (limit)",
            f"HMS-API: {_stats_line(lim_stats['api'])}; HMS-OMS: {_stats_line(lim_stats['oms'])}")
    sec.add("sandbox CPU busy", f"hms-sync run {run.sandbox_cpu / run.wall:.0%}, "
            f"limit run {lim.sandbox_cpu / lim.wall:.0%} of one core")
    sec.add("sync-all result", f"{json.dumps(summary)}; OMS holds {oms_orders:,} orders",
            f"{n:,} created, 0 errors", ok)
    sec.add("peak RSS of sync-all", f"{_fmt(run.max_rss_mb)} MB")
    if not cfg.quick and not cfg.backfill_orders:
        sweep_n, rows = 5_000, []
        for sc in sorted({4, 16} - {c}) + [c]:
            pr = _backfill_pair(cfg, sweep_n, sc)
            h, li = sweep_n / pr["run"].wall, sweep_n / pr["lim"].wall
            rows.append(f"{sc}: hms-sync {_fmt(h, 0)}, limit {_fmt(li, 0)} orders/s "
                        f"({pr['run'].wall / pr['lim'].wall:.2f}x wall, "
                        f"{pr['run'].cpu / pr['lim'].cpu:.2f}x CPU)")
            sec.data.setdefault("sweep", {})[sc] = {
                "hms": h, "limit": li, "cpu_ratio": pr["run"].cpu / pr["lim"].cpu}
        sec.add(f"concurrency sweep ({sweep_n:,} orders)", "; ".join(rows))
    sec.notes.append(
        "Times are wall times of each child process, start-up included (hms-sync: "
        f"`hms-sync sync-all --json` with HMS_SYNC_CONCURRENCY={c}; limit: "
        f"`python -m bench.load limit --concurrency {c}`). Webhooks off. Each side gets a fresh "
        "sandbox seeded the same way. The limit sends exactly: API list pages of 500 until its "
        "own write-backs reappear, one OMS list page, then per order one OMS create and one "
        "API PATCH of oms_order_code. Concurrency: both sides are bound by their own CPU in "
        "httpx (the sandbox is a third busy at most), and httpcore's pool costs grow with the "
        "number of connections, so on this machine both are fastest at low concurrency; "
        f"{c} is the default of `python -m bench` (`--concurrency N` to change), the sweep "
        "shows the alternative."
    )
    if profile is not None:
        sec.notes.append(f"py-spy profile of sync-all: {profile}")
    return sec


# -- 2. idle cost -----------------------------------------------------------------------------


def idle(cfg: Config) -> Section:
    window = 6.0 if cfg.quick else 30.0
    orders = 200 if cfg.quick else 1000
    sec = Section("idle", "Idle cost: daemon polling every 1 s, nothing changing")
    with SandboxProc(cfg.workdir) as sb:
        wd = _sub(sb, "idle")
        sb.seed_api(orders)
        _sync_all(sb, wd / "hms-sync.db", cfg, timeout=300)
        env = hms_env(sb, wd / "hms-sync.db", HMS_SYNC_POLL_INTERVAL="1",
                      HMS_SYNC_WEBHOOKS="false")
        daemon = Daemon(env, free_port(), wd).start()
        try:
            _wait_polled(daemon)
            time.sleep(1.0 if cfg.quick else 2.0)  # the first polls walk everything once
            sb.reset_stats()
            cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
            log(f"idle: measuring {window:.0f} s")
            time.sleep(window)
            cpu1, t1 = cpu_seconds(daemon.pid), time.perf_counter()
            stats = {s: sb.stats(s) for s in ("api", "oms")}
            rss = _rss_mb(daemon.pid)
        finally:
            daemon.stop()
    elapsed = t1 - t0
    cycles = elapsed / 1.0
    per_cycle = {s: stats[s]["requests"]["list"] / cycles for s in stats}
    other = sum(stats[s]["requests"][k] for s in stats for k in ("get", "create", "update"))
    cpu = cpu1 - cpu0
    per_hour = cpu / elapsed * 3600
    sec.data = {"window": elapsed, "lists_per_cycle": per_cycle, "other_requests": other,
                "cpu_s": cpu, "cpu_s_per_hour": per_hour, "rss_mb": rss}
    for s, name in (("api", "HMS-API"), ("oms", "HMS-OMS")):
        sec.add(f"{name} list requests per poll cycle", f"{per_cycle[s]:.2f}", "1",
                round(per_cycle[s], 1) <= 1.05)
    sec.add("other requests while idle", f"{other}", "0", other == 0)
    sec.add("daemon CPU", f"{_fmt(cpu, 2)} s over {_fmt(elapsed)} s = {_fmt(per_hour, 0)} "
            f"CPU s/hour ({cpu / elapsed:.1%} of one core)")
    sec.add("daemon RSS", f"{_fmt(rss)} MB")
    sec.notes.append(
        f"{orders:,} orders linked first by `sync-all` on the daemon's store; then `hms-sync "
        "run` with HMS_SYNC_POLL_INTERVAL=1, HMS_SYNC_WEBHOOKS=false; counters reset after the "
        f"first polls; {window:.0f} s window ({window:.0f} cycles); CPU = utime+stime from "
        "/proc/<pid>/stat. The hourly full rescan (full_resync_interval, default 3600 s) adds "
        "one full walk of each system per hour and is not in the window."
    )
    return sec


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_polled(daemon: Daemon, timeout: float = 60) -> None:
    """Until /healthz reports a successful poll of both systems."""

    def polled() -> bool:
        try:
            doc = httpx.get(f"{daemon.url}/healthz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        last = doc.get("last_successful_poll") or {}
        return len(last) >= 2 and all(last.values())

    wait_until(polled, timeout, "the daemon's first polls", 0.1)


# -- 3. propagation ---------------------------------------------------------------------------


@dataclass
class Phase:
    rate: float
    seconds: float
    a_ids: list[int] = field(default_factory=list)  # API -> OMS changes
    b_ids: list[int] = field(default_factory=list)  # OMS -> API changes

    @property
    def total(self) -> int:
        return int(self.rate * self.seconds)

    @property
    def orders_per_dir(self) -> int:
        return math.ceil(self.total / 2 / 2)  # two forward steps per order


def propagation(cfg: Config) -> Section:
    main = Phase(100.0, 5.0 if cfg.quick else 30.0)
    light = Phase(20.0, 3.0 if cfg.quick else 10.0)
    phases = [light, main]
    n = sum(2 * p.orders_per_dir for p in phases)
    sec = Section("propagation", f"Propagation: {main.rate:.0f} status changes/s for "
                  f"{main.seconds:.0f} s, webhooks on")
    with SandboxProc(cfg.workdir) as sb:
        wd = _sub(sb, "propagation")
        sb.seed_api(n)
        log(f"propagation: linking {n:,} orders with sync-all")
        _sync_all(sb, wd / "hms-sync.db", cfg, timeout=300)
        codes = {int(o["ext_code"]): o["code"]
                 for o in sb.admin("oms", "GET", "orders")["orders"]}
        ids = sorted(codes)
        for p in phases:
            k = p.orders_per_dir
            p.a_ids, p.b_ids, ids = ids[:k], ids[k: 2 * k], ids[2 * k:]
        env = hms_env(sb, wd / "hms-sync.db")
        profile = cfg.profile_dir / "daemon.speedscope.json" if cfg.profile_dir else None
        results = asyncio.run(_propagate(sb, env, wd, codes, phases, profile))
        final_api = {o["id"]: o for o in sb.admin("api", "GET", "orders")["data"]}
        final_oms = {o["code"]: o for o in sb.admin("oms", "GET", "orders")["orders"]}
    converged = sum(
        1 for api_id, code in codes.items()
        if STATUS_TO_STATE.get(final_api[api_id]["status"]) == final_oms[code]["state"]
    )
    sec.data = {"orders": n, "converged": converged, "phases": {}}
    for p, result in zip(phases, results, strict=True):
        headline = p is main
        tag = "" if headline else f" (at {p.rate:.0f}/s, reference)"
        lat = result.pop("latency")
        data = sec.data["phases"][f"{p.rate:.0f}/s"] = dict(result)
        for d, name in (("api_to_oms", "HMS-API -> HMS-OMS"),
                        ("oms_to_api", "HMS-OMS -> HMS-API")):
            values = lat[d]
            if not values:
                sec.add(name + tag, "no change observed", "p99 < 250 ms" if headline else "",
                        False if headline else None)
                continue
            p50, p95, p99 = (percentile(values, q) * 1000 for q in (50, 95, 99))
            data[d] = {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                       "max_ms": max(values) * 1000, "n": len(values)}
            sec.add(name + tag, f"p50 {_fmt(p50)} ms, p95 {_fmt(p95)} ms, p99 {_fmt(p99)} ms, "
                    f"max {_fmt(max(values) * 1000)} ms (n={len(values):,})",
                    "p99 < 250 ms" if headline else "", p99 < 250 if headline else None)
        sec.add("achieved change rate" + tag,
                f"{_fmt(result['achieved_rate'])} changes/s ({result['sent']:,} sent, "
                f"{result['failed']} refused)", f"{p.rate:.0f}/s" if headline else "",
                result["achieved_rate"] >= p.rate * 0.95 if headline else None)
        sec.add("CPU during the window" + tag,
                f"daemon {result['daemon_cpu_share']:.0%}, sandbox "
                f"{result['sandbox_cpu_share']:.0%}, bench driver "
                f"{result['driver_cpu_share']:.0%} of one core; "
                f"{result['daemon_cpu_ms_per_change']:.1f} ms daemon CPU per change")
        split = result.get("split_ms", {})
        if len(split) == 2:
            w, h = split["webhook_delivery"], split["hms_sync"]
            sec.add("where the time goes" + tag,
                    f"sandbox webhook delivery p50 {_fmt(w['p50'])} / p99 {_fmt(w['p99'])} ms; "
                    f"hms-sync (trigger webhook in -> other side's webhook out) p50 "
                    f"{_fmt(h['p50'])} / p99 {_fmt(h['p99'])} ms")
        sec.add("not seen within 20 s" + tag, f"{result['missing']}", "0",
                result["missing"] == 0)
    last = results[-1]
    sec.add("webhooks through the tee", f"{last['tee_forwarded']:,} answered by hms-sync "
            f"{last['webhook_answers']}, {last['tee_failed']} not forwarded")
    sec.add("orders converged at the end", f"{converged:,}/{n:,}", f"{n:,}", converged == n)
    sec.notes.append(
        f"{n:,} orders linked first (seeded, then `sync-all`), then `hms-sync run` (poll "
        "interval and concurrency left at their defaults, 30 s and 8) with both sandbox "
        "systems sending webhooks to it. "
        "Changes alternate direction: API PATCH status pending->processing->completed "
        "(contract endpoint, bearer token) and OMS PATCH state to_execute->in_progress->done "
        "(contract endpoint, sandbox key); every change is on an order with no other change "
        "in flight (each order takes its second step half a phase after its first). "
        "Latency = arrival of the other system's own webhook for the new value minus the "
        "arrival of the change's response. The webhooks pass through a byte-for-byte tee "
        "in the bench process (`bench/tee.py`) on their way to the daemon, so nothing polls "
        "the sandbox; the tee adds one loopback hop to the trigger and the other system emits "
        "its webhook just after it applied the write, so the figure is an upper bound. "
        f"A light phase ({light.rate:.0f}/s for {light.seconds:.0f} s, its own orders) runs "
        "first as a reference for the latency of an unloaded daemon."
    )
    if profile is not None:
        sec.notes.append(f"py-spy profile of the daemon during the main phase: {profile}")
    return sec


async def _propagate(sb: SandboxProc, env: dict[str, str], wd: Path, codes: dict[int, str],
                     phases: list[Phase], profile: Path | None) -> list[dict[str, Any]]:
    seen: dict[tuple[str, Any, str], float] = {}

    def on_webhook(path: str, body: bytes, t: float) -> None:
        try:
            order = json.loads(body)["data"]["order"]
            key = (("oms", order["code"], order["state"]) if path.endswith("/oms")
                   else ("api", order["id"], order["status"]))
        except (ValueError, KeyError, TypeError):
            return
        seen.setdefault(key, t)

    port = free_port()
    tee = await Tee(port, on_webhook).start()
    sb.webhooks(f"http://127.0.0.1:{tee.port}")
    daemon = await asyncio.to_thread(Daemon(env, port, wd).start)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    api = httpx.AsyncClient(base_url=sb.api_url, limits=limits, timeout=30,
                            headers={"Authorization": f"Bearer {API_TOKEN}"})
    oms = httpx.AsyncClient(base_url=sb.oms_url, limits=limits, timeout=30,
                            headers={"Authorization": f'Token token="{OMS_KEY}"'})
    results = []
    try:
        await asyncio.to_thread(_wait_polled, daemon)
        await asyncio.sleep(2.0)
        for p in phases:
            spy = None
            if profile is not None and p is phases[-1]:
                spy = subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
                     "--format", "speedscope", "-o", str(profile), "-d", str(int(p.seconds)),
                     "-p", str(daemon.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results.append(await _phase(sb, daemon, api, oms, codes, p, seen))
            if spy is not None:
                await asyncio.to_thread(spy.wait, 60)
            tee_stats = {"tee_forwarded": tee.forwarded, "tee_failed": tee.failed,
                         "webhook_answers": dict(tee.statuses)}
            results[-1].update(tee_stats)
            await asyncio.sleep(1.0)
    finally:
        await api.aclose()
        await oms.aclose()
        await asyncio.to_thread(daemon.stop)
        await tee.stop()
    return results


async def _phase(sb: SandboxProc, daemon: Daemon, api: httpx.AsyncClient,
                 oms: httpx.AsyncClient, codes: dict[int, str], p: Phase,
                 seen: dict[tuple[str, Any, str], float]) -> dict[str, Any]:
    expect: list[tuple[str, tuple[str, Any, str], tuple[str, Any, str], float]] = []
    failed = 0
    per_dir = p.orders_per_dir

    async def change(i: int) -> None:
        nonlocal failed
        j, step = (i // 2) % per_dir, (i // 2) // per_dir
        if i % 2 == 0:
            api_id = p.a_ids[j]
            status = ("processing", "completed")[step]
            r = await api.patch(f"/api/orders/{api_id}", json={"status": status})
            key: tuple[str, Any, str] = ("oms", codes[api_id], STATUS_TO_STATE[status])
            trigger: tuple[str, Any, str] = ("api", api_id, status)
            direction = "api_to_oms"
        else:
            api_id = p.b_ids[j]
            state = ("in_progress", "done")[step]
            r = await oms.patch(f"/api/v1/orders/{codes[api_id]}",
                                json={"order": {"state": state}})
            key = ("api", api_id, {"in_progress": "processing", "done": "completed"}[state])
            trigger = ("oms", codes[api_id], state)
            direction = "oms_to_api"
        t = time.perf_counter()
        if r.status_code != 200:
            failed += 1
            return
        expect.append((direction, key, trigger, t))

    d0, s0, p0 = cpu_seconds(daemon.pid), sb.cpu(), time.process_time()
    log(f"propagation: {p.total:,} changes at {p.rate:.0f}/s")
    t0 = time.perf_counter()
    tasks = []
    for i in range(p.total):
        delay = t0 + i / p.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(change(i)))
    sent_for = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline and any(e[1] not in seen for e in expect):
        await asyncio.sleep(0.05)
    window = time.perf_counter() - t0
    d1, s1, p1 = cpu_seconds(daemon.pid), sb.cpu(), time.process_time()
    latency: dict[str, list[float]] = {"api_to_oms": [], "oms_to_api": []}
    delivery: list[float] = []  # change's response -> its webhook reaches the tee
    inside: list[float] = []  # that webhook -> the other system's webhook
    missing = 0
    for direction, key, trigger, t in expect:
        if key not in seen:
            missing += 1
            continue
        latency[direction].append(max(0.0, seen[key] - t))
        if trigger in seen:
            delivery.append(seen[trigger] - t)
            inside.append(seen[key] - seen[trigger])
    return {
        "latency": latency, "sent": p.total, "failed": failed, "missing": missing,
        "achieved_rate": p.total / (sent_for + 1 / p.rate),
        "daemon_cpu_share": (d1 - d0) / window, "sandbox_cpu_share": (s1 - s0) / window,
        "driver_cpu_share": (p1 - p0) / window,
        "daemon_cpu_ms_per_change": (d1 - d0) / max(1, p.total) * 1000,
        "split_ms": {
            name: {"p50": percentile(v, 50) * 1000, "p99": percentile(v, 99) * 1000}
            for name, v in (("webhook_delivery", delivery), ("hms_sync", inside)) if v
        },
    }


# -- 4. memory --------------------------------------------------------------------------------


def memory(cfg: Config) -> Section:
    sizes = [1_000, 5_000] if cfg.quick else [10_000, 100_000]
    sec = Section("memory", "Memory: peak RSS of sync-all")
    runs: dict[str, dict[str, Any]] = {}
    for n in sizes:
        runs[f"linked-{n}"] = _memory_linked(cfg, n)
    if cfg.full:
        for n in sizes:
            runs[f"backfill-{n}"] = _memory_backfill(cfg, n)
    sec.data = runs
    for key, r in runs.items():
        mode, n = key.split("-")
        label = "already linked" if mode == "linked" else "backfill"
        sec.add(f"{int(n):,} orders, {label}",
                f"{_fmt(r['rss_mb'])} MB peak RSS ({_fmt(r['wall'])} s, "
                f"{_fmt(int(n) / r['wall'], 0)} orders/s, writes {r['writes']:,})",
                "< 150 MB", r["rss_mb"] < 150)
    for mode in ("linked", "backfill"):
        small, big = runs.get(f"{mode}-{sizes[0]}"), runs.get(f"{mode}-{sizes[1]}")
        if small and big:
            growth = big["rss_mb"] - small["rss_mb"]
            sec.add(f"growth {sizes[0]:,} -> {sizes[1]:,} ({mode})",
                    f"+{_fmt(growth)} MB ({big['rss_mb'] / small['rss_mb']:.2f}x)",
                    "nearly flat (< +20 MB)", growth < 20)
    sec.notes.append(
        "Peak RSS is the VmHWM of the `hms-sync sync-all --json` process, read from "
        "/proc/<pid>/status every 10 ms while it runs (not ru_maxrss: Linux folds the "
        "parent's RSS at fork into a child's ru_maxrss, which made the bench's own memory "
        "look like hms-sync's). "
        "'Already linked': both systems hold the orders and each API order already names its "
        "OMS order (seeded through the sandbox admin routes), hms-sync's store is empty: "
        "sync-all reads every order of both systems, adopts every link and writes nothing to "
        "either system. A 100,000-order backfill (two writes per order) does not fit the "
        "10-minute budget on 2 cores at the sandbox's ceiling; `python -m bench --full` adds "
        "the backfill mode at both sizes. The 20,000-order backfill's peak RSS is in the "
        "backfill section."
    )
    return sec


def _memory_linked(cfg: Config, n: int) -> dict[str, Any]:
    with SandboxProc(cfg.workdir) as sb:
        log(f"memory: seeding {n:,} linked orders")
        sb.seed_api(n)
        api_orders = sb.admin("api", "GET", "orders")["data"]
        batch = 10_000
        codes: list[str] = []
        for i in range(0, len(api_orders), batch):
            chunk = [{"ext_code": str(o["id"]), "order_type_code": "api_order",
                      "state": STATUS_TO_STATE[o["status"]], "user_id": o["user_id"],
                      "data": {"title": o["title"], "items": o["items"]}}
                     for o in api_orders[i: i + batch]]
            codes += sb.admin("oms", "POST", "seed", {"orders": chunk})["codes"]
        rawhttp.many(sb.api_url, (("PATCH", f"/_sandbox/orders/{o['id']}",
                                   {"oms_order_code": code})
                                  for o, code in zip(api_orders, codes, strict=True)))
        del api_orders, codes
        sb.reset_stats()
        log(f"memory: sync-all over {n:,} linked orders")
        run, doc = _sync_all(sb, _sub(sb, f"mem-{n}") / "hms-sync.db", cfg, timeout=900)
        stats = {s: sb.stats(s) for s in ("api", "oms")}
    writes = sum(stats[s]["requests"][k] for s in stats for k in ("create", "update"))
    return {"rss_mb": run.max_rss_mb, "wall": run.wall, "cpu": run.cpu, "writes": writes,
            "summary": doc.get("summary")}


def _memory_backfill(cfg: Config, n: int) -> dict[str, Any]:
    with SandboxProc(cfg.workdir) as sb:
        sb.seed_api(n)
        log(f"memory: backfill sync-all over {n:,} orders")
        run, doc = _sync_all(sb, _sub(sb, f"memb-{n}") / "hms-sync.db", cfg, timeout=3600)
        stats = {s: sb.stats(s) for s in ("api", "oms")}
    writes = sum(stats[s]["requests"][k] for s in stats for k in ("create", "update"))
    return {"rss_mb": run.max_rss_mb, "wall": run.wall, "cpu": run.cpu, "writes": writes,
            "summary": doc.get("summary")}


# -- 5. start-up ------------------------------------------------------------------------------


def startup(cfg: Config) -> Section:
    from hms_sync.store import Store

    sec = Section("startup", "Start-up: wall time of a CLI call")
    db = cfg.workdir / "startup.db"
    Store(str(db)).close()
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("HMS_", "OMS_"))}
    env["HMS_SYNC_DB"] = str(db)
    runs = 5
    for args in (["--help"], ["status"]):
        run_measured(hms_sync_cmd() + args, env)  # warm the page cache, not counted
        times = []
        for _ in range(runs):
            r = run_measured(hms_sync_cmd() + args, env)
            if r.code != 0:
                raise RuntimeError(f"hms-sync {' '.join(args)} exited {r.code}: {r.stderr}")
            times.append(r.wall)
        m = median(times)
        sec.data[" ".join(args)] = {"median": m, "all": times}
        sec.add(f"`hms-sync {' '.join(args)}`", f"{m * 1000:,.0f} ms median of {runs} "
                f"(min {min(times) * 1000:,.0f}, max {max(times) * 1000:,.0f})", "< 300 ms",
                m < 0.3)
    sec.notes.append("The console script `.venv/bin/hms-sync`; `status` on an empty store "
                     "(created by the bench). One warm-up run first, not counted.")
    return sec


SUITES = {
    "ceiling": ceiling,
    "backfill": backfill,
    "idle": idle,
    "propagation": propagation,
    "memory": memory,
    "startup": startup,
}
