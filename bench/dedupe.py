"""``producer dedupe``'s search on synthetic embeddings: time and peak memory up to 2M images.

Synthetic 768-d L2-normalised float16 embeddings (random directions, like CLIP ViT-L/14's
size), with planted pairs: exact copies and near copies (cosine ~0.97 to their original).
Each size runs in a fresh process so its peak RSS is its own. Measured: building the index
(k-means training + adding), the range search, peak RSS, and the recall of the planted pairs
(and any pair found that was not planted). The embeddings are generated in memory: reading
them from storage is not part of these figures.

    python bench/dedupe.py --sizes 100000,500000,1000000,2000000 [--threshold 0.95] [--budget 3000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

DIM = 768


def synthetic(n: int, planted: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n float16 unit vectors; ``planted`` exact and ``planted`` near copies of earlier rows."""
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, DIM), np.float16)
    for lo in range(0, n, 65536):
        chunk = rng.standard_normal((min(65536, n - lo), DIM), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        vectors[lo : lo + len(chunk)] = chunk
    rows = rng.choice(n, 4 * planted, replace=False)
    originals, copies = np.minimum(rows[0::2], rows[1::2]), np.maximum(rows[0::2], rows[1::2])
    pairs = set()
    for i, (o, c) in enumerate(zip(originals.tolist(), copies.tolist(), strict=True)):
        source = vectors[o].astype(np.float32)
        if i % 2:  # a near copy: cosine about 0.97 to the original
            noise = rng.standard_normal(DIM).astype(np.float32)
            noise -= noise.dot(source) * source
            noise /= np.linalg.norm(noise)
            source = 0.97 * source + np.sqrt(1 - 0.97**2) * noise
        vectors[c] = source
        pairs.add((o, c))
    return vectors, pairs


def one(n: int, threshold: float, exact: bool) -> dict:
    from producer.dedupe import SearchSettings, build_index, group, search

    settings = SearchSettings.from_config()
    if exact:
        settings = dataclasses.replace(settings, exact_max=n)
    started = time.perf_counter()
    vectors, pairs = synthetic(n, planted=max(10, n // 2000))
    made = time.perf_counter()
    index, how = build_index(vectors, settings)
    built = time.perf_counter()
    a, b, sims = search(index, vectors, threshold, settings.query_batch)
    searched = time.perf_counter()
    group(n, a, b, sims)
    grouped = time.perf_counter()
    found = set(zip(a.tolist(), b.tolist(), strict=True))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rows": n,
        **how,
        "threshold": threshold,
        "generate_s": round(made - started, 1),
        "build_s": round(built - made, 1),
        "search_s": round(searched - built, 1),
        "group_s": round(grouped - searched, 2),
        "dedupe_s": round(grouped - made, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # the whole process, generation included
        "planted_pairs": len(pairs),
        "planted_found": len(pairs & found),
        "other_pairs_found": len(found - pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,500000,1000000,2000000")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--exact", action="store_true", help="Force the exact index at every size.")
    parser.add_argument(
        "--budget", type=float, default=3600, help="Skip sizes once this many seconds passed."
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.threshold, args.exact)))
        return
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}))
    start = time.monotonic()
    for n in (int(s) for s in args.sizes.split(",")):
        if time.monotonic() - start > args.budget:
            print(json.dumps({"rows": n, "skipped": "over --budget"}))
            continue
        cmd = [sys.executable, __file__, "--one", str(n), "--threshold", str(args.threshold)]
        done = subprocess.run(cmd + (["--exact"] if args.exact else []), capture_output=True, text=True)
        print(done.stdout.strip() or json.dumps({"rows": n, "error": done.stderr[-500:]}), flush=True)


if __name__ == "__main__":
    main()
