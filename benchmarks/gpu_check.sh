#!/usr/bin/env bash
# Issue 30's GPU check, run ON the lent GPU machine ("device") from the repository root, with the
# wheels that benchmarks/device_bundle.sh built here carried along:
#
#   device run, carry [".device"], timeout_s 420:   bash benchmarks/gpu_check.sh
#
# 1. install: raysim's wheel, rebuilt from the carried tree (pip wheel --no-build-isolation; the
#    bundle's copy only if that fails), and every wheel in .device/wheels (slim Ray, jsonschema,
#    pydantic, tensorboardX, opacus, segmentation-models-pytorch, ...) with --no-deps into
#    /tmp/raysim-site, put first on PYTHONPATH of the device's python3 (which has torch, timm,
#    pandas, pyarrow: nothing of it is replaced). A spare (.device/wheels/spare: timm, packaging,
#    typing_extensions) goes in only where the device's own version misses what needs.json asks.
#    Then the imports, and which requirements the device still misses (a warning, not a stop).
# 2. doctor: `python -m raysim.doctor --json $OUT/doctor.json` (timeout $DOCTOR_S, 100 s).
# 3. packing: `python benchmarks/gpu_packing.py --quick --out /tmp/gpu-packing` (timeout
#    $PACKING_S, 230 s, cut to what is left of $TOTAL_S, 330 s, for the whole script).
# Whatever happened, $OUT gets (the device returns 8 files at most, 2 folders down at most):
#   gpu_check.log (all of the output), doctor.json, gpu-packing/gpu_packing.json,
#   gpu-packing/gpu_packing.md, gpu-packing/logs-results.tar.gz (gpu_packing's logs/ and
#   results/), and gpu-packing/logs/*.log too where they fit in the 8 files.
# Exit: 0 when every step passed, else the first failing step's code (3: the device's Python is
# not the bundle's; 124: a step ran out of time).
#
# Environment: OUT (default /tmp/gpu-check-out), PYTHON (python3), WHEELS (.device/wheels),
# TOTAL_S, DOCTOR_S, PACKING_S, GPU_PACKING_ARGS (default --quick; --cpu-smoke checks this
# script on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-/tmp/gpu-check-out}
py=${PYTHON:-python3}
wheels=${WHEELS:-$root/.device/wheels}
site=/tmp/raysim-site
work=/tmp/raysim-gpu-check
packing_out=/tmp/gpu-packing
read -r -a packing_args <<<"${GPU_PACKING_ARGS:---quick}"
total_s=${TOTAL_S:-330}
doctor_s=${DOCTOR_S:-100}
packing_s=${PACKING_S:-230}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1
mkdir -p "$OUT"
steps=()

# The requirements in needs.json that this Python misses. `spares`: print the spare wheels that
# fix them (stdout; what goes in, on stderr); `report`: name every one still missed (stderr).
needs() {
  "$py" - "$wheels" "$1" <<'PY'
import importlib.metadata as md, json, sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canon
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as canon

folder, mode = Path(sys.argv[1]), sys.argv[2]
needs = json.loads((folder / "needs.json").read_text())
missing: dict[str, list[str]] = {}
for need in needs["device"]:
    req = Requirement(f"{need['name']}{need['specifier']}")
    try:
        version = md.version(need["name"])
    except md.PackageNotFoundError:
        version = None
    if version is None or not req.specifier.contains(version, prereleases=True):
        missing.setdefault(canon(need["name"]), []).append(f"{need['name']}{need['specifier'] or ''} (from {need['from']}; here {version or 'none'})")
for name, why in sorted(missing.items()):
    spare = needs["spares"].get(name)
    fits = spare and all(Requirement(f"{n['name']}{n['specifier']}").specifier.contains(Path(spare).name.split("-")[1], prereleases=True)
                         for n in needs["device"] if canon(n["name"]) == name)
    if mode == "spares" and fits:
        print(folder / spare)
        print(f"gpu_check: the spare {spare} goes in for {'; '.join(why)}", file=sys.stderr)
    elif mode == "report":
        print(f"gpu_check: warning: unmet: {'; '.join(why)}", file=sys.stderr)
PY
}

