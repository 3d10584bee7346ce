"""Throughput at the provider's limits: the real pipeline against the sandbox, in shrunk time.

Starts the sandbox in a separate process (so the client's CPU is measured alone), runs the
pipeline on a generated manifest, and prints one line per figure: jobs per second achieved,
the bound K x min(creates_per_window / window_s, max_concurrent / mean latency) in wall
seconds, their ratio, 429s received, polls per job, client CPU seconds per 1,000 jobs and the
client's peak memory. With slow or throttled keys, also the healthy keys' own efficiency: what
they achieve beside the troubled ones.

    python scripts/bench.py --keys 1 --rows 600 --latency-mean 10 --spread 0.05 --time-scale 0.05
    python scripts/bench.py --keys 8 --rows 8000 --slow-keys 1 --throttled-keys 1
    python scripts/bench.py --keys 8 --rows 4800 --time-scale 0.2 --workers 2

With `--workers N` the keys are spread over N Ray workers on a local Ray cluster, started
before the clock starts; client CPU then counts the driver and every worker, and each worker's
peak memory is printed.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import ApiKey, LimitsSection, parse_config
from pipeline.drive import Workers
from pipeline.provider.polling import poll_schedule
from pipeline.runs import configure_logging, run
from pipeline.sandbox.ideal import (
    Creates,
    Limits,
    perfect_span,
    run_creates,
    share_of_perfect,
    steady_share,
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--latency-mean", type=float, default=10.0, help="provider seconds")
    parser.add_argument("--spread", type=float, default=0.3, help="coefficient of variation")
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--creates-per-window", type=int, default=100)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--max-concurrent", type=int, default=10)
    parser.add_argument("--job-error", type=float, default=0.0)
    parser.add_argument("--create-5xx", type=float, default=0.0)
    parser.add_argument("--poll-5xx", type=float, default=0.0)
    parser.add_argument(
        "--polls-per-job", type=float, default=None, help="polling.polls_per_job (default: its own)"
    )
    parser.add_argument(
        "--webhook", action="store_true", help="webhook mode: callbacks wake a confirming poll"
    )
    parser.add_argument(
        "--no-listing",
        action="store_true",
        help="polling.listing: false: each job polled on the schedule alone",
    )
    parser.add_argument(
        "--output-mb",
        type=float,
        default=0.0,
        help="grow each output to this size (a real 2K output is about 4 MB)",
    )
    parser.add_argument(
        "--no-download", action="store_true", help="keep no images (assets.download: false)"
    )
    parser.add_argument(
        "--slow-keys", type=int, default=0, help="keys whose every answer is --slow-s late"
    )
    parser.add_argument("--slow-s", type=float, default=2.0, help="provider seconds")
    parser.add_argument(
        "--throttled-keys",
        type=int,
        default=0,
        help="keys whose creates start 429 storms (--storm-rate of them, --storm-s long)",
    )
    parser.add_argument(
        "--expected-latency",
        type=float,
        default=None,
        help="polling.expected_latency_s, the client's first guess (default: the true mean)",
    )
    parser.add_argument(
        "--provider-cap",
        type=int,
        default=None,
        help="the provider's concurrency cap per account (default: --max-concurrent)",
    )
    parser.add_argument(
        "--group-keys",
        type=int,
        default=1,
        help="keys per account: they share the provider's cap, and limits.groups says so",
    )
    parser.add_argument("--storm-rate", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=None, help="Ray workers (--workers)")
    parser.add_argument(
        "--gate",
        default="ours",
        help="the create gate: ours (a sliding window), or bucket:B, aiolimiter's leaky bucket "
        "with a burst of B and the rate that keeps B plus a window's leak one under the limit",
    )
    parser.add_argument("--delay-fraction", type=float, default=None, help="polling.delay_fraction")
    parser.add_argument("--save-ledger", type=Path, default=None, help="write the ledger here")
    parser.add_argument("--storm-s", type=float, default=30.0, help="provider seconds")
    parser.add_argument(
        "--api-shape", default="seed", help="the sandbox's shape: seed, reference or today"
    )
    parser.add_argument(
        "--org-traffic", type=float, default=0.0, help="('today') another application's share"
    )
    return parser.parse_args()


def _start_sandbox(args: argparse.Namespace, keys: list[str]) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "sandbox",
        "--port",
        "0",
        "--keys",
        ",".join(keys),
        "--time-scale",
        str(args.time_scale),
        "--latency-mean-s",
        str(args.latency_mean),
        "--latency-spread",
        str(args.spread),
        "--creates-per-window",
        str(args.creates_per_window),
        "--window-s",
        str(args.window),
        "--max-concurrent",
        str(args.provider_cap or args.max_concurrent),
        "--groups",
        ";".join(",".join(group) for group in _groups(args, keys)),
        "--faults",
        f"job_error={args.job_error},create_5xx={args.create_5xx},poll_5xx={args.poll_5xx}",
        "--image-scale",
        "0.05",
        "--output-bytes",
        str(int(args.output_mb * 1e6)),
        "--allow-loopback-urls",
        "--api-shape",
        args.api_shape,
        "--org-traffic",
        str(args.org_traffic),
    ]
    slow, throttled = _troubled(args, keys)
    for key in slow:
        command += ["--key-faults", f"{key}:slow=1,slow_s={args.slow_s}"]
    for key in throttled:
        command += ["--key-faults", f"{key}:storm_429={args.storm_rate},storm_s={args.storm_s}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _groups(args: argparse.Namespace, keys: list[str]) -> list[list[str]]:
    size = max(1, args.group_keys)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _troubled(args: argparse.Namespace, keys: list[str]) -> tuple[list[str], list[str]]:
    """The slow keys, then the throttled keys: the first of `keys`."""
    if args.slow_keys + args.throttled_keys >= len(keys):
        raise SystemExit("--slow-keys plus --throttled-keys must leave at least one healthy key")
    return keys[: args.slow_keys], keys[args.slow_keys : args.slow_keys + args.throttled_keys]


def _healthy_span(ends: pa.Table, healthy: list[str]) -> tuple[int, float]:
    """Jobs ended on the healthy keys, and the seconds from their first create to last end."""
    mine = ends.filter(pc.is_in(ends["key"], pa.array(healthy)))
    if mine.num_rows == 0:
        return 0, 0.0
    first = pc.min(mine["created_at"]).as_py().timestamp()
    last = pc.max(mine["finished_at"]).as_py().timestamp()
    return mine.num_rows, last - first


def _held_beyond_latency(ends: pa.Table) -> list[float]:
    """Per job, seconds its slot was held beyond the job's own latency: journaling and sending
    the create, and the delay until a poll (or a callback) noticed its end."""
    timed = ends.filter(pc.is_valid(ends["predict_time_s"]))
    created = pc.cast(timed["created_at"], pa.int64()).to_pylist()
    finished = pc.cast(timed["finished_at"], pa.int64()).to_pylist()
    latency = timed["predict_time_s"].to_pylist()
    return sorted((f - c) / 1e6 - t for c, f, t in zip(created, finished, latency, strict=True))


def _use_bucket(burst: int) -> None:
    """Creates spaced by aiolimiter's leaky bucket instead of our sliding window: a bucket of
    `burst` that leaks (limit - 1 - burst) creates a window never lets more than the limit
    into any window, whatever the timing. A 429's pause still holds every create."""
    from contextlib import asynccontextmanager

    from aiolimiter import AsyncLimiter

    from pipeline.drive import assemble
    from pipeline.provider import CreateGate

    class BucketGate(CreateGate):
        def __init__(self, creates_per_window: int, window_s: float) -> None:
            super().__init__(creates_per_window, window_s)
            rate = (creates_per_window - 1 - burst) / window_s
            self._bucket = AsyncLimiter(burst, burst / rate)

        @asynccontextmanager
        async def create(self, give_way: Any = None) -> AsyncIterator[None]:
            while (wait := self.paused_for()) > 0:
                await self.clock.sleep(wait)
            await self._bucket.acquire()
            self._open += 1
            self.sent += 1
            try:
                yield
            finally:
                self._open -= 1
                self._answered.append(self.clock.now())

    assemble.CreateGate = BucketGate  # type: ignore[misc]


