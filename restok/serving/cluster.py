"""Metrics and draining across the replicas of a Ray Serve application.

Ray's proxy sends each /metrics scrape to one replica, so a replica's own counters alternate between
replicas from scrape to scrape (counter resets, wrong ``rate()``). Here every replica reports its metrics
and load to one board (a named Ray actor per application) every half second and on each scrape; any
replica answers /metrics with the sum over all replicas: totals that never go down while replicas live,
whichever replica answers. We chose this over Ray's own metrics export because that one needs Ray's
metrics agent and a Prometheus that scrapes every node; the board needs nothing but Ray.

The board also carries the drain: ``drain(app)`` sets its flag, every replica stops taking work (503,
not ready) at its next report, and the caller waits until no replica has queued or running images.
"""

from __future__ import annotations

import asyncio
import itertools
import time

REPORT_SECONDS = 0.5
SUMMED = ("counter", "histogram", "gauge", "summary")


def board_name(app_name: str) -> str:
    return f"restok-metrics-{app_name}"


def sum_metrics(texts: list[str], replica_ids: list[str]) -> str:
    """Prometheus text of several replicas as one: restok's counters, histograms and gauges summed sample by
    sample; info metrics once; process metrics kept apart with a ``replica`` label (their sum means nothing)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, dict] = {}
    for text, rid in zip(texts, replica_ids):
        for fam in text_string_to_metric_families(text):
            f = families.setdefault(fam.name, {"type": fam.type, "doc": fam.documentation, "samples": {}})
            per_replica = not fam.name.startswith("restok_")
            for s in fam.samples:
                labels = dict(s.labels, replica=rid) if per_replica else dict(s.labels)
                key = (s.name, tuple(labels.items()))
                if fam.type in SUMMED and not per_replica:
                    f["samples"][key] = f["samples"].get(key, 0.0) + s.value
                else:
                    f["samples"].setdefault(key, s.value)
    out = []
    for name, f in families.items():
        kind = "unknown" if f["type"] == "info" else f["type"]
        out.append(f"# HELP {name} {f['doc']}")
        out.append(f"# TYPE {name} {kind}")
        for (sample, labels), value in f["samples"].items():
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{sample}{{{shown}}} {value!r}" if shown else f"{sample} {value!r}")
    return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class MetricsBoard:
        """Each replica's newest report (by its own sequence number) and the drain flag."""

        def __init__(self):
            self.reports: dict[str, tuple[int, str, int, float]] = {}
            self.draining = False

        def report(self, replica: str, seq: int, text: str, busy: int) -> bool:
            old = self.reports.get(replica)
            if old is None or seq > old[0]:
                self.reports[replica] = (seq, text, busy, time.time())
            return self.draining

        def forget(self, replica: str) -> None:
            self.reports.pop(replica, None)

        def metrics(self) -> tuple[list[str], list[str]]:
            return [r[1] for r in self.reports.values()], list(self.reports)

        def busy(self, since: float = 0.0) -> tuple[int, int]:
            """(images queued or running over all replicas, replicas that have not reported since ``since``)."""
            return sum(r[2] for r in self.reports.values()), sum(r[3] < since for r in self.reports.values())

        def drain(self) -> None:
            self.draining = True

    return MetricsBoard


def get_board(app_name: str, create: bool = True):
    """The application's board (detached: replicas come and go, the board stays until ``drain`` ends it)."""
    import ray

    if not create:
        return ray.get_actor(board_name(app_name), namespace="restok")
    return _board_class().options(name=board_name(app_name), namespace="restok", get_if_exists=True,
                                  lifetime="detached").remote()


class ReplicaReporter:
    """In one replica: reports its metrics and load to the board, answers /metrics with the sum, and turns
    the board's drain flag into this replica's draining."""

    def __init__(self, app_name: str, replica_id: str):
        self.app_name, self.replica_id = app_name, replica_id
        self.board = get_board(app_name)
        self._seq = itertools.count()
        self._task: asyncio.Task | None = None

    async def _report(self, svc) -> None:
        text = svc.metrics.render()[0].decode()
        busy = svc.inflight + (0 if svc.scheduler.idle else 1)
        if await self.board.report.remote(self.replica_id, next(self._seq), text, busy):
            svc.draining = True

    def start(self, svc) -> None:
        async def loop():
            while True:
                try:
                    await self._report(svc)
                except Exception:  # noqa: BLE001 - the board restarting must not stop the replica
                    pass
                await asyncio.sleep(REPORT_SECONDS)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.board.forget.remote(self.replica_id)
        except Exception:  # noqa: BLE001 - the board may be gone at shutdown
            pass

    async def render(self, svc) -> str:
        await self._report(svc)
        texts, ids = await self.board.metrics.remote()
        return sum_metrics(texts, ids)


def drain(app_name: str, seconds: float, poll: float = 0.1) -> bool:
    """Stop every replica taking work and wait until none has queued or running images (at most
    ``seconds``); True when all work finished in time."""
    import ray

    try:
        board = get_board(app_name, create=False)
    except ValueError:  # no replica ever started
        return True
    ray.get(board.drain.remote())
    t0 = time.time()
    end = t0 + seconds
    while time.time() < end:
        busy, stale = ray.get(board.busy.remote(since=t0))
        if busy == 0 and stale == 0:  # every replica has seen the flag and holds no work
            ray.kill(board)
            return True
        time.sleep(poll)
    ray.kill(board)
    return False
