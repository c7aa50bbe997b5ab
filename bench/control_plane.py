"""The control plane at a 10,000-shard job's scale: recovery scans and ``producer gc``, new against old.

**Recovery.** A local redis-server holds a job's 10,000 shard messages (sent by the
project's own ``send_shards``), WORKERS deliveries in kombu's ``unacked`` hash (taken with
kombu's own ``basic_get``, so the hash and its index are written by kombu), and WORKERS
liveness keys published with ``publish_liveness``, each naming its worker's delivery; then
EXTRA more deliveries (retry countdowns), spread over the same workers. Measured, in this
process: ``Recoverer.scan()`` (what the one elected recoverer runs every ``scan_seconds``),
``publish_liveness`` and ``lead`` (what every worker runs), and the old per-worker pass,
``restore_orphans`` of commit 1cac223 (loaded from ``git show``, never copied into the tree),
which every worker ran every 15 s. Per call: wall time (median, p95), this process's CPU,
Redis's own CPU (``INFO cpu``) and the commands Redis counted (``INFO commandstats``).

**gc.** A job of SHARDS shards × IMAGES images, laid out as workers leave it: each shard
committed (its attempt's record ``committed`` with ``commit_sent``, its marker parquet naming
that attempt, its images), and every LOSER_EVERY-th shard with a losing attempt's full image
folder (record ``superseded``, ``commit_sent: false``). Image objects are empty files on a
local directory and 3-byte objects on SeaweedFS (written through its filer's HTTP API, eight
times boto3's rate here): gc reads names and sizes, never bytes. Each
``producer gc`` (the new one, and the old one of 1cac223 loaded from ``git show``) runs in a
fresh child process, through its click command with ``--json``: wall time, CPU and peak RSS of
the child (``wait4``), SeaweedFS's CPU meanwhile, requests sent
(``fewstep.storage.requests_sent``). The losers are laid out again before each ``--delete``.

    python -m bench.control_plane            # the issue's scale (takes a while)
    python -m bench.control_plane --quick    # a tiny run that checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.harness import BUCKET, _cpu_seconds, local_redis, local_services, machine  # noqa: E402
from fewstep.contract import (  # noqa: E402
    JOB_SPEC_KEY,
    ShardMessage,
    attempt_key,
    image_key,
    manifest_key,
    metadata_key,
    queue_name,
)

#: The commit whose recovery and gc are "old": the parent of issue 22's changes.
OLD = "1cac223"


def old_module(path: str) -> types.ModuleType:
    """The module at ``path`` as it was at :data:`OLD`, from ``git show`` (never written to the tree)."""
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"the old {path} needs this clone's history (commit {OLD}): {shown.stderr.strip()}")
    source = shown.stdout
    name = "old_" + path.removesuffix(".py").replace("/", "_")
    module = types.ModuleType(name)
    module.__file__ = f"{OLD}:{path}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# --- recovery ----------------------------------------------------------------------------------


class RedisMeter:
    """Redis's own view of some calls: its CPU (``INFO cpu``) and commands (``INFO commandstats``)."""

    def __init__(self, client):
        self.client = client

    def _read(self) -> tuple[float, dict[str, int]]:
        cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
        return cpu["used_cpu_user"] + cpu["used_cpu_sys"], calls

    def measure(self, call: Callable[[], object], repeat: int) -> dict:
        """Run ``call`` ``repeat`` times: per call wall (median, p95), this process's CPU,
        Redis's CPU and the commands it counted (``INFO`` itself left out)."""
        walls, cpus = [], []
        cpu0, calls0 = self._read()
        for _ in range(repeat):
            c, t = time.process_time(), time.perf_counter()
            call()
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        cpu1, calls1 = self._read()
        commands = {
            k: (calls1[k] - calls0.get(k, 0)) / repeat
            for k in calls1
            if k not in ("info",) and calls1[k] != calls0.get(k, 0)
        }
        walls.sort()
        return {
            "calls": repeat,
            "wall_median_ms": _ms(statistics.median(walls)),
            "wall_p95_ms": _ms(walls[min(len(walls) - 1, round(0.95 * (len(walls) - 1)))]),
            "wall_total_s": round(sum(walls), 3),
            "cpu_ms": _ms(sum(cpus) / repeat),  # this (the bench) process, per call
            "redis_cpu_ms": _ms((cpu1 - cpu0) / repeat),
            "redis_commands": round(sum(commands.values()), 1),
            "redis_commands_by_name": {k: round(v, 1) for k, v in sorted(commands.items())},
        }


