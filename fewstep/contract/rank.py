"""Best-of-K: the ``--rank-by`` expression and the job spec's ``candidates`` entry.

A rank expression is arithmetic over score columns (``clip_score``,
``aesthetic + 0.1*clip_score``): names, numbers, ``+ - * /``, unary minus and parentheses,
parsed with :mod:`ast` and evaluated node by node over numpy arrays; nothing else is
accepted (no calls, attributes, subscripts, comparisons), so nothing of the text is executed.
Higher is better; a candidate whose value is not a number (a null score, 0/0) ranks last.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewstep import UserError
from fewstep.contract.seeds import candidate_seeds

KEEP_BEST, KEEP_ALL = "best", "all"
KEEPS = (KEEP_BEST, KEEP_ALL)

_OPERATORS = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.divide,
}


@dataclass(frozen=True)
class RankBy:
    """A parsed rank expression: its text, the columns it names, its tree."""

    text: str
    names: tuple[str, ...]
    tree: ast.expr

    def evaluate(self, columns: dict[str, Any], rows: int) -> np.ndarray:
        """float64 values for ``rows`` rows; ``columns`` maps each name to its values (None: null)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            value = _evaluate(self.tree, columns, rows)
        return np.broadcast_to(np.asarray(value, dtype=np.float64), (rows,)).copy()


def _evaluate(node: ast.expr, columns: dict[str, Any], rows: int):
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](
            _evaluate(node.left, columns, rows), _evaluate(node.right, columns, rows)
        )
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, columns, rows)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name):
        values = columns[node.id]
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(node.value)  # a number (checked by parse_rank_by)


def _check(node: ast.AST, text: str) -> list[str]:
    """The names under ``node``; anything but arithmetic on names and numbers is refused."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _check(node.left, text) + _check(node.right, text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        return _check(node.operand, text)
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return []
    raise UserError(
        f"--rank-by {text!r}: only score columns, numbers, + - * / and parentheses are allowed "
        f"({type(node).__name__} is not)"
    )


def parse_rank_by(text: str, columns: tuple[str, ...] | list[str]) -> RankBy:
    """Parse ``text``; every name must be one of ``columns`` (the job's score columns)."""
    if not text or not text.strip():
        raise UserError("--rank-by is empty: give a score column, e.g. --rank-by clip_score")
    if len(text) > 500:
        raise UserError("--rank-by is longer than 500 characters")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise UserError(
            f"--rank-by {text!r} is not an expression (e.g. 'aesthetic + 0.1*clip_score')"
        ) from None
    names = tuple(dict.fromkeys(_check(tree, text)))
    unknown = [n for n in names if n not in columns]
    if unknown:
        have = ", ".join(columns) or "none: add --score"
        raise UserError(
            f"--rank-by {text!r} names {', '.join(unknown)}, not a score column of this job "
            f"(its --score columns: {have})"
        )
    if not names:
        raise UserError(f"--rank-by {text!r} names no score column")
    return RankBy(text.strip(), names, tree)


def job_candidates(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The job's best-of-K entry (``k``, ``rank_by``, ``keep``), or None for one image a prompt."""
    return spec.get("candidates") or None


def images_per_prompt(spec: dict[str, Any]) -> int:
    """Images a prompt stores: K with ``--keep all``, else 1 (the kept candidate)."""
    c = job_candidates(spec)
    return int(c["k"]) if c and c.get("keep") == KEEP_ALL else 1


def candidates_generated(spec: dict[str, Any]) -> int:
    """Images generated per prompt: K with candidates, else 1."""
    c = job_candidates(spec)
    return int(c["k"]) if c else 1


def choose(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For groups of ``k`` consecutive candidates' rank ``values``: each group's kept index (the
    highest value, the first of equals; a non-number ranks last) and each candidate's rank in
    its group (0 = best)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, k)
    keyed = np.where(np.isnan(v), -np.inf, v)
    # Stable sort of the negated values: equal values keep candidate order; NaN after -inf.
    order = np.lexsort((np.arange(k)[None, :].repeat(len(v), 0), np.isnan(v), -keyed), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(k)[None, :].repeat(len(v), 0), axis=-1)
    return order[:, 0], ranks


def candidate_rows(rows: dict[str, list], k: int) -> dict[str, list]:
    """``--keep all``: a manifest's rows as the K rows each its shard stores (row ``r`` → rows
    ``r·K + c``, with candidate ``c``'s seed); the other columns repeat. The worker generates
    these rows, ``producer verify`` checks the metadata against them."""
    out = {name: [v for v in values for _ in range(k)] for name, values in rows.items()}
    out["row_id"] = [r * k + c for r in rows["row_id"] for c in range(k)]
    out["seed"] = candidate_seeds(rows["seed"], k).ravel().tolist()
    return out


def expected_seeds(
    spec: dict[str, Any], manifest_seeds: list[int], candidates: list[int | None]
) -> list[int | None]:
    """The ``seed`` each stored row must have: with ``--keep best``, the kept candidate's seed
    of the manifest row's seed; otherwise (already expanded for ``--keep all``) the manifest's."""
    c = job_candidates(spec)
    if c is None or c.get("keep") == KEEP_ALL:
        return list(manifest_seeds)
    table = candidate_seeds(manifest_seeds, int(c["k"]))
    return [None if i is None else int(table[n, i]) for n, i in enumerate(candidates)]
