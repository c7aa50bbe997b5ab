"""Per-row seeds derived from the job seed and the source row: the same spec, the same seeds.

Best-of-K and top-up rounds derive theirs here too, so one spec always gives the same images:

- a row's seed: :func:`derive_seeds` (job seed, source row), or the source's own seed;
- candidate ``c`` of a row (``--candidates K``): :func:`candidate_seeds`; candidate 0 is the
  row's own seed, so the first candidate is the image a job without candidates makes;
- a top-up round's rows (``producer topup``): :func:`round_seeds` (job seed, round, row id).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CANDIDATE_SALT = 0x63616E646964  # "candid": candidate seeds never line up with row seeds
_ROUND_SALT = 0x726F756E64  # "round"


def _finalize(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of ``x + golden`` (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix64(seed: int, values: np.ndarray | list[int]) -> np.ndarray:
    """uint64 SplitMix64 of ``seed * golden + value``: a bijection of ``value`` for a fixed seed.

    Vectorised, so 14M values take well under a second.
    """
    x = np.asarray(values, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _finalize(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + x)


def derive_seeds(job_seed: int, source_rows: np.ndarray | list[int]) -> np.ndarray:
    """uint32 seeds from (job seed, source row): the same spec always gives the same seeds."""
    return (mix64(job_seed, source_rows) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def candidate_seeds(seeds: np.ndarray | list[int], k: int) -> np.ndarray:
    """(rows, k) uint32: candidate ``c`` of a row whose seed is ``s`` is ``s`` for c = 0, else the
    low 32 bits of SplitMix64 of ``(salt ^ s) * golden + c``."""
    s = np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)
    c = np.arange(k, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        mixed = _finalize((s ^ np.uint64(_CANDIDATE_SALT)) * _GOLDEN + c)
    out = (mixed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    out[:, 0] = s[:, 0].astype(np.uint32)
    return out


def round_seeds(job_seed: int, round_number: int, row_ids: np.ndarray | list[int]) -> np.ndarray:
    """uint32 seeds of a top-up round's rows: (job seed, round, row id); row ids are unique in a
    job, so a prompt repeated in a round, or in another round, gets another seed."""
    round_key = int(mix64(_ROUND_SALT ^ (job_seed & 0xFFFFFFFFFFFFFFFF), [round_number])[0])
    return (mix64(round_key, row_ids) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
