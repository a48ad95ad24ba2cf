#!/bin/bash
# Served A/B of two source trees (e.g. a worktree of an older commit vs this checkout), run
# alternately on one machine: each variant gets a fresh server (defaults: shipped drafter,
# the "auto" schedule), one 16-token warm-up request, then `service.bench_serve --url`
# (speculation on and off at concurrency 1 and 4, 2 requests per client, 64 tokens each).
#
#   git worktree add /tmp/old <commit>
#   bash loadtest/ab_trees.sh /tmp/old . uvicorn 2 ab.txt     # or ray (`dflash serve`)
#
# OMP_WAIT_POLICY is unset for both servers (each tree's own code decides). AB_ENV_OLD and
# AB_ENV_NEW add environment settings to one variant's server (NAME=value ...), so one tree
# can be compared with itself under two settings:
#   AB_ENV_OLD="RAY_worker_niceness=15" AB_ENV_NEW="RAY_worker_niceness=0" \
#     bash loadtest/ab_trees.sh . . ray 2 nice.txt
set -u
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); runtime=$3; reps=$4; out=$5
py=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
for rep in $(seq "$reps"); do
  for v in old new; do
    dir=$old; extra=${AB_ENV_OLD:-}
    [ "$v" = new ] && dir=$new && extra=${AB_ENV_NEW:-}
    port=$((8600 + rep))
    if [ "$runtime" = ray ]; then
      args=(-m service.entry serve --port "$port" --log-level WARNING)
    else
      args=(-m service.cli --runtime uvicorn --port "$port" --log-level WARNING)
    fi
    (cd "$dir" && env -u OMP_WAIT_POLICY RAY_AUTH_MODE=disabled PYTHONPATH="$dir" $extra "$py" "${args[@]}" \
       > "/tmp/ab_trees_$v.log" 2>&1 &)
    for i in $(seq 300); do curl -s "localhost:$port/health" 2>/dev/null | grep -q '"ok"' && break; sleep 1; done
    model=$(curl -s "localhost:$port/v1/models" | "$py" -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
      -d "{\"model\":\"$model\",\"prompt\":\"Hello\",\"max_tokens\":16}" > /dev/null
    echo "== rep $rep $v ($dir, $runtime${extra:+, $extra})" >> "$out"
    ps -eo ni=,args= | grep -E 'ServeReplica|ProxyActor|raylet|gcs_server' | grep -v grep | cut -c1-90 >> "$out"
    (cd "$new" && "$py" -m service.bench_serve --url "http://127.0.0.1:$port" --model "$model" --concurrency 1,4 \
       --per-client 2 2>&1 | grep -v '^ *{' >> "$out")
    pkill -INT -f -- "--port $port --log-level WARNING"; sleep 15
    [ "$runtime" = ray ] && "$(dirname "$py")/ray" stop --force > /dev/null 2>&1
    sleep 3
  done
done
