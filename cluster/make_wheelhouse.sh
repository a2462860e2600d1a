#!/usr/bin/env bash
# Make a folder of wheels from which a GPU node with no network installs raysim. Run it on a
# machine with network, copy the folder to the node, install there with pip --no-index.
#
#   cluster/make_wheelhouse.sh DIR [--python 3.11|3.12] [--platform TAG] [--extras NAME,NAME]
#   cluster/make_wheelhouse.sh /tmp/raysim-wheels                           # Python 3.11, manylinux x86_64, no extra
#   cluster/make_wheelhouse.sh /tmp/raysim-wheels --python 3.12 --extras xlsx,text
#
# DIR gets the official wheels (pip download --only-binary=:all:, never an sdist) of setup.cfg's
# install_requires and of the named extras ([options.extras_require]: xlsx, text, test), for
# CPython --python (default 3.11) on --platform (default manylinux_2_28_x86_64: a node with
# glibc 2.28 or newer; the older manylinux tags of that architecture, down to manylinux1, are
# taken too, as pip on the node takes them), and raysim's own wheel, built as cluster/submit.sh
# builds it. torch is PyPI's Linux wheel, which depends on the nvidia-* CUDA wheels: they are in
# DIR too. A DIR that exists is added to (a second run resumes a download). At the end the
# script resolves raysim from DIR alone (--no-index) and prints DIR's size and the commands for
# the node. pip evaluates environment markers for the machine and the Python that run it, not
# for the target, and the CUDA wheels come in through such markers (torch's name Linux,
# cuda-toolkit's the architecture): run the script on Linux of the node's architecture (it
# stops otherwise), with the node's Python version if you can (it warns otherwise). $PYTHON is
# the interpreter (default: python); it needs pip, setuptools and wheel.
set -euo pipefail
usage="usage: cluster/make_wheelhouse.sh DIR [--python 3.11|3.12] [--platform TAG] [--extras NAME,NAME]"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "$usage" >&2
  exit 2
fi
dir=$1
shift
pyver=3.11
platform=manylinux_2_28_x86_64
extras=
while [ $# -gt 0 ]; do
  case "$1" in
    --python | --platform | --extras)
      [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
      case "$1" in --python) pyver=$2 ;; --platform) platform=$2 ;; --extras) extras=$2 ;; esac
      shift 2
      ;;
    *) echo "cluster/make_wheelhouse.sh: unknown argument $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
done
case "$pyver" in 3.11 | 3.12) ;; *) echo "cluster/make_wheelhouse.sh: --python must be 3.11 or 3.12, got $pyver" >&2; exit 2 ;; esac
mkdir -p "$dir"
out=$(cd "$dir" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

# A manylinux_2_X_ARCH tag stands for every glibc up to 2.X: list them all (pip 23.2 does not).
platforms=()
arch=
if [[ "$platform" =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  glibc=${BASH_REMATCH[1]}
  arch=${BASH_REMATCH[2]}
  for ((minor = glibc; minor >= 5; minor--)); do
    platforms+=(--platform "manylinux_2_${minor}_$arch")
    case "$minor" in
      17) platforms+=(--platform "manylinux2014_$arch") ;;
      12) platforms+=(--platform "manylinux2010_$arch") ;;
      5) platforms+=(--platform "manylinux1_$arch") ;;
    esac
  done
else
  platforms=(--platform "$platform")
fi
target=(--only-binary=:all: --implementation cp --python-version "$pyver" "${platforms[@]}")

# From setup.cfg: the requirements, one a line, then raysim's version. An unknown extra, or a
# machine whose markers are not the node's, stops here.
reqs=()
while IFS= read -r line; do reqs+=("$line"); done < <("$python" - "$extras" "$pyver" "$arch" <<'PY'
import configparser
import platform
import sys

extras, pyver, arch = sys.argv[1:]
here = f"{sys.version_info[0]}.{sys.version_info[1]}"
if arch and (platform.system(), platform.machine()) != ("Linux", arch):
    sys.exit(f"cluster/make_wheelhouse.sh: pip would evaluate markers for {platform.system()} {platform.machine()}, not Linux {arch}: run it on Linux {arch}")
if here != pyver:
    print(f"cluster/make_wheelhouse.sh: warning: pip evaluates markers for Python {here}, not {pyver}", file=sys.stderr)
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
known = cfg["options.extras_require"]
wanted = [e.strip() for e in extras.split(",") if e.strip()]
unknown = [e for e in wanted if e not in known]
if unknown:
    sys.exit(f"cluster/make_wheelhouse.sh: no extra {', '.join(unknown)} in setup.cfg (it has {', '.join(known)})")
lines = cfg["options"]["install_requires"].splitlines() + [line for e in wanted for line in known[e].splitlines()]
print("\n".join(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))))
print(cfg["metadata"]["version"])
PY
)
[ ${#reqs[@]} -ge 2 ] || exit 1
version=${reqs[${#reqs[@]} - 1]}
unset "reqs[${#reqs[@]} - 1]"
spec="raysim==$version"
[ -z "$extras" ] || spec="raysim[$extras]==$version"

"$python" -m pip download "${target[@]}" -d "$out" "${reqs[@]}"
"$python" -m pip wheel . -w "$out" --no-deps --no-build-isolation -q
# What pip install on the node resolves, from DIR alone: every wheel it needs is there.
"$python" -m pip download "${target[@]}" --no-index --find-links "$out" -d "$out" -q "$spec"

echo
echo "$out: $(find "$out" -maxdepth 1 -name '*.whl' | wc -l | tr -d ' ') wheels, $(du -sh "$out" | cut -f1); torch: $(cd "$out" && ls torch-*.whl)"
echo
echo "On the node (Python $pyver), with the folder copied there as DIR:"
echo "  python$pyver -m venv ~/raysim-venv"
echo "  ~/raysim-venv/bin/pip install --no-index --find-links DIR '$spec'"
echo "On a node whose admins installed torch and Ray, raysim alone on top of them (pip check names"
echo "what the node lacks; install that from DIR the same way, with --no-index --find-links DIR):"
echo "  python$pyver -m venv --system-site-packages ~/raysim-venv"
echo "  ~/raysim-venv/bin/pip install --no-index --find-links DIR --no-deps raysim==$version"
echo "  ~/raysim-venv/bin/pip check"
