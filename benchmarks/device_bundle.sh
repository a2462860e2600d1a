#!/usr/bin/env bash
# Build the wheels that the lent GPU machine ("device") needs to run raysim, on THIS machine
# (which reaches the package registry through pip). The device has torch, timm, pandas, pyarrow,
# numpy and ~200 more packages (the list below, from /work/.library/device/KINDS.md) but no
# Ray, no network, and a call carries at most 64 MiB of working tree; benchmarks/gpu_check.sh
# installs from the folder there.
#
#   benchmarks/device_bundle.sh [--python 3.12] [--dest .device/wheels]
#
#   --python  the device's CPython version (default 3.12: KINDS.md, 2026-11, saw python3 3.12.3
#             at /opt/torch/.venv/bin/python3)
#   --dest    the folder to (re)build (default .device/wheels; emptied first). /.device/ is
#             added to .git/info/exclude, so the folder travels only when a run carries it.
#   $PYTHON   the interpreter that runs pip here (default .venv/bin/python); the Ray version
#             bundled is the one installed in it, and the other wheels are pinned to the
#             versions installed in it where it has them.
#
# The folder gets:
#   - Ray (the official ray==<version> wheel for cp<python> manylinux2014_x86_64), slimmed:
#     ray/jars/ (the Java worker, 32 MB), ray/rllib/, ray/serve/, ray/llm/ and every *.js.map are
#     deleted, *.dist-info/RECORD is rewritten to list exactly the remaining files (sha256, size)
#     and it is zipped again under the same file name (file modes kept: the raylet and the GCS
#     server are executables). Ray's `serve` console script is left in place, broken.
#   - the wheels of setup.cfg's install_requires and of their requirements, walked down to what
#     the device has already (jsonschema & co, pydantic & co, tensorboardX, opacus,
#     segmentation-models-pytorch), --no-deps one by one, for that Python on manylinux x86_64.
#     ray's extra `default` is left out: raysim starts Ray with include_dashboard=False and uses
#     no dashboard, state API, metrics export or runtime_env pip/virtualenv; without those
#     packages Ray runs its per-node agent in minimal mode, as a plain `pip install ray` does.
#     Its missing packages (aiohttp_cors, colorful, py-spy, opencensus + google-api-core & co,
#     opentelemetry-*, smart_open, virtualenv + distlib & co) would add about 12 MB.
#   - raysim's own wheel, built from a copy of this checkout (not in it: setuptools writes build/
#     where it builds). gpu_check.sh rebuilds it from the carried tree on the device and uses
#     this one only when that build fails.
#   - spare/: timm, packaging and typing_extensions at this machine's versions: the device has
#     them, and gpu_check.sh installs a spare only when the device's version does not satisfy
#     what raysim and the bundled wheels ask for (e.g. timm >= 1.0.26).
#   - needs.json: which requirements the device must satisfy itself (name, specifier, who asks),
#     read by gpu_check.sh; MANIFEST.txt: what was built, from which commit.
# At the end it checks every wheel's RECORD, that no requirement is left unbundled and unlisted,
# and prints the folder's size (it must stay well under 64 MiB with the rest of the tree).
set -euo pipefail
usage="usage: benchmarks/device_bundle.sh [--python 3.12] [--dest .device/wheels]"
pyver=3.12
dest=.device/wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --python | --dest)
      [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
      case "$1" in --python) pyver=$2 ;; --dest) dest=$2 ;; esac
      shift 2
      ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "device_bundle.sh: unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || { echo "device_bundle.sh: --python must look like 3.12, got $pyver" >&2; exit 2; }