def deliver(app, queue: str, count: int) -> list[str]:
    """Take ``count`` messages off ``queue`` with kombu's own ``basic_get`` (unacked): kombu writes
    them to ``unacked`` and ``unacked_index`` as it does for a worker. Their delivery tags."""
    tags = []
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        channel.do_restore = False  # closing the channel must leave them unacked, as a kill does
        for _ in range(count):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                raise SystemExit(f"queue {queue} ran dry after {len(tags)} deliveries")
            tags.append(str(message.delivery_tag))
    return tags


def recovery_bench(args: argparse.Namespace) -> dict:
    """The recovery scans, new and old, on one broker state (two: without and with EXTRA)."""
    from fewstep.queue import celery_app, redis_client, send_shards
    from fewstep.recovery import Recoverer, lead, publish_liveness, recovery_settings

    old = old_module("fewstep/recovery.py")
    cfg = recovery_settings()
    app, client = celery_app(), redis_client()
    meter = RedisMeter(client)
    queue = queue_name("bench", "tiny")
    job = f"s3://{BUCKET}/scale/recovery-job"
    started = time.perf_counter()
    send_shards(app, (ShardMessage(job, s, manifest_key(s)) for s in range(1, args.shards + 1)), queue)
    out: dict = {"queue": queue, "sent": args.shards, "send_s": round(time.perf_counter() - started, 2)}
    workers = [f"bench-worker-{w:04d}@host{w % 50}:{1000 + w}:cuda0" for w in range(args.workers)]
    held: dict[str, set[str]] = {w: set() for w in workers}
    ttl = 3600.0  # the bench's keys must outlive its own minutes; the TTL's value costs nothing

    def publish_all() -> None:
        for w in workers:
            publish_liveness(client, w, queue, held[w], ttl)

    cases = (("one delivery per worker", args.workers), (f"+{args.extra} retry countdowns", args.extra))
    for case, count in cases:
        for i, tag in enumerate(deliver(app, queue, count)):
            held[workers[i % len(workers)]].add(tag)
        publish_all()
        unacked = client.hlen("unacked")
        print(f"\n[{case}] queue {client.llen(queue)}, unacked {unacked}, {len(workers)} liveness keys")
        recoverer = Recoverer(client, lambda _queue: True, cfg["liveness_ttl"], cfg["restore_after"])
        found = recoverer.scan()  # also warms up: loads the scripts it may use
        assert (found.held_by_live_workers, found.watching, found.restored) == (unacked, 0, []), found
        new_scan = meter.measure(recoverer.scan, args.scans)
        new_scan["result"] = recoverer.scan().to_json() | {"restored": 0}
        assert old.restore_orphans(client, queue, 30).held_by_live_workers == unacked
        old_pass = meter.measure(lambda: old.restore_orphans(client, queue, 30), args.old_passes)
        w, tags = workers[0], held[workers[0]]
        publish = meter.measure(
            lambda w=w, t=tags: publish_liveness(client, w, queue, t, ttl), args.publishes
        )
        old_publish = meter.measure(
            lambda w=w, t=tags: old.publish_liveness(client, w, queue, t, ttl), args.publishes
        )
        leads = meter.measure(lambda w=w: lead(client, w, 3 * cfg["scan_seconds"]), args.publishes)
        result = {
            "unacked": unacked,
            "new_scan": new_scan,
            "old_pass": old_pass,
            "publish_liveness": publish,
            "old_publish_liveness": old_publish,
            "lead": leads,
            "fleet_per_15s": fleet_per_15s(
                cfg, args.workers, new_scan, old_pass, publish, old_publish, leads
            ),
        }
        out[case] = result
        for name in ("new_scan", "old_pass", "publish_liveness", "old_publish_liveness", "lead"):
            m = result[name]
            print(
                f"  {name:21} ×{m['calls']:<4} wall median {m['wall_median_ms']:9.2f} ms, p95 "
                f"{m['wall_p95_ms']:9.2f} ms; CPU {m['cpu_ms']:8.2f} ms (bench) {m['redis_cpu_ms']:8.2f} ms "
                f"(Redis); {m['redis_commands']:7.1f} commands {m['redis_commands_by_name']}"
            )
        for side, f in result["fleet_per_15s"].items():
            print(f"  fleet per 15 s, {side}: {f}")
    return out


