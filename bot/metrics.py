"""GET /metrics: the Prometheus text format, built from the database at scrape time.

Every figure comes from the database, so it is the same whichever process or machine is
asked, and survives restarts: gauges are counted when scraped (tasks by state, agents
running, the disk use the workers measured), counters are the rows of the `counters`
table that every process adds to (bot/core/metrics.py). One read transaction, whose cost
does not grow with the number of tasks (bench/metrics.py). The figures carry no per-task
label; `[metrics] repo_label = true` adds a `repo` label to the task counts, finished
tasks, tokens and cost.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bot import __version__
from bot.config import Config
from bot.core import metrics
from bot.core.metrics import Counter
from bot.core.tasks import State
from bot.store import MetricsSnapshot, Store

#: the Content-Type of the text format `generate_latest` writes
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: counter -> (Prometheus name without _total, help, its labels in order)
COUNTERS: dict[Counter, tuple[str, str, tuple[str, ...]]] = {
    Counter.TASKS_FINISHED: (
        "kugetsu_tasks_finished",
        "Tasks that reached a final state (completed, failed, cancelled, rejected), by outcome "
        "and the agent of their last run; a task retried and finished again counts again.",
        ("outcome", "agent", "repo"),
    ),
    Counter.DELIVERIES: (
        "kugetsu_webhook_deliveries",
        "Webhook deliveries by how they were answered: queued (202), ignored or duplicate "
        "(200), rejected (400, 401, 413, 415), error (503, not stored).",
        ("result",),
    ),
    Counter.AGENT_TOKENS: (
        "kugetsu_agent_tokens",
        "Tokens agents used (input, output and cache), by agent.",
        ("agent", "repo"),
    ),
    Counter.AGENT_COST: (
        "kugetsu_agent_cost_usd",
        "What agents reported their runs cost, in US dollars, by agent.",
        ("agent", "repo"),
    ),
    Counter.GITEA_REQUESTS: (
        "kugetsu_gitea_requests",
        'Gitea API requests by method and answer status ("none": no answer); retries count.',
        ("method", "code"),
    ),
}

HISTOGRAMS: dict[Counter, tuple[str, str]] = {
    Counter.TASK_DURATION: (
        "kugetsu_task_duration_seconds",
        "How long each attempt of a task ran, from its start to its end (agent, commit, push, "
        "pull request).",
    ),
    Counter.QUEUE_WAIT: (
        "kugetsu_queue_wait_seconds",
        "How long a task waited to start once it was ready (queued, or its retry's wait over).",
    ),
}

#: the labels dropped unless `[metrics] repo_label` is set
REPO = "repo"


class KugetsuCollector(Collector):
    """Reads the database at each scrape (`collect`)."""

    def __init__(self, config: Config, store: Store):
        self.config, self.store = config, store

    def collect(self) -> Iterator[Metric]:
        by_repo = self.config.metrics.repo_label
        snap = self.store.metrics_snapshot(by_repo=by_repo)
        info = GaugeMetricFamily(
            "kugetsu_build_info", "kugetsu's version; always 1.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield from _tasks(snap, by_repo)
        agents = GaugeMetricFamily(
            "kugetsu_agents_running", "Agent processes running now, on every worker."
        )
        agents.add_metric([], snap.agents_running)
        yield agents
        yield from _counters(snap, by_repo)
        yield from _disk(snap)
        yield from _workers(snap)


def _tasks(snap: MetricsSnapshot, by_repo: bool) -> Iterator[Metric]:
    labels = ["state", REPO] if by_repo else ["state"]
    family = GaugeMetricFamily("kugetsu_tasks", "Tasks in the database by state.", labels=labels)
    seen = set()
    for state, repo, count in snap.tasks:
        family.add_metric([state, repo or ""] if by_repo else [state], count)
        seen.add(state)
    if not by_repo:  # every state, 0 too, so that a query finds the series
        for state in State:
            if state not in seen:
                family.add_metric([str(state)], 0)
    yield family


def _counters(snap: MetricsSnapshot, by_repo: bool) -> Iterator[Metric]:
    sums: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
    for name, stored, value in snap.counters:
        labels = metrics.labels_of(stored)
        if name in HISTOGRAMS or name.endswith("_sum"):
            sums[name][(labels.get("le", ""),)] += value
            continue
        if name not in COUNTERS:
            continue  # written by a newer kugetsu
        names = [n for n in COUNTERS[Counter(name)][2] if by_repo or n != REPO]
        sums[name][tuple(labels.get(n, "") for n in names)] += value
    for counter, (prom, help_text, label_names) in COUNTERS.items():
        names = [n for n in label_names if by_repo or n != REPO]
        family = CounterMetricFamily(prom, help_text, labels=names)
        for values, value in sorted(sums[str(counter)].items()):
            family.add_metric(list(values), value)
        yield family
    for counter, (prom, help_text) in HISTOGRAMS.items():
        total, bounds = metrics.HISTOGRAMS[counter]
        counts = sums[str(counter)]
        buckets, cumulative = [], 0.0
        for le in [*(metrics.bound(b) for b in bounds), metrics.INF]:
            cumulative += counts.get((le,), 0.0)
            buckets.append((le, cumulative))
        histogram = HistogramMetricFamily(prom, help_text)
        histogram.add_metric([], buckets, sum_value=sum(sums[str(total)].values()))
        yield histogram


def _disk(snap: MetricsSnapshot) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "kugetsu_disk_usage_bytes",
        "Disk used by the data directory's mirrors, worktrees and logs, as each worker's "
        "host last measured it (every few minutes).",
        labels=["dir", "host"],
    )
    measured = GaugeMetricFamily(
        "kugetsu_disk_usage_measured_timestamp_seconds",
        "When each host last measured its disk use.",
        labels=["host"],
    )
    for host, text in snap.disk:
        try:
            data = json.loads(text)
            for folder, size in data["bytes"].items():
                family.add_metric([str(folder), host], float(size))
            measured.add_metric([host], float(data["at"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # unreadable: left out, the next measurement replaces it
    yield family
    yield measured


def _workers(snap: MetricsSnapshot) -> Iterator[Metric]:
    """Each registered worker, on any machine: its capacity, its running tasks and the
    age of its heartbeat (a worker whose heartbeat grows old is gone or cut off)."""
    names = ["worker", "host"]
    capacity = GaugeMetricFamily(
        "kugetsu_worker_capacity", "Agents each worker may run ([worker] capacity).", labels=names
    )
    running = GaugeMetricFamily(
        "kugetsu_worker_running_tasks", "Tasks each worker runs now.", labels=names
    )
    age = GaugeMetricFamily(
        "kugetsu_worker_heartbeat_age_seconds",
        "Seconds since each worker last wrote its heartbeat.",
        labels=names,
    )
    for w in snap.workers:
        labels = [str(w["id"]), str(w["host"])]
        if w["capacity"] is not None:
            capacity.add_metric(labels, float(w["capacity"]))
        running.add_metric(labels, float(w["running"]))
        age.add_metric(labels, float(w["heartbeat_age_seconds"]))
    yield capacity
    yield running
    yield age


def render(config: Config, store: Store) -> bytes:
    """The text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KugetsuCollector(config, store))
    return generate_latest(registry)
