"""What the reactor costs besides time per job: PDF rendering, memory over a long
drain, and CPU while there is nothing to do."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from bench.common import Child, Result, fill_pgmq, pct, reset_pgmq
from reactor.engine.pgcluster import free_port

__all__ = ["idle_cpu", "memory", "pdf"]


# -- PDF -----------------------------------------------------------------------------------
def _reports() -> tuple[object, object]:
    """The standard report, and the worst one the report processor accepts."""
    from reactor.clinic.reports import (
        MAX_DOMAIN_CHARS,
        MAX_RECOMMENDATIONS,
        MAX_RESULTS_BYTES,
        MAX_SCORES,
        MAX_TEXT_CHARS,
        check_report_size,
    )
    from reactor.clinic.services.pdf import ReportData, Score

    standard = ReportData("a1", "Маша Петрова", "Анна Петрова", datetime.now(UTC), [
        Score("Эмоциональное состояние", 12, 20, "moderate"), Score("Поведение", 6, 20, "low"),
        Score("Внимание и концентрация", 17, 20, "high"), Score("Сон", 8, 20, "low")],
        "Маша в целом хорошо справляется; стоит обратить внимание на концентрацию.",
        ["Обсудить со специалистом трудности с концентрацией.", "Режим сна и прогулки."])

    # Every limit of reactor.clinic.reports at its maximum. Time grows with the
    # characters per line (the line breaker measures the line so far after each one), so
    # the text is of narrow Latin letters; Cyrillic at every limit would be over the
    # 64 KiB cap on the results (two bytes a letter) and refused.
    def text(n: int) -> str:
        return ("lilt ill it " * (n // 12 + 1))[:n]

    bands = ("low", "moderate", "high")
    worst = ReportData(
        "a2", text(MAX_TEXT_CHARS), text(MAX_TEXT_CHARS), datetime.now(UTC),
        [Score(text(MAX_DOMAIN_CHARS), i % 21, 20, bands[i % 3])  # type: ignore[arg-type]
         for i in range(MAX_SCORES)],
        text(MAX_TEXT_CHARS), [text(MAX_TEXT_CHARS) for _ in range(MAX_RECOMMENDATIONS)])
    check_report_size(worst)  # raises if the processor would refuse it
    results = {"child_name": worst.child_name, "summary": worst.summary,
               "recommendations": worst.recommendations,
               "scores": [{"domain": s.domain, "score": s.score, "max": s.max, "band": s.band}
                          for s in worst.scores]}
    size = len(json.dumps(results, ensure_ascii=False).encode())
    if size > MAX_RESULTS_BYTES:
        raise RuntimeError(f"the worst accepted report is {size} bytes, over the cap")
    return standard, worst


def pdf(url: str, runs: int = 50) -> list[Result]:
    """Median render time of the standard report and of the worst accepted one.

    Wall time, and the rendering thread's CPU time beside it: on a machine shared with
    other work the CPU time is the steadier figure (a render runs in one thread).
    """
    del url
    from reactor.clinic.resources import TEMPLATES_DIR
    from reactor.clinic.services.pdf import find_fonts, prepare_fonts, render_report

    fonts = prepare_fonts(find_fonts(Path("/usr/share/fonts/truetype/dejavu")),
                          Path(tempfile.gettempdir()) / "reactor-fonts")
    results: list[Result] = []
    for label, data, n in zip(("standard (ru, 4 domains)",
                               "worst accepted (40 domains of 120 chars, 30 recommendations "
                               "and summary and name of 1,000 chars)"),
                              _reports(), (runs, max(5, runs // 5)), strict=True):
        # A process's first render also parses the wording (then shared by every later
        # document): timed apart, in its own column, not in the median.
        t0 = time.perf_counter()
        render_report(data, locale="ru", fonts=fonts,  # type: ignore[arg-type]
                      templates_dir=TEMPLATES_DIR, app_name="Family Mind")
        first = {} if results else {"first_of_process_ms": round(
            (time.perf_counter() - t0) * 1000, 1)}
        times, cpu = [], []
        size = 0
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            size = len(render_report(data, locale="ru", fonts=fonts,  # type: ignore[arg-type]
                                     templates_dir=TEMPLATES_DIR, app_name="Family Mind"))
            cpu.append((time.thread_time() - c0) * 1000)
            times.append((time.perf_counter() - t0) * 1000)
        results.append({"report": label, "runs": n,
                        "median_ms": round(statistics.median(times), 1),
                        "p90_ms": round(pct(times, 90), 1),
                        "median_cpu_ms": round(statistics.median(cpu), 1),
                        "bytes": size, **first})
    return results


# -- memory over a long drain ---------------------------------------------------------------
def memory(url: str, first: int = 100_000, last: int = 1_000_000) -> list[Result]:
    """RSS of one reactor process after `first` and after `last` no-op jobs."""
    reset_pgmq(url)
    fill_pgmq(url, last)
    rss: dict[int, int] = {}
    with Child("bench.workers", "memory", url, str(first), str(last), quiet=True) as child:
        for _ in range(2):
            count, kib = map(int, child.expect("RSS", 3600))
            rss[count] = kib
            print(f"  … RSS after {count:,} jobs: {kib / 1024:.1f} MiB", flush=True)
        if child.wait(600) != 0:
            raise RuntimeError("the memory worker failed")
    reset_pgmq(url)
    return [{"jobs": f"{first:,}", "rss_mib": round(rss[first] / 1024, 1)},
            {"jobs": f"{last:,}", "rss_mib": round(rss[last] / 1024, 1),
             "x_first": round(rss[last] / rss[first], 3)}]


# -- idle CPU ------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def idle_cpu(url: str, seconds: float = 60.0) -> list[Result]:
    """CPU of `reactor run` (defaults, every queue) over `seconds` with nothing to do."""
    reset_pgmq(url)
    metrics_port = free_port()
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as tmp:
        env = {**os.environ, "DATABASE_URL": url, "EMAIL_PROVIDER": "file",
               "EMAIL_OUTBOX_DIR": f"{tmp}/outbox", "REPORTS_DIR": f"{tmp}/reports",
               "FEED_PORT": str(free_port()), "METRICS_PORT": str(metrics_port),
               "LOG_LEVEL": "warning", "LOG_FORMAT": "json"}
        # From an empty directory, as a service runs: no .env is picked up.
        proc = subprocess.Popen([sys.executable, "-m", "reactor", "run"], cwd=tmp, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{metrics_port}/healthz", timeout=5) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("reactor run did not become healthy")
                time.sleep(0.5)
            time.sleep(5)  # let start-up work (fonts, first drain) settle
            before, t0 = _cpu_s(proc.pid), time.monotonic()
            time.sleep(seconds)
            used, wall = _cpu_s(proc.pid) - before, time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return [{"scenario": f"reactor run, defaults, idle {seconds:g} s",
             "cpu_s": round(used, 3), "pct_of_one_core": round(used / wall * 100, 2)}]
