"""Several teachers, one label: majority vote, per-row agreement, and the rows worth a human look."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Vote:
    """The majority label of one row, how many teachers gave a label, and the share that agree."""

    label: int | None
    votes: int
    agreement: float
    tied: bool

    @property
    def unanimous(self) -> bool:
        return self.votes > 0 and self.agreement == 1.0


def majority_vote(labels: Sequence[int | None]) -> Vote:
    """The most common label among teachers that gave one (``None``: no label from that teacher).

    A tie goes to the tied label of the earliest teacher in ``labels``: teachers are listed in
    order of preference, and a tied row is flagged (``tied``) for the review table anyway, so
    nothing is hidden by breaking it.
    """
    given = [label for label in labels if label is not None]
    if not given:
        return Vote(None, 0, 0.0, False)
    counts = Counter(given)
    top = max(counts.values())
    leaders = {label for label, count in counts.items() if count == top}
    winner = next(label for label in given if label in leaders)
    return Vote(winner, len(given), top / len(given), len(leaders) > 1)