def fleet_per_15s(cfg, workers: int, scan, old_pass, publish, old_publish, leads) -> dict:
    """The whole fleet's recovery work per 15 s, from the per-call figures.

    New: one recoverer scans every ``scan_seconds``; every worker renews (or asks for) the
    lease every ``scan_seconds`` and publishes every ``liveness_seconds``. Old (1cac223's
    ``[recovery]``: scan 15 s, liveness 5 s): every worker ran a whole pass every 15 s and
    published every 5 s."""
    scans = 15 / cfg["scan_seconds"]
    publishes = 15 / cfg["liveness_seconds"]

    def total(parts: list[tuple[float, dict]]) -> dict:
        return {
            "client_wall_s": round(sum(n * m["wall_total_s"] / m["calls"] for n, m in parts), 3),
            "client_cpu_s": round(sum(n * m["cpu_ms"] for n, m in parts) / 1000, 3),
            "redis_cpu_s": round(sum(n * m["redis_cpu_ms"] for n, m in parts) / 1000, 3),
            "redis_commands": round(sum(n * m["redis_commands"] for n, m in parts)),
        }

    return {
        "new scans only": total([(scans, scan)]),
        "old scans only": total([(workers, old_pass)]),
        "new with publishing and leases": total(
            [(scans, scan), (workers * scans, leads), (workers * publishes, publish)]
        ),
        "old with publishing": total([(workers, old_pass), (workers * 3, old_publish)]),
    }


# --- gc ------------------------------------------------------------------------------------------


def committed_id(shard: int) -> str:
    return f"20261206T000100.000000Z-c{shard:07x}"


def loser_id(shard: int) -> str:
    return f"20261206T000000.000000Z-l{shard:07x}"


def _record(shard: int, attempt: str, state: str) -> bytes:
    times = {"started_at": "2026-12-06T00:00:00.000+00:00", "ended_at": "2026-12-06T00:05:00.000+00:00"}
    record = {"id": attempt, "shard": shard, "round": 1, "worker": "bench:1:cpu", "state": state}
    return json.dumps(record | {"commit_sent": state == "committed"} | times).encode()


def _marker(attempt: str, rows: int) -> bytes:
    # What gc reads of a marker is its attempt_id column (every row names the one attempt).
    buffer = io.BytesIO()
    pq.write_table(pa.table({"attempt_id": [attempt] * rows}), buffer)
    return buffer.getvalue()


def job_objects(shards: int, images: int, loser_every: int, losers_only: bool = False):
    """(key, bytes) of the job: spec, per shard its records, marker and images, losers' images."""
    if not losers_only:
        spec = {"job": "scale", "layout": "files", "counts": {"shards": shards, "prompts": shards * images}}
        yield JOB_SPEC_KEY, json.dumps(spec).encode()
    marker = {}
    for shard in range(1, shards + 1):
        rows = range((shard - 1) * images, shard * images)
        lost = loser_every and shard % loser_every == 0
        if lost:
            if not losers_only:
                yield attempt_key(shard, loser_id(shard)), _record(shard, loser_id(shard), "superseded")
            for row in rows:
                yield image_key(shard, loser_id(shard), row, "png"), b""
        if losers_only:
            continue
        won = committed_id(shard)
        yield attempt_key(shard, won), _record(shard, won, "committed")
        if won not in marker:
            marker = {won: _marker(won, images)}
        yield metadata_key(shard), marker[won]
        for row in rows:
            yield image_key(shard, won, row, "png"), b""


