#!/usr/bin/env bash
# Submit `python -m raysim.run` or `python -m raysim.tune` to a Ray cluster, shipping the
# raysim wheel (cluster/runtime_env.yaml) and sending the cluster's auth token.
#
#   cluster/submit.sh run  --config default --out /shared/runs/demo federation.rounds=3
#   cluster/submit.sh tune tune_configs/fairlora_rank_lr.yaml --num-samples 8 --out /shared/studies/rank_lr
#   cluster/submit.sh stage    # only build build/job (the wheel + tune_configs/), e.g. for cluster/rayjob.yaml
#
# The address is $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS (default http://127.0.0.1:8265, the
# dashboard; use `ray dashboard cluster/aws-gpu.yaml` or a port-forward for a remote head). The
# token is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
# (`ray get-auth-token`). --out must be a path every node reaches (shared filesystem) or, for
# studies, a pyarrow.fs URI such as s3://bucket/studies/x. Extra `ray job submit` options go in
# $RAY_JOB_OPTIONS (e.g. "--no-wait --submission-id my-study"); $PYTHON is the interpreter that
# builds the wheel and runs `ray job submit` (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: cluster/submit.sh run|tune [args...] or cluster/submit.sh stage}
shift
case "$what" in run | tune | stage) ;; *) echo "cluster/submit.sh: first argument must be run, tune or stage, got $what" >&2; exit 2 ;; esac
if [ "$what" = stage ] && [ $# -gt 0 ]; then echo "cluster/submit.sh: stage takes no arguments" >&2; exit 2; fi
python=${PYTHON:-python}
stage=build/job
rm -rf "$stage" && mkdir -p "$stage"
"$python" -m pip wheel . -w "$stage" --no-deps --no-build-isolation -q
cp -r tune_configs "$stage/"
if [ "$what" = stage ]; then
  ls -R "$stage"
  exit 0
fi
export RAY_AUTH_MODE=token
# shellcheck disable=SC2086
exec "$python" -m ray.scripts.scripts job submit --address "${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}" \
  --runtime-env cluster/runtime_env.yaml ${RAY_JOB_OPTIONS:-} -- python -m "raysim.$what" "$@"