cd "$(dirname "$0")/.."
root=$PWD
case "$dest" in /*) ;; *) dest=$root/$dest ;; esac
python=${PYTHON:-$root/.venv/bin/python}
ray_version=$("$python" -c 'import importlib.metadata as m; print(m.version("ray"))') || {
  echo "device_bundle.sh: no Ray in $python (set PYTHON to an interpreter that has the Ray version to bundle)" >&2
  exit 1
}

# /.device/ stays out of git (and so travels only when a run carries it).
if ! git check-ignore -q .device/wheels 2>/dev/null; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  echo "/.device/" >>"$exclude"
  echo "device_bundle.sh: added /.device/ to $exclude"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/device-bundle.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"
mkdir -p "$dest/spare"

# The device is Ubuntu-like x86_64 with a recent glibc; these tags cover every wheel needed.
platforms=()
for minor in 28 27 26 25 24 23 22 21 20 19 18 17; do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
target=(--only-binary=:all: --implementation cp --python-version "$pyver" "${platforms[@]}")

echo "device_bundle.sh: ray==$ray_version for CPython $pyver manylinux x86_64 -> $dest"
"$python" -m pip download -q --disable-pip-version-check --no-deps "${target[@]}" -d "$tmp/ray" "ray==$ray_version"
ray_wheel=$(cd "$tmp/ray" && ls ray-*.whl)

# --- slim Ray: drop the folders raysim never loads, rewrite RECORD, zip it again ----------------
"$python" - "$tmp/ray/$ray_wheel" "$dest/$ray_wheel" <<'PY'
import base64, csv, hashlib, io, os, sys, zipfile

src, dst = sys.argv[1:]
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")


def dropped(name: str) -> bool:
    return name.startswith(DROP) or name.endswith(".js.map")


def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


with zipfile.ZipFile(src) as zin:
    infos = zin.infolist()
    records = [i for i in infos if i.filename.endswith(".dist-info/RECORD") and i.filename.count("/") == 1]
    if len(records) != 1:
        sys.exit(f"slim: expected one *.dist-info/RECORD in {src}, found {len(records)}")
    record = records[0]
    kept = [i for i in infos if i is not record and not dropped(i.filename)]
    rows, before, after = [], sum(i.file_size for i in infos), 0
    with zipfile.ZipFile(dst + ".part", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in kept:  # RECORD goes last, as wheel tools write it
            data = zin.read(info)
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.external_attr, new.create_system = info.external_attr, info.create_system  # keeps the executables' modes
            new.compress_type = zipfile.ZIP_STORED if info.is_dir() else zipfile.ZIP_DEFLATED
            zout.writestr(new, data)
            if not info.is_dir():
                rows.append((info.filename, digest(data), str(len(data))))
                after += len(data)
        rows.append((record.filename, "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        new = zipfile.ZipInfo(record.filename, date_time=record.date_time)
        new.external_attr, new.create_system, new.compress_type = record.external_attr, record.create_system, zipfile.ZIP_DEFLATED
        zout.writestr(new, text.getvalue())
os.replace(dst + ".part", dst)
print(f"slim: {len(infos) - len(kept) - 1} files dropped, {len(rows) - 1} kept; {before / 2**20:.0f} -> {after / 2**20:.0f} MiB unpacked, "
      f"{os.path.getsize(src) / 2**20:.1f} -> {os.path.getsize(dst) / 2**20:.1f} MiB zipped")
PY

# --- raysim's own wheel, built from a copy of the files `pip wheel .` reads ----------------------
mkdir -p "$tmp/src"
find . -maxdepth 1 -type f -exec cp -p {} "$tmp/src/" \;
for folder in $("$python" - <<'PY'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["package_dir"].splitlines()
print(" ".join(sorted({line.split("=")[1].strip().split("/")[0] for line in lines if "=" in line})))
PY
); do
  (cd "$root" && tar cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' "$folder") | tar xf - -C "$tmp/src"
done
"$python" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-index -w "$dest" "$tmp/src"

# --- the other wheels: walk the requirements down to what the device has ------------------------
"$python" - "$dest" "$pyver" "$root/setup.cfg" "${target[@]}" <<'PY'
import configparser, email.parser, importlib.metadata as md, json, subprocess, sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon, parse_wheel_filename

dest, pyver, setup_cfg, *target = sys.argv[1:]
dest = Path(dest)
# Python packages already on the device (KINDS.md, "Python packages already there", read 2026-11-17).
DEVICE = set(map(canon, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
OMIT = {"ray": {"default"}}  # extras left out on purpose (see the script's header)
SPARES = ["timm", "packaging", "typing-extensions"]  # on the device, but raysim or a bundled wheel asks for a floor
ENV = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def wheels_in(folder: Path) -> dict[str, Path]:
    return {canon(parse_wheel_filename(p.name)[0]): p for p in folder.glob("*.whl")}


def metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return email.parser.Parser().parsestr(z.read(name).decode())


def holds(req: Requirement, extra: str) -> bool:
    """req applies on the device when `extra` is asked for ("" : the plain requirements)."""
    return req.marker is None or req.marker.evaluate(ENV | {"extra": extra})


def local_pin(req: Requirement) -> str:
    """`name==V` with this machine's version V where it satisfies req, else req as written (no marker)."""
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        version = None
    if version and req.specifier.contains(version, prereleases=True):
        return f"{req.name}=={version}"
    return f"{req.name}{req.specifier}"


def download(spec: str, folder: Path) -> Path:
    before = set(folder.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", *target, "-d", str(folder), spec]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"device_bundle.sh: pip could not download {spec} for CPython {pyver} manylinux x86_64")
    new = set(folder.glob("*.whl")) - before
    if len(new) != 1:
        sys.exit(f"device_bundle.sh: pip download {spec} gave {sorted(p.name for p in new)}")
    return new.pop()


cfg = configparser.ConfigParser()
cfg.read(setup_cfg)
roots = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip() and not line.strip().startswith("#")]
bundled = wheels_in(dest)  # ray (slimmed) and raysim are there already
walked: dict[str, set[str]] = {}  # name -> extras whose requirements are queued ("" for the plain ones)
device_needs: list[dict[str, str]] = []
queue = [(Requirement(line), "raysim") for line in roots]
while queue:
    req, parent = queue.pop(0)
    name = canon(req.name)
    if name in DEVICE:
        device_needs.append({"name": name, "specifier": str(req.specifier), "extras": ",".join(sorted(req.extras)), "from": parent})
        continue
    if name not in bundled:
        bundled[name] = download(local_pin(req), dest)
        print(f"  {bundled[name].name}  ({req} from {parent})")
    version = parse_wheel_filename(bundled[name].name)[1]
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(f"device_bundle.sh: {bundled[name].name} does not satisfy {req} (from {parent}): pin one version for both")
    extras = ({""} | set(req.extras)) - OMIT.get(name, set()) - walked.setdefault(name, set())
    walked[name] |= extras
    for line in (metadata(bundled[name]).get_all("Requires-Dist") or []) if extras else []:
        sub = Requirement(line)
        base = holds(sub, "")
        via = [e for e in sorted(extras - {""}) if not base and holds(sub, e)]
        if ("" in extras and base) or via:
            sub.marker = None
            queue.append((sub, f"{name}[{','.join(via)}]" if via else name))

spares = {}
for spare in SPARES:
    reqs = [Requirement(f"{n['name']}{n['specifier']}") for n in device_needs if n["name"] == canon(spare)]
    req = Requirement(f"{spare}{reqs[0].specifier if reqs else ''}")
    for other in reqs[1:]:
        req.specifier &= other.specifier
    path = download(local_pin(req), dest / "spare")
    spares[canon(spare)] = f"spare/{path.name}"
    print(f"  spare/{path.name}")

unneeded = sorted(set(wheels_in(dest)) - set(walked) - {"raysim"})
if unneeded:
    sys.exit(f"device_bundle.sh: wheels in {dest} that nothing asked for: {unneeded}")
(dest / "needs.json").write_text(json.dumps({
    "python": pyver, "omitted_extras": {k: sorted(v) for k, v in OMIT.items()},
    "bundled": {n: p.name for n, p in sorted(wheels_in(dest).items())}, "spares": spares, "device": device_needs,
}, indent=1) + "\n")
print(f"device_bundle.sh: {len(wheels_in(dest))} wheels + {len(spares)} spares; the device must provide "
      + ", ".join(sorted({f"{n['name']}{n['specifier']}" for n in device_needs})))
PY

# --- checks: every RECORD lists exactly its wheel's files with the right hash and size -----------
"$python" - "$dest" <<'PY'
import base64, csv, hashlib, io, sys, zipfile
from pathlib import Path

bad = 0
for wheel in sorted(Path(sys.argv[1]).rglob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        if z.testzip() is not None:
            print(f"record check: {wheel.name}: a corrupt member"); bad += 1; continue
        name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1)
        rows = {r[0]: r[1:] for r in csv.reader(io.StringIO(z.read(name).decode())) if r}
        files = {i.filename for i in z.infolist() if not i.is_dir()}
        if set(rows) != files:
            print(f"record check: {wheel.name}: RECORD and zip differ: {sorted(set(rows) ^ files)[:5]}"); bad += 1; continue
        for f in files - {name}:
            data = z.read(f)
            h = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if rows[f][0] != h or rows[f][1] != str(len(data)):
                print(f"record check: {wheel.name}: {f}: RECORD says {rows[f]}, the file is {h},{len(data)}"); bad += 1; break
sys.exit(1 if bad else 0)
PY

{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) by benchmarks/device_bundle.sh for CPython $pyver manylinux x86_64"
  echo "raysim wheel from commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  (cd "$dest" && find . -name '*.whl' -printf '%P %s\n' | sort)
} >"$dest/MANIFEST.txt"
(cd "$dest" && find . -name '*.whl' -printf '%s %P\n' | sort -rn | awk '{printf "  %7.2f MiB  %s\n", $1 / 1048576, $2}')
size=$(du -sb "$dest" | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
echo "device_bundle.sh: $dest: $(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }'); with the rest of the tree that travels:" \
  "$(awk -v s="$((size + tree))" 'BEGIN { printf "%.1f MiB", s / 1048576 }') of the 64 MiB a run may carry"
if [ $((size + tree)) -gt $((60 * 1048576)) ]; then
  echo "device_bundle.sh: over 60 MiB with the tree: too close to the 64 MiB limit" >&2
  exit 1
fi