step_install() {
  [ -f "$wheels/needs.json" ] || { echo "gpu_check: no $wheels/needs.json: run benchmarks/device_bundle.sh here first and carry .device"; return 3; }
  local want have
  want=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"])' "$wheels/needs.json") || return
  have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return
  if [ "$want" != "$have" ]; then
    echo "gpu_check: $py is Python $have, the bundle is for $want: rebuild it here with benchmarks/device_bundle.sh --python $have"
    return 3
  fi
  rm -rf "$site" "$work"
  mkdir -p "$work/src" "$work/dist" || return
  # raysim from the tree that came with this call, built from a copy (setuptools writes build/).
  find . -maxdepth 1 -type f -exec cp -p {} "$work/src/" \; || return
  local folder
  for folder in $("$py" -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(" ".join(sorted({l.split("=")[1].strip().split("/")[0] for l in c["options"]["package_dir"].splitlines() if "=" in l})))'); do
    tar cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' "$folder" | tar xf - -C "$work/src" || return
  done
  local raysim_wheel
  if "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"; then
    raysim_wheel=$(ls "$work"/dist/raysim-*.whl) || return
  else
    raysim_wheel=$(ls "$wheels"/raysim-*.whl) || return
    echo "gpu_check: warning: building raysim from this tree failed; installing the bundle's $(basename "$raysim_wheel") ($(sed -n 2p "$wheels/MANIFEST.txt"))"
  fi
  local spares=()
  mapfile -t spares < <(needs spares)
  local others=()
  mapfile -t others < <(find "$wheels" -maxdepth 1 -name '*.whl' ! -name 'raysim-*.whl' | sort)
  echo "gpu_check: installing $(basename "$raysim_wheel"), ${#others[@]} bundled and ${#spares[@]} spare wheels into $site"
  "$py" -m pip install -q --no-deps --no-compile --target "$site" "$raysim_wheel" "${others[@]}" "${spares[@]}" || return
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
  needs report
  (cd "$work" && "$py" - "$site" <<'PY'
import sys
import importlib.metadata as md

import jsonschema, opacus, pydantic, segmentation_models_pytorch, tensorboardX, timm, torch  # noqa: F401
import ray, ray.tune  # noqa: F401
import raysim, raysim.algorithms, raysim.datasets  # noqa: F401

if not raysim.__file__.startswith(sys.argv[1]):
    sys.exit(f"gpu_check: raysim imported from {raysim.__file__}, not from {sys.argv[1]}")
print("gpu_check: imports ok:", ", ".join(f"{n} {md.version(n)}" for n in ("raysim", "ray", "torch", "timm", "pandas", "pyarrow", "numpy", "opacus", "segmentation_models_pytorch")))
print(f"gpu_check: torch CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s)"
      + (f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
  )
}

step_doctor() {
  local rc=0
  (cd "$work" && timeout -k 10 "$doctor_s" "$py" -m raysim.doctor --json "$OUT/doctor.json") || rc=$?
  return "$rc"
}

step_packing() {
  local left=$((total_s - (SECONDS - start) - 15)) rc=0
  [ "$left" -lt "$packing_s" ] || left=$packing_s
  if [ "$left" -lt 60 ]; then
    echo "gpu_check: only ${left}s left of TOTAL_S=$total_s: gpu_packing.py not started"
    return 124
  fi
  echo "gpu_check: python benchmarks/gpu_packing.py ${packing_args[*]} --out $packing_out (timeout ${left}s)"
  timeout -k 10 "$left" "$py" benchmarks/gpu_packing.py "${packing_args[@]}" --out "$packing_out" || rc=$?
  return "$rc"
}

collect() {
  local dest=$OUT/gpu-packing f
  mkdir -p "$dest"
  for f in gpu_packing.json gpu_packing.md; do
    [ ! -f "$packing_out/$f" ] || cp "$packing_out/$f" "$dest/"
  done
  local parts=()
  for f in logs results; do [ ! -d "$packing_out/$f" ] || parts+=("$f"); done
  if [ ${#parts[@]} -gt 0 ]; then
    tar czf "$dest/logs-results.tar.gz" -C "$packing_out" "${parts[@]}"
    local logs=() used
    [ ! -d "$packing_out/logs" ] || mapfile -t logs < <(find "$packing_out/logs" -maxdepth 1 -type f)
    used=$(find "$OUT" -type f | wc -l)
    [ -f "$OUT/gpu_check.log" ] || used=$((used + 1))
    if [ ${#logs[@]} -gt 0 ] && [ $((used + ${#logs[@]})) -le 8 ]; then
      mkdir -p "$dest/logs"
      cp "${logs[@]}" "$dest/logs/"
    fi
  fi
  echo "gpu_check: in $OUT:"
  (cd "$OUT" && find . -type f -printf '  %P (%s bytes)\n' | sort)
}

main() {
  start=$SECONDS
  rm -rf "$packing_out" "$OUT/doctor.json" "$OUT/gpu-packing"  # nothing of an earlier run is taken for this one's
  echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n); $("$py" -V 2>&1) at $(command -v "$py")"
  nvidia-smi -L 2>/dev/null || echo "gpu_check: no nvidia-smi"
  local first=0 name rc t0
  for name in install doctor packing; do
    if [ "$name" != install ] && [ "${steps[0]##* }" != 0 ]; then
      echo "gpu_check: $name skipped: the install failed"
      steps+=("$name skipped -")
      continue
    fi
    echo
    echo "=== gpu_check: $name ($((SECONDS - start)) s in) ==="
    t0=$SECONDS
    rc=0
    "step_$name" || rc=$?
    steps+=("$name $((SECONDS - t0))s $rc")
    echo "=== gpu_check: $name: exit $rc after $((SECONDS - t0)) s ==="
    [ "$rc" = 0 ] || [ "$first" != 0 ] || first=$rc
  done
  collect || echo "gpu_check: warning: collecting the outputs failed"
  echo
  echo "gpu_check: step seconds exit:"
  printf '  %s\n' "${steps[@]}"
  echo "gpu_check: exit $first after $((SECONDS - start)) s"
  return "$first"
}

set +e
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