def lay_out_local(root: Path, objects) -> int:
    """Write the objects as a LocalStore holds them (a file per key); how many."""
    made: set[str] = set()
    count = 0
    for key, data in objects:
        folder, _, _name = key.rpartition("/")
        if folder not in made:
            (root / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        fd = os.open(root / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if data:
            os.write(fd, data)
        os.close(fd)
        count += 1
    return count


def lay_out_filer(port: int, folder: str, objects, threads: int) -> int:
    """PUT the objects (empty images as 3 bytes) through SeaweedFS's filer HTTP API into the
    bucket's ``folder``, ``threads`` at a time; how many. Eight times the rate of boto3's S3
    PUTs here (its signing and the S3 gateway's hop): the same objects, listed, read and
    deleted through S3 by gc."""
    local = threading.local()

    def put(item: tuple[str, bytes]) -> int:
        if getattr(local, "http", None) is None:
            local.http = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        local.http.request("PUT", f"/buckets/{BUCKET}/{folder}/{item[0]}", body=item[1] or b"png")
        answer = local.http.getresponse()
        answer.read()
        if answer.status not in (200, 201):
            raise SystemExit(f"filer PUT {item[0]}: {answer.status} {answer.reason}")
        return 1

    count = 0
    with ThreadPoolExecutor(threads) as pool:
        objects = iter(objects)
        while chunk := list(itertools.islice(objects, 10_000)):
            count += sum(pool.map(put, chunk))
    return count


def _vm_hwm_kib() -> int:
    """This process's peak resident set (``VmHWM``), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def gc_child(impl: str, argv: list[str]) -> None:
    """In a fresh process: run ``impl``'s (``new``, ``old``, or ``none``: imports only) gc command
    with ``argv``; print one JSON line: its summary's counts, the time inside, requests sent."""
    from fewstep import storage

    module = old_module("producer/gc.py") if impl == "old" else __import__("producer.gc").gc
    if impl == "none":
        print(json.dumps({"requests_sent": 0, "vm_hwm_kib": _vm_hwm_kib()}))
        sys.stdout.flush()
        os._exit(0)
    started = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.gc_command.main(argv, standalone_mode=False)
    elapsed = time.perf_counter() - started
    summary = json.loads(out.getvalue())
    keys = ("objects", "bytes", "kept_committed_objects", "kept_open_objects")
    found = {k: summary[k] for k in keys} | {"folders": len(summary["folders"])}
    sent = {
        "command_s": round(elapsed, 2),
        "requests_sent": storage.requests_sent(),
        "vm_hwm_kib": _vm_hwm_kib(),
    }
    print(json.dumps(found | sent))
    sys.stdout.flush()
    os._exit(0)  # as producer commands do (pyarrow's teardown, apache/arrow#34314)


def run_gc(impl: str, output: str, job: str, delete: bool, env: dict, storage_pid: int | None) -> dict:
    """One gc in a child process: its own JSON, plus wall, CPU, peak RSS (wait4) and storage CPU."""
    argv = [job, "--output", output, "--json", *(["--delete"] if delete else [])]
    storage0 = _cpu_seconds(storage_pid) if storage_pid else None
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.control_plane", "--gc-child", impl, *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = child.stdout.read(), child.stderr.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"gc {impl} failed ({child.returncode}): {stderr.decode()[-3000:]}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result |= {
        "impl": impl,
        "delete": delete,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        # The child's own high-water mark: wait4's ru_maxrss would carry this (parent)
        # process's, which the child inherits across fork and exec.
        "peak_rss_mib": round(result.pop("vm_hwm_kib") / 1024, 1),
    }
    if storage0 is not None:
        result["storage_cpu_s"] = round(_cpu_seconds(storage_pid) - storage0, 2)
    return result


def gc_bench(
    label: str,
    output: str,
    write: Callable[[object], int],
    count: Callable[[], int],
    shards: int,
    images: int,
    loser_every: int,
    repeat: int,
    env: dict,
    storage_pid: int | None,
) -> dict:
    """Lay the job out with ``write``; gc dry runs (new and old, ``repeat`` times, alternating), then
    ``--delete`` with each (losers laid out again before each); ``count`` checks what is left."""
    losers = shards // loser_every if loser_every else 0
    started = time.perf_counter()
    made = write(job_objects(shards, images, loser_every))
    layout_s = time.perf_counter() - started
    print(f"\n[gc, {label}] {shards} shards × {images} images, {losers} loser folders: {made} objects "
          f"laid out in {layout_s:.1f} s ({made / layout_s:,.0f}/s)")  # fmt: skip
    out = {"shards": shards, "images": images, "loser_folders": losers, "objects_laid_out": made,
           "layout_s": round(layout_s, 1), "runs": []}  # fmt: skip

    def one(impl: str, delete: bool) -> None:
        r = run_gc(impl, output, "scale", delete, env, storage_pid)
        expected = (losers * images, shards * images)
        if impl != "none" and (r["objects"], r["kept_committed_objects"]) != expected:
            raise SystemExit(
                f"gc {impl}: {r['objects']} found, {r['kept_committed_objects']} kept: not {expected}"
            )
        out["runs"].append(r)
        storage = f", SeaweedFS CPU {r['storage_cpu_s']:.1f} s" if "storage_cpu_s" in r else ""
        print(
            f"  gc {impl:4} {'--delete' if delete else 'dry run '}: wall {r['wall_s']:7.1f} s (command "
            f"{r.get('command_s', 0):7.1f} s), CPU {r['cpu_s']:7.1f} s, "
            f"peak RSS {r['peak_rss_mib']:7.1f} MiB, "
            f"{r['requests_sent']:,} requests{storage}"
        )

    one("none", False)
    for _ in range(repeat):
        one("new", False)
        one("old", False)
    for impl in ("new", "old"):
        if impl == "old":
            started = time.perf_counter()
            write(job_objects(shards, images, loser_every, losers_only=True))
            print(f"  losers laid out again in {time.perf_counter() - started:.1f} s")
        one(impl, True)
        left = count()
        if left != shards * images:
            raise SystemExit(f"after gc {impl} --delete {left} images are left, not {shards * images}")
    return out


def local_count(root: Path) -> int:
    return sum(len(files) for _d, _dirs, files in os.walk(root / "images"))


def gc_local(args: argparse.Namespace, env: dict) -> dict:
    """gc on a local directory (LocalStore) at the full scale."""
    with tempfile.TemporaryDirectory(prefix="fewstep-gc-", dir=args.local_dir) as directory:
        root = Path(directory) / "scale"
        try:
            return gc_bench("local directory", directory, lambda objs: lay_out_local(root, objs),
                            lambda: local_count(root), args.shards, args.images, args.loser_every,
                            args.repeat, env, None)  # fmt: skip
        finally:
            started = time.perf_counter()
            shutil.rmtree(root, ignore_errors=True)
            print(f"  removed in {time.perf_counter() - started:.1f} s")


def gc_s3(args: argparse.Namespace, env: dict, svc) -> dict:
    """gc on SeaweedFS (``weed mini`` on 127.0.0.1) at the scale given."""
    from fewstep.storage import open_store

    store = open_store(f"s3://{BUCKET}/gc").child("scale")

    def write(objects) -> int:
        return lay_out_filer(svc.weed_ports["filer"], "gc/scale", objects, args.put_threads)

    def count() -> int:
        return sum(1 for _ in store.list("images/"))

    return gc_bench(f"SeaweedFS, laid out by {args.put_threads} threads", f"s3://{BUCKET}/gc", write,
                    count, args.s3_shards, args.s3_images, args.loser_every, args.repeat, env,
                    svc.weed_pid)  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--gc-child"]:
        gc_child(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script (seconds)")
    p.add_argument("--parts", default="recovery,gc-local,gc-s3", help="which parts, comma-separated")
    p.add_argument("--shards", type=int, default=10_000, help="messages queued; shards of the local gc job")
    p.add_argument("--workers", type=int, default=200, help="liveness keys, one delivery each")
    p.add_argument("--extra", type=int, default=2_000, help="more deliveries, held by the same workers")
    p.add_argument("--scans", type=int, default=50, help="new scans measured per case")
    p.add_argument("--old-passes", type=int, default=200, help="old per-worker passes measured per case")
    p.add_argument("--publishes", type=int, default=1_000, help="publish_liveness and lead calls measured")
    p.add_argument("--images", type=int, default=200, help="images per shard (local gc)")
    p.add_argument("--loser-every", type=int, default=10, help="every Nth shard has a loser attempt's folder")
    p.add_argument("--repeat", type=int, default=1, help="gc dry runs of each, alternating")
    p.add_argument("--local-dir", default=None, help="where the local gc job goes (default: the temp dir)")
    p.add_argument("--s3-shards", type=int, default=1_000, help="shards of the SeaweedFS gc job")
    p.add_argument("--s3-images", type=int, default=200, help="images per shard on SeaweedFS")
    p.add_argument("--put-threads", type=int, default=16, help="threads laying the SeaweedFS job out")
    p.add_argument("--json", dest="json_path", help="write every figure to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.shards, args.workers, args.extra, args.images = 50, 10, 20, 4
        args.scans, args.old_passes, args.publishes, args.s3_shards, args.s3_images = 3, 3, 10, 20, 5
    parts = set(args.parts.split(","))
    print(machine())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    results: dict = {"machine": machine(), "commit": commit, "old": OLD, "args": vars(args)}
    # Redis alone unless SeaweedFS is wanted: --quick without gc-s3 starts in a second.
    services = local_services() if "gc-s3" in parts else local_redis()
    with services as started:
        svc, env = started if "gc-s3" in parts else (None, started)
        if "recovery" in parts:
            results["recovery"] = recovery_bench(args)
        if "gc-local" in parts:
            results["gc_local"] = gc_local(args, env)
        if "gc-s3" in parts:
            results["gc_s3"] = gc_s3(args, env, svc)
    results["machine_after"] = machine()
    print(results["machine_after"])
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
