"""Placement: which instance runs which queued job. Pure best-fit bin packing."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobDemand:
    job_id: int
    cpus: float
    memory_mb: int
    fleet: str | None = None


@dataclass
class Capacity:
    instance_id: str
    fleet: str | None
    cpus: float
    memory_mb: int
    used_cpus: float = 0.0
    used_memory_mb: int = 0
    running: int = 0
    order: tuple[int, ...] = field(default=())

    @property
    def free_cpus(self) -> float:
        return self.cpus - self.used_cpus

    @property
    def free_memory_mb(self) -> int:
        return self.memory_mb - self.used_memory_mb

    def copy(self) -> Capacity:
        """A copy to plan on (`place` changes what it is given); dataclasses.replace
        costs three times as much, and a pass copies every instance with room."""
        return Capacity(
            self.instance_id,
            self.fleet,
            self.cpus,
            self.memory_mb,
            self.used_cpus,
            self.used_memory_mb,
            self.running,
            self.order,
        )

    def fits(self, job: JobDemand) -> bool:
        if job.fleet is not None and job.fleet != self.fleet:
            return False
        return job.cpus <= self.free_cpus + 1e-9 and job.memory_mb <= self.free_memory_mb


def fits_anywhere(job: JobDemand, instances: list[Capacity]) -> bool:
    """Could the job ever run on one of these instances, were they idle?"""
    return any(
        (job.fleet is None or job.fleet == c.fleet)
        and job.cpus <= c.cpus + 1e-9
        and job.memory_mb <= c.memory_mb
        for c in instances
    )


def has_room(instances: list[Capacity]) -> bool:
    """Could any job at all start on one of these now? (Every job asks for some cpu.)"""
    return any(c.free_cpus > 1e-9 for c in instances)


def first_page(instances: list[Capacity], batch: int) -> int:
    """How many queued jobs a dispatcher pass reads first: about twice as many one-cpu
    jobs as there is room for now, at least 8, at most `batch`. A full fleet with one
    slot free reads 8 jobs, not `batch`; the pass reads on, each page twice the last,
    while room is left (see `corral.store.dispatch`)."""
    room = sum(max(0.0, c.free_cpus) for c in instances)
    return max(8, min(batch, int(room * 2) + 1))


def waiting_reason(job: JobDemand) -> str:
    """Why a job that no instance could ever hold waits (memory 0: the job set none)."""
    where = f"in fleet {job.fleet!r} " if job.fleet else ""
    memory = f" and {job.memory_mb} MB memory" if job.memory_mb else ""
    return f"waiting: no running instance {where}has {job.cpus:g} cpus{memory}"


def place(jobs: list[JobDemand], instances: list[Capacity]) -> list[tuple[int, str]]:
    """Assign jobs (in the given priority order) to instances.

    Idle instances are preferred (spreading work), then the instance that leaves the
    least cpu free (packing). A job that fits nowhere now is skipped, not blocking
    later, smaller jobs. The capacities are updated in place.

    A job looks only at its fleet's instances that still have room, and once a job of
    some shape (fleet, cpus, memory) fits nowhere, later jobs of that shape are skipped
    unlooked (room only shrinks while placing): a pass over a full fleet, or over jobs
    of a fleet without room, no longer costs jobs x instances (200 queued jobs and
    1,000 full instances: 60 ms before). The choices are those of trying every
    instance for every job."""
    out: list[tuple[int, str]] = []
    if not jobs:
        return out
    smallest = min(job.cpus for job in jobs)
    room = _Room(instances, smallest)
    unplaceable: set[tuple[str | None, float, int]] = set()
    for job in jobs:
        shape = (job.fleet, job.cpus, job.memory_mb)
        if shape in unplaceable:
            continue
        best = room.best_for(job)
        if best is None:
            unplaceable.add(shape)
            continue
        room.take(best, job)
        out.append((job.job_id, best.instance_id))
    return out


def place_exhaustively(jobs: list[JobDemand], instances: list[Capacity]) -> list[tuple[int, str]]:
    """The specification `place` keeps, and how it worked before: every instance tried
    for every job (jobs x instances). For the tests and benchmarks that compare them."""
    out: list[tuple[int, str]] = []
    for job in jobs:
        candidates = [c for c in instances if c.fits(job)]
        if not candidates:
            continue
        best = min(
            candidates,
            key=lambda c: (c.running > 0, c.free_cpus - job.cpus, c.order, c.instance_id),
        )
        best.used_cpus += job.cpus
        best.used_memory_mb += job.memory_mb
        best.running += 1
        out.append((job.job_id, best.instance_id))
    return out


# a bucket's entry: (order, instance_id, position in the pass's list, the instance)
_Entry = tuple[tuple[int, ...], str, int, Capacity]


def _rank_in_bucket(e: _Entry) -> tuple[tuple[int, ...], str, int]:
    return e[:3]


class _Room:
    """The instances `place` may still use, in buckets of equal rank for any one job:
    per fleet, by (busy, free cpus), each bucket in (order, id, position) order. The
    best instance for a job is the first fitting one of some bucket, so a job looks at
    the head of each bucket its cpus fit in, not at every instance."""

    def __init__(self, instances: list[Capacity], smallest: float):
        self.smallest = smallest  # no job of this pass asks for less cpu
        self.fleets: dict[str | None, dict[tuple[bool, float], list[_Entry]]] = {}
        for position, c in enumerate(instances):
            if self._usable(c):
                self._bucket(c).append((c.order, c.instance_id, position, c))
        for buckets in self.fleets.values():
            for members in buckets.values():
                members.sort(key=_rank_in_bucket)

    def _usable(self, c: Capacity) -> bool:
        return self.smallest <= c.free_cpus + 1e-9  # as Capacity.fits: some job may fit

    def _bucket(self, c: Capacity) -> list[_Entry]:
        return self.fleets.setdefault(c.fleet, {}).setdefault((c.running > 0, c.free_cpus), [])

    def _add(self, c: Capacity, position: int) -> None:
        if self._usable(c):
            bisect.insort(
                self._bucket(c), (c.order, c.instance_id, position, c), key=_rank_in_bucket
            )

    def best_for(self, job: JobDemand) -> Capacity | None:
        fleets = self.fleets.values() if job.fleet is None else [self.fleets.get(job.fleet, {})]
        best: Capacity | None = None
        best_rank: tuple[bool, float, tuple[int, ...], str] | None = None
        for buckets in fleets:
            for (busy, free), members in buckets.items():
                if job.cpus > free + 1e-9:
                    continue
                for order, instance_id, _position, c in members:
                    if c.fits(job):
                        rank = (busy, free - job.cpus, order, instance_id)
                        if best_rank is None or rank < best_rank:
                            best, best_rank = c, rank
                        break
        return best

    def take(self, c: Capacity, job: JobDemand) -> None:
        buckets = self.fleets[c.fleet]
        key = (c.running > 0, c.free_cpus)
        members = buckets[key]
        at = next(k for k, e in enumerate(members) if e[3] is c)
        position = members.pop(at)[2]
        if not members:
            del buckets[key]
        c.used_cpus += job.cpus
        c.used_memory_mb += job.memory_mb
        c.running += 1
        self._add(c, position)
