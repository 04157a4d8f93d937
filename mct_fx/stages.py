"""Workflows as a declared list of stages: a list and a loop, no registry.

A :class:`Stage` names itself, says when it runs, and declares how many of the
first calibration batches / images it reads after calibration, so what a
workflow must retain is computed from its list (:func:`retention`) instead of
being added up by hand.  :func:`run_stages` runs the list; an exception keeps
its type and gains a note naming the stage and the stages before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Stage", "retention", "run_stages"]

S = TypeVar("S")


def _always(state: object) -> bool:
    return True


def _none(state: object) -> int:
    return 0


@dataclass(frozen=True)
class Stage(Generic[S]):
    """One step of a workflow over its run state ``S``.

    ``batches`` / ``images``: how many of the first calibration batches / images
    the stage reads (asked once calibration starts, like ``when``).
    """

    name: str
    run: Callable[[S], None]
    when: Callable[[S], bool] = _always
    batches: Callable[[S], int] = _none
    images: Callable[[S], int] = _none


def retention(stages: Sequence[Stage[S]], state: S) -> tuple[int, int]:
    """``(batches, images)``: the most that any of ``stages`` that will run reads."""
    running = [s for s in stages if s.when(state)]
    return max((s.batches(state) for s in running), default=0), max((s.images(state) for s in running), default=0)


def run_stages(workflow: str, stages: Sequence[Stage[S]], state: S) -> S:
    """Run each stage whose ``when`` holds, in order; returns ``state``."""
    done: list[str] = []
    for stage in stages:
        if not stage.when(state):
            continue
        try:
            stage.run(state)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"{workflow}: failed in stage '{stage.name}' (after: {', '.join(done) or 'none'})")
            raise
        done.append(stage.name)
    return state
