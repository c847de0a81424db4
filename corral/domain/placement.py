"""Placement: which instance runs which queued job. Pure best-fit bin packing."""

from __future__ import annotations

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
    """
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
