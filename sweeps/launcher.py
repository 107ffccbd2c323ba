"""What a sweep launcher is: run (or submit) points, wait for them, and say which
jobs it still holds, so that ``state.point_state`` can tell a running point from
one whose launcher is gone. ``sweeps.local`` and ``sweeps.slurm`` implement it."""

from __future__ import annotations


class Launcher:
    name = "?"
    # Ids of points this launcher left alone because another launcher held them.
    skipped: tuple | list = ()

    def submit(self, sweep, points, before_each=None) -> str:
        """Start ``points``; return a handle to wait on. ``before_each(point)``, where the
        launcher runs its points one after another, is called just before each starts."""
        raise NotImplementedError

    def wait(self, handle: str, timeout_s: float | None = None) -> None:
        """Return when the points of ``handle`` have ended."""
        raise NotImplementedError

    # A launcher whose submit returns at once while its scheduler runs the points.
    detached = False

    def active_jobs(self) -> set[str]:
        """Job ids this launcher's scheduler still holds ('' for none)."""
        return set()

    def describe(self, handle: str, count: int) -> str:
        """What a detached submit says it started."""
        return f"started {count} points ({handle})"
