"""Best-of-K on the device thread: a batch's prompts as K candidates each, scored, and the
candidates kept (``producer enqueue --candidates K --rank-by EXPR [--keep best|all]``).

- ``--keep best``: a shard's rows are its prompts. A batch of n rows is one model call of
  n × K images (row i's candidates at i·K .. i·K+K−1, seeds from
  :func:`fewstep.contract.candidate_seeds`); after scoring, each row keeps its best candidate
  (:func:`fewstep.contract.choose`) and the batch handed on holds n images, as without
  candidates: encoding, upload, layouts and the commit never see the others.
- ``--keep all``: a shard's rows are its prompts' candidates (:func:`expand_rows`: row
  ``r`` becomes rows ``r·K + c``); batches hold whole groups of K, and every candidate is
  stored, ranked within its group.

Either way every stored row records its candidate index, its rank value, and every candidate
of its prompt: seeds, rank values and scores (the ``candidate_*`` list columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fewstep.contract import (
    CANDIDATE_SCORE_PREFIX,
    KEEP_ALL,
    RankBy,
    candidate_seeds,
    choose,
    job_candidates,
    parse_rank_by,
)
from worker.loaded_model import Batch
from worker.scoring import BatchScores


@dataclass(frozen=True)
class Candidates:
    """A job's best-of-K settings, as the worker uses them."""

    k: int
    keep_all: bool
    rank_by: RankBy

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Candidates | None:
        """The job's candidates, or None when it makes one image a prompt."""
        c = job_candidates(spec)
        if c is None:
            return None
        columns = [s["column"] for s in ((spec.get("scoring") or {}).get("scorers") or {}).values()]
        return cls(int(c["k"]), c.get("keep") == KEEP_ALL, parse_rank_by(c["rank_by"], columns))

    def batch_rows(self, size: int) -> int:
        """Shard rows a model call of about ``size`` images covers: whole groups of K."""
        return max(1, size // self.k) * (self.k if self.keep_all else 1)

    def inputs(self, prompts: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
        """The model call's prompts and seeds for a batch's rows (``--keep best``: K per row)."""
        if self.keep_all:
            return list(prompts), list(seeds)
        return [p for p in prompts for _ in range(self.k)], candidate_seeds(seeds, self.k).ravel().tolist()

    def repeat(self, values: list) -> list:
        """Per-row values (conditioning images) for the model call's images."""
        return values if self.keep_all else [v for v in values for _ in range(self.k)]

    def keep(self, batch: Batch, scores: BatchScores, seeds: list[int]) -> tuple[Batch, BatchScores, dict]:
        """The images to store of a scored model call, their scores, and their candidate columns.

        ``seeds``: every image's seed, in the call's order (groups of K consecutive images).
        """
        k = self.k
        groups = len(seeds) // k
        missing = [n for n in self.rank_by.names if n not in scores.columns]
        if missing:
            raise RuntimeError(f"--rank-by {self.rank_by.text}: the batch has no {', '.join(missing)} scores")
        values = self.rank_by.evaluate(scores.columns, len(seeds))
        best, _ranks = choose(values, k)
        kept = np.arange(len(seeds)) if self.keep_all else np.arange(groups) * k + best
        group = kept // k

        def lists(flat: list) -> list[list]:
            per_group = [list(flat[g * k : (g + 1) * k]) for g in range(groups)]
            return [per_group[g] for g in group]

        as_float = [None if np.isnan(v) else float(v) for v in values]
        columns = {
            "seed": [int(seeds[i]) for i in kept],
            "candidate": [int(i % k) for i in kept],
            "rank_score": [as_float[i] for i in kept],
            "candidate_seeds": lists([int(s) for s in seeds]),
            "candidate_rank_scores": lists(as_float),
            **{CANDIDATE_SCORE_PREFIX + name: lists(v) for name, v in scores.columns.items()},
        }
        if self.keep_all:
            return batch, scores, columns
        index = kept.tolist()
        images = batch.images[index]
        kept_batch = Batch(images, [batch.nsfw[i] for i in index], batch.seconds)
        kept_scores = BatchScores(
            {name: [v[i] for i in index] for name, v in scores.columns.items()},
            scores.embeddings[index] if scores.embeddings is not None else None,
            scores.seconds,
        )
        return kept_batch, kept_scores, columns
