"""deploy/prometheus/alerts.yml: every rule has a promtool unit test and a runbook entry,
and a real Prometheus (Debian's) scraping a running reactor finds every metric the
rules name. A rule written against a metric that does not exist never fires, and
nobody notices: this test is what notices."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reactor.engine.pgcluster import free_port
from tests.harness import CHECKOUT, ports, reactor_process, wait_healthy, wait_until

RULES_DIR = CHECKOUT / "deploy" / "prometheus"
# REACTOR_ALERT_RULES: another rules file to check the same way (to show that a broken
# metric name fails the test).
RULES = Path(os.environ.get("REACTOR_ALERT_RULES", RULES_DIR / "alerts.yml"))
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
OPERATIONS = CHECKOUT / "docs" / "operations.md"
# The metric names inside a PromQL expression (the reactor's, and Prometheus's own `up`).
METRIC = re.compile(r"\b(reactor_[a-z0-9_]+|up)\b")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (scripts/install-system-deps)")


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def metric_names(rule: dict[str, Any]) -> set[str]:
    return set(METRIC.findall(rule["expr"]))


@needs_promtool
def test_the_rules_pass_their_promtool_tests() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "alerts.test.yml"], cwd=RULES_DIR,
                          capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_rule_fires_in_a_unit_test_and_names_its_runbook() -> None:
    tests = yaml.safe_load((RULES_DIR / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    quiet = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
             if not case.get("exp_alerts")}
    runbook = OPERATIONS.read_text()
    names = [rule["alert"] for rule in rules()]
    assert len(names) == 8
    for rule in rules():
        name = rule["alert"]
        assert name in fired, f"{name}: no promtool test makes it fire"
        assert name in quiet, f"{name}: no promtool test keeps it quiet"
        assert f"docs/operations.md §8 Alerts, {name}" in rule["annotations"]["summary"]
        assert f"**{name}**" in runbook, f"{name}: no runbook entry in docs/operations.md"
        assert metric_names(rule), f"{name}: names no metric"


@contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """Debian's Prometheus scraping `target` every second with the rules loaded; yields
    its base URL."""
    assert PROMETHEUS is not None
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "reactor", "static_configs": [{"targets": [target]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=out, cwd=tmp_path)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.process
@pytest.mark.skipif(PROMETHEUS is None,
                    reason="prometheus is not installed (scripts/install-system-deps)")
def test_a_real_prometheus_scraping_a_reactor_finds_every_metric_the_rules_use(
        database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "reactor.log"
    with reactor_process(database_url, log) as proc:
        bound = ports(proc, log)
        wait_healthy(bound.http, proc, log)
        with prometheus(tmp_path, f"127.0.0.1:{bound.http}") as base:
            def api(path: str) -> Any:
                try:
                    answer = httpx.get(f"{base}/api/v1/{path}", timeout=5)
                except httpx.HTTPError:
                    return None
                return answer.json()["data"] if answer.status_code == 200 else None

            def scraped() -> bool:
                targets = api("targets")
                return bool(targets) and any(t["health"] == "up" and t["lastScrape"]
                                             for t in targets["activeTargets"])
            wait_until(scraped, within_s=60, what="Prometheus to scrape the reactor")
            # The rules were loaded and evaluate without error.
            groups = wait_until(lambda: (api("rules") or {}).get("groups"), within_s=60,
                                what="the rules to be loaded")
            loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            assert sorted(loaded) == sorted(rule["alert"] for rule in rules())
            names = set(api("label/__name__/values"))
        proc.terminate()
        proc.wait(timeout=30)
    missing = {rule["alert"]: sorted(metric_names(rule) - names) for rule in rules()
               if metric_names(rule) - names}
    assert not missing, f"rules name metrics the reactor does not export: {missing}"
