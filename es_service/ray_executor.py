"""Ray executor: a pull-style tile queue over an elastic pool of stateless worker actors.

Per generation the driver hands tiles (offsets, signs, sigma, image indices) to whichever ready workers
are alive; workers return loss sums and correct counts. theta reaches them one of two ways
(``workers.theta_sync``): ``broadcast`` puts it in the object store once per generation and every
worker fetches it; ``replay`` sends each worker only the previous generation's update (O(P) scalars)
for its replica, a snapshot (theta + Adam + generation) to a worker that has none, and checks each
result's fingerprint against the driver's theta: a mismatch discards the tile, reissues it and
resyncs that worker (the worker checks it too, and scores nothing on a replica that drifted). A tile
whose worker dies or times out goes back to the queue; late duplicates are ignored. The pool is
kept at a target derived from the cluster's resources (GPUs, else CPUs) within the config's bounds;
new actors join only once they report ready, so a slow start never stalls a generation.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from es_service.config import WorkersConfig
from es_service.executors import GenerationOutcome, make_task
from es_service.plan import GenerationPlan
from es_workers.actor import PopulationWorker
from es_workers.problem import Problem

WAIT_S = 0.2
POOL_CHECK_S = 1.0
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: hides the dispatch round trip


def worker_runtime_env() -> dict:
    """Actor options that start workers in the installed package's directory instead of the job's.

    A job's working_dir is a directory Ray may delete while workers use it: nodes that share the head's
    session directory (the fake autoscaler's) re-extract it on setup, removing the copy in use, and
    Ray removes it when the job ends. A worker whose current directory is gone cannot even import torch
    (MKL's loader calls getcwd). Workers read nothing from the working_dir (the package is installed on
    every node), so they get a ``local://`` one that every node already has and nothing ever deletes,
    and the job's package is never set up on worker nodes at all."""
    if not ray.get_runtime_context().runtime_env.get("working_dir"):
        return {}
    import es_workers

    installed = Path(es_workers.__file__).resolve().parent.parent
    return {"runtime_env": {"working_dir": f"local://{installed}"}}


class NoWorkersError(RuntimeError):
    """No worker actor has been alive for longer than workers.no_worker_timeout_s."""


@dataclass
class _Worker:
    handle: object
    ready_ref: object
    ready: bool = False
    in_flight: int = 0
    synced: int | None = None
    """The generation whose theta this worker holds once its dispatched tiles have run (None: none)."""
    snapshots: int = 0
    """Snapshots sent to it: a mismatch on a tile sent before the latest snapshot needs no other."""


class _Broadcast:
    """theta in the object store once per generation; each worker fetches it with its first tile."""

    def __init__(self, theta: torch.Tensor):
        theta_np = theta.detach().cpu().numpy()
        self.holder = [ray.put(theta_np)]  # in a list, so Ray does not fetch it for every tile
        self.nbytes = theta_np.nbytes

    def dispatch(self, worker: _Worker, task, batch, outcome) -> tuple[object, int]:
        fetches = worker.synced != task.generation
        return worker.handle.evaluate.remote(self.holder, batch, task), task.nbytes + (self.nbytes if fetches else 0)


class _ReplaySync:
    """The previous generation's update to workers one generation behind, a snapshot to the others."""

    def __init__(self, generation: int, replica, last_update):
        self.generation = generation
        self.fingerprint = replica.fingerprint()
        self.replica = replica
        follows = last_update is not None and last_update.generation == generation - 1
        self.update = last_update if follows else None
        self.update_ref = ray.put(last_update) if follows else None
        self.snapshot_ref = None
        self.snapshot_nbytes = 3 * replica.theta.nbytes  # theta and Adam's two moments

    def dispatch(self, worker: _Worker, task, batch, outcome) -> tuple[object, int]:
        sent = task.nbytes
        snapshot = None
        if worker.synced == self.generation - 1 and self.update is not None:
            sent += self.update.nbytes
        elif worker.synced != self.generation:
            if self.snapshot_ref is None:  # made once per generation, only if some worker needs it
                self.snapshot_ref = ray.put(self.replica)
            snapshot = self.snapshot_ref
            sent += self.snapshot_nbytes
            outcome.replica_resyncs += 1
            worker.snapshots += 1
        holder = [self.update_ref, snapshot, self.fingerprint]
        return worker.handle.evaluate_replay.remote(holder, batch, task), sent


class RayExecutor:
    def __init__(
        self,
        problem: Problem,
        table: torch.Tensor,
        workers: WorkersConfig,
        autoscale: bool = False,
        worker_class: type = PopulationWorker,
    ):
        self.config = workers
        self.replay = workers.theta_sync == "replay"
        self.problem, self.table, self.device = problem, table, "cpu"  # the driver's update runs on the CPU
        self._requested = not autoscale  # an embedded local Ray has no autoscaler worth asking
        self._asked_autoscaler = False
        # put once: every worker holds the driver's bits of the table and of the problem's arrays
        self.refs = {"table": ray.put(table.numpy()), "problem": ray.put(problem)}
        self.actor_class = ray.remote(worker_class).options(
            num_cpus=workers.cpus_per_worker,
            num_gpus=workers.gpus_per_worker,
            max_restarts=0,
            max_concurrency=1,
            **worker_runtime_env(),
        )
        self.workers: dict[int, _Worker] = {}
        self.failures = 0
        self.events: collections.deque = collections.deque(maxlen=1000)  # (monotonic time, what, tile id)
        self._next_id = 0
        self._last_pool_check = 0.0
        self._maintain_pool(force=True)

    # -- pool ---------------------------------------------------------------------------------------
    def target_count(self) -> int:
        cfg = self.config
        if cfg.count:
            return cfg.count
        resources = ray.cluster_resources()
        if cfg.gpus_per_worker > 0:
            fit = int(resources.get("GPU", 0) // cfg.gpus_per_worker)
        else:
            fit = int(resources.get("CPU", 0) // cfg.cpus_per_worker)
        return max(cfg.min_count, min(cfg.max_count, fit))

    def _maintain_pool(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_pool_check < POOL_CHECK_S:
            return
        self._last_pool_check = now
        if not self._requested and not self.config.count:
            self._request_resources()
        for _ in range(self.target_count() - len(self.workers)):
            handle = self.actor_class.remote(self.refs, self.config.cpus_per_worker)
            self.workers[self._next_id] = _Worker(handle, handle.ready.remote())
            self._next_id += 1
        pending = {w.ready_ref: wid for wid, w in self.workers.items() if not w.ready}
        if pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in done:
                wid = pending[ref]
                try:
                    ray.get(ref)
                    self.workers[wid].ready = True
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    self._drop(wid)

    def _request_resources(self) -> None:
        """Ask the autoscaler for the configured maximum (a no-op without one)."""
        from ray.autoscaler.sdk import request_resources

        cfg = self.config
        bundle = {"CPU": cfg.cpus_per_worker}
        if cfg.gpus_per_worker > 0:
            bundle["GPU"] = cfg.gpus_per_worker
        try:
            request_resources(bundles=[bundle] * cfg.max_count)
            self._asked_autoscaler = True
        except Exception:  # clusters without an autoscaler (e.g. ray.init locally) reject this
            pass
        self._requested = True

    def _drop(self, wid: int) -> None:
        worker = self.workers.pop(wid, None)
        if worker is not None:
            self.failures += 1
            ray.kill(worker.handle, no_restart=True)

    def wait_until_ready(self, timeout_s: float = 120.0) -> int:
        """Block until the pool's target number of workers is ready (or the timeout); returns how many."""
        deadline = time.monotonic() + timeout_s
        while self.alive < self.target_count() and time.monotonic() < deadline:
            self._maintain_pool(force=True)
            time.sleep(WAIT_S)
        return self.alive

    @property
    def alive(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready)

    # -- one generation -----------------------------------------------------------------------------
    def run_generation(
        self, theta: torch.Tensor, plan: GenerationPlan, replica=None, last_update=None
    ) -> GenerationOutcome:
        """``replica`` (the driver's, at this generation) and ``last_update`` (the previous generation's)
        serve ``replay``; ``broadcast`` needs only ``theta``."""
        outcome = GenerationOutcome.empty(plan)
        if self.replay:
            if replica is None:
                raise ValueError("workers.theta_sync 'replay' needs the driver's replica of theta")
            sync = _ReplaySync(plan.generation, replica, last_update)
        else:
            sync = _Broadcast(theta)
        sent_to: dict[int, int] = collections.defaultdict(int)  # bytes to each worker this generation
        batch = [ray.put(plan.batch_indices)]  # once per generation, not with every tile
        queue = collections.deque(plan.tiles)
        done: set[int] = set()
        in_flight: dict = {}  # ref -> (tile, wid, started, snapshots sent to the worker by then)
        failures_before = self.failures
        no_worker_since = None
        while len(done) < len(plan.tiles):
            self._maintain_pool()
            self._dispatch(plan, queue, done, in_flight, sync, batch, outcome, sent_to)
            if not in_flight:
                if self.alive:
                    continue
                no_worker_since = no_worker_since or time.monotonic()
                if time.monotonic() - no_worker_since > self.config.no_worker_timeout_s:
                    raise NoWorkersError(
                        f"no worker alive for {self.config.no_worker_timeout_s:.0f}s "
                        f"(generation {plan.generation}); check the cluster's resources (ray status)"
                    )
                time.sleep(WAIT_S)
                continue
            no_worker_since = None
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                self._collect(ref, in_flight, queue, done, outcome, sync)
            self._expire(in_flight, queue, done, outcome)
        for _, wid, *_ in in_flight.values():  # duplicates still running: let them finish
            if wid in self.workers:
                self.workers[wid].in_flight -= 1
        outcome.workers_alive = self.alive
        outcome.worker_failures = self.failures - failures_before
        outcome.bytes_to_worker_max = max(sent_to.values(), default=0)
        return outcome

    def _dispatch(self, plan, queue, done, in_flight, sync, batch, outcome, sent_to) -> None:
        """Round-robin: every idle worker gets a tile before any worker gets a second."""
        for level in range(IN_FLIGHT_PER_WORKER):
            for wid, worker in list(self.workers.items()):
                while queue and queue[0].tile_id in done:
                    queue.popleft()
                if not queue:
                    return
                if worker.ready and worker.in_flight <= level:
                    tile = queue.popleft()
                    self.events.append((time.monotonic(), "dispatch", tile.tile_id))
                    task = make_task(plan, tile, batch_by_reference=True)
                    ref, sent = sync.dispatch(worker, task, batch, outcome)
                    if worker.synced != plan.generation:
                        sent += plan.batch_indices.nbytes
                    in_flight[ref] = (tile, wid, time.monotonic(), worker.snapshots)
                    worker.in_flight += 1
                    worker.synced = plan.generation
                    outcome.bytes_to_workers += sent
                    sent_to[wid] += sent

    def _collect(self, ref, in_flight, queue, done, outcome, sync) -> None:
        tile, wid, _, snapshots = in_flight.pop(ref)
        if wid in self.workers:
            self.workers[wid].in_flight -= 1
        try:
            result = ray.get(ref)
        except (RayActorError, ActorDiedError, ActorUnavailableError):
            self._drop(wid)
            if tile.tile_id not in done:
                queue.appendleft(tile)
                outcome.tiles_reissued += 1
                self.events.append((time.monotonic(), "requeue", tile.tile_id))
            return
        outcome.bytes_from_workers += result.nbytes
        if tile.tile_id in done or result.tile_id != tile.tile_id:
            return  # a late duplicate of a tile handed out again
        if self.replay and result.fingerprint != sync.fingerprint:
            outcome.replica_mismatches += 1  # scored on another theta: score it again, resync that worker
            if wid in self.workers and self.workers[wid].snapshots == snapshots:
                self.workers[wid].synced = None  # (unless a snapshot already followed this tile)
            queue.appendleft(tile)
            outcome.tiles_reissued += 1
            self.events.append((time.monotonic(), "resync", tile.tile_id))
            return
        assert result.loss_sums.dtype == np.float64 and result.correct.dtype == np.int64
        assert result.image_losses is None or result.image_losses.dtype == np.float32
        outcome.fill(tile, result)
        done.add(tile.tile_id)

    def _expire(self, in_flight, queue, done, outcome) -> None:
        now = time.monotonic()
        for ref, (tile, wid, started, _) in list(in_flight.items()):
            if now - started > self.config.tile_timeout_s and tile.tile_id not in done:
                in_flight.pop(ref)
                self._drop(wid)  # hung or lost: replace it
                queue.appendleft(tile)
                outcome.tiles_reissued += 1
                self.events.append((now, "requeue", tile.tile_id))

    def describe(self) -> str:
        cfg = self.config
        return f"ray (workers of {cfg.cpus_per_worker} CPU / {cfg.gpus_per_worker:g} GPU)"

    def close(self) -> None:
        for wid in list(self.workers):
            ray.kill(self.workers.pop(wid).handle, no_restart=True)
        if self._asked_autoscaler:
            from ray.autoscaler.sdk import request_resources

            try:  # the request outlives the driver: withdraw it so idle nodes can scale down
                request_resources(bundles=[])
            except Exception:
                pass
