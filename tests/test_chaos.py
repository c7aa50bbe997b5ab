"""The seeded chaos run of a real fleet (``bench/chaos.py``, docs/RELIABILITY.md "Chaos run"), one
short seed: six real workers, real Redis (AOF on) and SeaweedFS, every fault kind at least once
while operators run gc --delete, reconcile and retry --failed with short thresholds. The verdict
is the harness's own checker, which reads every committed row's bytes from storage: a committed
image deleted by gc, a prompt lost or doubled, or a hash that differs fails it.

It takes the machine for about four minutes, so it is marked ``slow``: CI runs it after the
parallel part of the suite, alone (``scripts/test.sh``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos import KINDS, LIBFAKETIME, OPS

REPO = Path(__file__).resolve().parent.parent
SEED = 20261206
DURATION = 60  # seconds of faults; start-up, the end phase and the checks come on top


@pytest.mark.slow
@pytest.mark.timeout(1200)  # beside the other slow tests on two cores it may take twice its 4-6 minutes
def test_a_seeded_chaos_run_loses_doubles_and_damages_nothing(tmp_path):
    command = [sys.executable, "-m", "bench.chaos", "--seed", str(SEED), "--duration", str(DURATION),
               "--out", str(tmp_path)]  # fmt: skip
    log = tmp_path / "chaos.log"
    with log.open("wb") as out:
        run = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            run.wait(timeout=960)
        except subprocess.TimeoutExpired:
            run.terminate()  # the harness stops its fleet and services, and writes what it has
            run.wait(timeout=120)
    tail = log.read_text(errors="replace")[-8000:]
    result = json.loads((tmp_path / f"chaos-seed{SEED}.json").read_text())
    assert "verdict" in result, tail  # the run reached its checker
    verdict = result["verdict"]
    assert (verdict["lost"], verdict["duplicated"], verdict["mismatches"], verdict["missing_objects"]) == (
        0, 0, 0, 0,
    ), tail  # fmt: skip
    assert result["failures"] == [] and run.returncode == 0, tail
    assert verdict["rows"] == sum(job["prompts"] for job in result["jobs"]) > 0
    layouts = {job["layout"] for job in result["jobs"]}
    assert layouts == {"files", "webdataset", "parquet"}
    assert any(job["scored"] for job in result["jobs"]) and any(job["conditioned"] for job in result["jobs"])
    # Every fault kind was injected (clock skew only where libfaketime is installed).
    expected = [k for k in KINDS if k != "skew" or Path(LIBFAKETIME).is_file()]
    assert all(result["injected"][k] >= 1 for k in expected), result["injected"]
    assert all(result["operator_commands"][op]["ran"] >= 1 for op in OPS), result["operator_commands"]
    assert all(v["ok"] for v in result["verify"].values())  # producer verify agrees
    # The big job's tars went up in parts, and no unfinished upload outlived the final reconcile.
    uploads = result["multipart"]
    assert uploads["requests_through_proxy"]["create"] >= 1 and uploads["requests_through_proxy"]["part"] >= 1
    assert uploads["unfinished_after_final_reconcile"] == 0, uploads