def _perfect_poller(creates: Creates, keys: int, limits: Limits, groups: list[int]) -> float:
    """The share a perfect client reaches when it must poll each job to see its end: the
    best schedule of at most 10 polls a job on average, planned on these very latencies (so a
    ceiling: no schedule learned from earlier jobs does better), no round trips."""
    schedule = poll_schedule(sorted(creates.latency_s), 10.0)
    seen = []
    for latency in creates.latency_s:
        index = bisect.bisect_left(schedule, latency)
        seen.append(schedule[index] if index < len(schedule) else latency)
    return perfect_span(creates.latency_s, keys, limits, groups) / perfect_span(
        seen, keys, limits, groups
    )


class _CpuSamples:
    """This process's CPU time, read every half second from a thread: the CPU of the jobs'
    own span, without the run's start (imports, journal, manifest) and end (results, report)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append((time.time(), time.process_time()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def share(self, start: float, end: float) -> float:
        """Cores used between two wall instants (the samples inside them)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return math.nan
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)


def _start_ray(count: int | None) -> Workers | None:
    """A local Ray cluster for `--workers`, started before the clock starts (the run joins
    it); None without workers."""
    if count is None:
        return None
    import os

    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, count), include_dashboard=False)
    return Workers(count)


def main() -> None:
    args = _arguments()
    if args.gate.startswith("bucket:"):
        _use_bucket(int(args.gate.removeprefix("bucket:")))
    keys = [f"bench-key-{i}" for i in range(args.keys)]
    proc, base_url = _start_sandbox(args, keys)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            manifest = folder / "bench.csv"
            with manifest.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["sku", "prompt", "img_url"])
                for i in range(args.rows):
                    writer.writerow([f"B{i}", f"edit {i}", f"https://cdn.example.com/{i}.jpg"])
            config = parse_config(
                {
                    "api": {"base_url": base_url, "time_scale": args.time_scale},
                    "limits": {
                        "creates_per_window": args.creates_per_window,
                        "window_s": args.window,
                        "max_concurrent": args.max_concurrent,
                        "groups": [
                            [keys.index(k) + 1 for k in group]
                            for group in _groups(args, keys)
                            if len(group) > 1
                        ],
                    },
                    "polling": {
                        "listing": not args.no_listing,
                        "expected_latency_s": args.expected_latency or args.latency_mean,
                        **({"polls_per_job": args.polls_per_job} if args.polls_per_job else {}),
                        **({"delay_fraction": args.delay_fraction} if args.delay_fraction else {}),
                    },
                    "manifest": {"path": str(manifest), "id_column": "sku"},
                    "output": {"dir": str(folder / "run")},
                    "webhook": {"enabled": args.webhook},
                    "assets": {"download": not args.no_download},
                },
                folder,
            )
            time.sleep(0.5)  # the sandbox process is listening once it printed its URL
            configure_logging(None)
            workers = _start_ray(args.workers)
            sampler = _CpuSamples()
            cpu0, wall0 = time.process_time(), time.time()
            use0 = resource.getrusage(resource.RUSAGE_SELF)
            summary = anyio.run(
                lambda: run(
                    config, [ApiKey(k) for k in keys], handle_signals=False, workers=workers
                )
            )
            cpu, wall1 = time.process_time() - cpu0, time.time()
            sampler.stop()
            driver_cpu = cpu
            cpu += sum(w["cpu_s"] or 0.0 for w in summary.workers)
            use1 = resource.getrusage(resource.RUSAGE_SELF)
            user, system = use1.ru_utime - use0.ru_utime, use1.ru_stime - use0.ru_stime
            switches = use1.ru_nvcsw - use0.ru_nvcsw + use1.ru_nivcsw - use0.ru_nivcsw
            ends = pq.read_table(
                summary.results_path,
                columns=["created_at", "finished_at", "predict_time_s", "key"],
            )
            first_create = pc.min(ends["created_at"]).as_py().timestamp()
            last_end = pc.max(ends["finished_at"]).as_py().timestamp()
            held = _held_beyond_latency(ends)
            slow, throttled = _troubled(args, keys)
            healthy = [ApiKey(k).name for k in keys if k not in slow and k not in throttled]
            healthy_jobs, healthy_s = _healthy_span(ends, healthy)
            by_key = {ApiKey(k).name: k for k in keys}
            per_key = pc.value_counts(ends["key"]).to_pylist()
        sandbox_cpu = psutil.Process(proc.pid).cpu_times()
        sandbox_stats = httpx.get(base_url.removesuffix("/v1") + "/_admin/stats").json()
        ledger = httpx.get(base_url.removesuffix("/v1") + "/_admin/ledger").text
        if args.save_ledger is not None:
            args.save_ledger.write_text(ledger)
        ends_sorted = sorted(
            t.timestamp() for t in ends["finished_at"].to_pylist() if t is not None
        )
    finally:
        proc.terminate()
        proc.wait(10)
    jobs = summary.stats.finished
    rate = jobs / summary.elapsed_s
    wall_window = args.window * args.time_scale
    wall_latency = args.latency_mean * args.time_scale
    # per account: its keys' create rate, or the provider's cap over the latency
    cap = min(args.provider_cap or args.max_concurrent, args.max_concurrent * args.group_keys)
    limits = LimitsSection(
        creates_per_window=args.creates_per_window, window_s=wall_window, max_concurrent=cap
    )
    bound = sum(
        limits.jobs_per_s(wall_latency, len(group), one_group=True) for group in _groups(args, keys)
    )
    # the first and last latency of a finite run cannot be overlapped: count them in the bound
    ramp = wall_latency
    bound_finite = jobs / (jobs / bound + ramp)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    creates = run_creates(json.loads(line) for line in ledger.splitlines() if line)
    ideal_limits = Limits(
        args.creates_per_window, wall_window, args.provider_cap or args.max_concurrent
    )
    sizes = [len(group) for group in _groups(args, keys)]
    share, perfect_s = share_of_perfect(creates, args.keys, ideal_limits, sizes)
    poller = _perfect_poller(creates, args.keys, ideal_limits, sizes)
    print(f"keys                      {args.keys}")
    print(f"jobs                      {jobs}")
    # the run's span (first create to last end, at the provider) against a perfect client's
    # on the same creates: 1.0 is the physical limit
    print(f"share_of_perfect_client   {share:.3f}")
    # the same in the steady middle (the 10th to the 90th percentile create)
    steady_part = steady_share(creates, args.keys, ideal_limits, sizes)
    print(f"steady_share_of_perfect   {steady_part:.3f}")
    print(f"span_s run perfect        {creates.span_s:.2f} {perfect_s:.2f}")
    # the ceiling of a client that polls each job (no listing, no callbacks)
    print(f"perfect_poller_ceiling    {poller:.3f} (10 polls a job, on these latencies)")
    print(f"jobs_per_s                {rate:.3f}")
    print(f"bound_jobs_per_s          {bound:.3f}")
    print(f"efficiency                {rate / bound:.3f}")
    print(f"efficiency_finite_run     {rate / bound_finite:.3f}")
    # the same ratio over the jobs' own span (first create to last end): without the run's
    # fixed start-up (journal, manifest) and wind-down (results file) costs
    print(f"efficiency_jobs_span      {jobs / (last_end - first_create) / bound_finite:.3f}")
    print(f"startup_s                 {first_create - wall0:.2f}")
    print(f"wind_down_s               {wall1 - last_end:.2f}")
    if held:
        mean_ms = sum(held) / len(held) * 1000
        p90_ms = held[int(0.9 * (len(held) - 1))] * 1000
        print(f"slot_held_beyond_job_ms   mean {mean_ms:.1f}  p90 {p90_ms:.1f}")
    print(f"429s                      {summary.stats.rate_limited}")
    print(f"429s_for_the_cap          {summary.stats.cap_refusals}")
    delays = sorted(summary.stats.notice_delays)
    if delays:
        p50, p95 = delays[len(delays) // 2], delays[int(0.95 * (len(delays) - 1))]
        print(f"notice_delay_ms           p50 {p50 * 1000:.0f}  p95 {p95 * 1000:.0f}")
    if len(ends_sorted) > 150:
        # a wrong first guess: the rate of ends 30 to 50 against the steady one (100 to -50)
        early = 20 / (ends_sorted[50] - ends_sorted[30])
        steady = (len(ends_sorted) - 150) / (ends_sorted[-50] - ends_sorted[100])
        print(f"rate_ends_30_50_vs_steady {early / steady:.3f}")
    print(f"max_in_flight_per_group {sandbox_stats.get('max_in_flight_per_group')}")
    print(f"polls_per_job             {summary.stats.polls / max(jobs, 1):.2f}")
    # a listing read tells the ends of many jobs; counted as a request of each job all the same
    listings = summary.stats.listings
    print(f"listings_per_job          {listings / max(jobs, 1):.2f}")
    print(f"requests_per_job          {(summary.stats.polls + listings) / max(jobs, 1):.2f}")
    per_1000 = 1000 / max(jobs, 1)
    print(f"client_cpu_s_per_1000     {cpu * per_1000:.2f}")
    # the same, as a job's share; with --time-scale 1.0 this is the provider's real pace
    ms_per_job = cpu / max(jobs, 1) * 1000
    print(f"client_cpu_ms_per_job     {ms_per_job:.2f} (time scale {args.time_scale:g})")
    # the share of one core each key costs over the run; at --time-scale 1, the real pace
    core = cpu / max(summary.elapsed_s, 1e-9) / args.keys
    print(f"client_core_per_key       {core * 100:.2f} % (time scale {args.time_scale:g})")
    # the same over the jobs' own span, from the first create to the last end
    steady = sampler.share(first_create, last_end) / args.keys
    print(f"core_per_key_jobs_span    {steady * 100:.2f} % (this process, not Ray workers)")
    # where it went: user space, the kernel (sockets, fsync, wake-ups), and context switches
    print(f"client_user_sys_per_1000  {user * per_1000:.2f} {system * per_1000:.2f}")
    print(f"context_switches_per_job  {switches / max(jobs, 1):.1f}")
    print(f"peak_rss_mb               {peak_mb:.0f}")
    if summary.workers:
        print(f"workers                   {len(summary.workers)}")
        print(f"driver_cpu_ms_per_job     {driver_cpu / max(jobs, 1) * 1000:.2f}")
        for w in summary.workers:
            print(
                f"{w['worker']:<25} keys {len(w['keys'])} jobs {w['jobs_finished']} "
                f"cpu_ms_per_job {w['cpu_s'] / max(w['jobs_finished'], 1) * 1000:.2f} "
                f"peak_rss_mb {w['peak_rss_mb']:.0f} restarts {w['restarts']}"
            )
    # the double shares the 2 cores: when it is busy, the client's numbers suffer with it
    sandbox_s = sandbox_cpu.user + sandbox_cpu.system
    print(f"sandbox_cpu_s_per_1000    {sandbox_s / max(jobs, 1) * 1000:.2f}")
    if slow or throttled:
        # while the healthy keys worked, did they work at their own bound?
        bound_healthy = len(healthy) * bound / args.keys
        finite = healthy_jobs / (healthy_jobs / bound_healthy + ramp)
        print(f"slow_keys throttled_keys  {len(slow)} {len(throttled)}")
        print(f"healthy_keys_jobs_per_s   {healthy_jobs / healthy_s:.3f}")
        print(f"healthy_keys_bound        {bound_healthy:.3f}")
        # over the healthy keys' own span, the ramp of a finite run counted as in the bound
        print(f"healthy_keys_efficiency   {healthy_jobs / healthy_s / finite:.3f}")
        kinds = {**{k: "slow" for k in slow}, **{k: "throttled" for k in throttled}}
        jobs_by_key = ", ".join(
            f"{kinds.get(by_key.get(c['values'], ''), 'healthy')}:{c['counts']}"
            for c in sorted(per_key, key=lambda c: str(c["values"]))
        )
        print(f"jobs_per_key              {jobs_by_key}")
    if summary.stats.downloads is not None:
        d = summary.stats.downloads
        span = max(summary.elapsed_s, 1e-9)
        print(f"images_stored             {d.stored} ({d.failed} failed)")
        rate, mb = d.stored / span, d.bytes / 1e6 / span
        print(f"download_rate             {rate:.1f} images/s {mb:.2f} MB/s")
    if summary.stats.callbacks is not None:
        c = summary.stats.callbacks
        print(f"callbacks_received        {c.received}")
        print(f"ends_by_callback          {c.ends_by_callback}")
        print(f"ends_by_fallback_poll     {c.ends_by_fallback}")
        print(f"ends_on_poll_schedule     {c.ends_by_poll}")
        print(f"callbacks_unconfirmed     {c.unconfirmed}")
    print(f"statuses                  {summary.counts}")


if __name__ == "__main__":
    main()
