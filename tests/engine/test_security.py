"""The privacy boundary's plumbing (issue 26, items 9-14): no proxy between the HTTP foundation
backend and a loopback server, private staging copies of URI runs, a private local Ray bound to
loopback with token auth and a 0600 token, the user's command line in provenance, sample paths
redacted from data errors under `eval.pseudonymize`, and the cluster files checked as text."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raysim.config import ConfigError
from raysim.models.foundation import is_loopback
from raysim.outputs import storage

# --- item 9: no proxy for loopback ------------------------------------------------------------


class Answer(BaseHTTPRequestHandler):
    """A foundation model server that answers every image with [0.25, 0.75]."""

    def do_POST(self) -> None:  # http.server dispatches on this name
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps({"probabilities": [[0.25, 0.75]] * request["shape"][0]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/predict"
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[bytes]]]:
    """A socket listening on 127.0.0.1 that records what each connection sends, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    got.append(conn.recv(65536))
                except OSError:
                    got.append(b"")

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", got
    listener.close()


ASK = """
import numpy as np, sys
from raysim.models.foundation import build_foundation_model, predict_probabilities
model = build_foundation_model("http", {"url": sys.argv[1], "auth_env": "FM_TOKEN", "retries": 0})
print(predict_probabilities(model, np.zeros((3, 1, 4, 4), np.uint8), 2).tolist())
"""


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_a_loopback_foundation_server_is_never_reached_through_a_proxy(model_server: str, proxy: tuple[str, list[bytes]]) -> None:
    """http_proxy set before the process starts (as in a user's shell): the images and the
    Authorization header go straight to 127.0.0.1, never in clear text to the proxy."""
    proxy_url, contacted = proxy
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy")}
    env |= {"http_proxy": proxy_url, "HTTP_PROXY": proxy_url, "all_proxy": proxy_url, "FM_TOKEN": "Bearer proxied-secret"}
    proc = subprocess.run([sys.executable, "-c", ASK, model_server], capture_output=True, text=True, timeout=120, env=env)
    assert contacted == [], f"the proxy was contacted: {contacted!r}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[0.25, 0.75]] * 3


def test_https_still_honours_the_proxy_variables() -> None:
    """A proxy for https:// is a CONNECT tunnel (TLS end to end), so it stays available."""
    from raysim.models import foundation_http

    assert foundation_http._opener("https://models.example.org/predict") is foundation_http._OPENER
    assert foundation_http._opener("http://localhost:8080/x") is foundation_http._DIRECT
    assert foundation_http._opener("https://[::1]:8443/x") is foundation_http._DIRECT


# --- item 10: private staging for URI runs ----------------------------------------------------


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("RAYSIM_STAGING", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_staging_is_private_owned_and_unpredictable(temp_root: Path) -> None:
    uri = f"file://{temp_root}/bucket/run"
    first, second = storage.RunMirror(uri).local, storage.RunMirror(uri).local
    assert first != second  # a fresh name each time: nobody can prepare it in advance
    for local in (first, second):
        info = local.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700 and local.parent.stat().st_uid == os.getuid()
        assert temp_root in local.parents


def test_a_staging_root_others_can_write_is_refused(temp_root: Path) -> None:
    root = temp_root / f"raysim-{os.getuid()}"
    root.mkdir()
    root.chmod(0o777)  # prepared by someone else, or left open
    with pytest.raises(ConfigError, match=r"raysim-\d+: the staging root .* mode 0777"):
        storage.RunMirror(f"file://{temp_root}/bucket/run").local  # noqa: B018 - the property makes it


def test_two_drivers_on_one_uri_still_exclude_each_other(temp_root: Path) -> None:
    uri = f"file://{temp_root}/bucket/run"
    held = storage.RunLock(storage.RunMirror(uri).lock_dir).acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another raysim driver"):
            storage.RunLock(storage.RunMirror(uri).lock_dir).acquire()
    finally:
        held.release()


# --- item 11: the private local Ray -----------------------------------------------------------

LISTEN = """
import glob, ipaddress, json, os, ray
from raysim.engine.driver import connect_ray
connect_ray(num_cpus=1, object_store_gb=0.1)
ok = ray.get(ray.remote(lambda: 1).remote())
parents = {}  # pid -> parent pid, from /proc (this process's tree is its Ray)
for stat_file in glob.glob("/proc/[0-9]*/stat"):
    try:
        fields = open(stat_file).read().rpartition(")")[2].split()
    except OSError:
        continue
    parents[int(stat_file.split("/")[2])] = int(fields[1])
ours, grown = {os.getpid()}, True
while grown:
    more = {pid for pid, ppid in parents.items() if ppid in ours} - ours
    ours |= more
    grown = bool(more)
inodes = set()
for pid in ours:
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
listening = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
            raw = bytes.fromhex(cols[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-order
            listening.add(str(ipaddress.ip_address(words)))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": sorted(listening), "ok": ok}))
"""


@pytest.fixture
def ray_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A subprocess environment with its own HOME (Ray's token file) and a short RAY_TMPDIR."""
    short = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    yield env | {"HOME": str(tmp_path), "RAY_TMPDIR": short}
    subprocess.run(["rm", "-rf", short], check=False)


@pytest.mark.slow
def test_the_private_ray_listens_on_loopback_only_and_its_token_is_0600(ray_home: dict[str, str]) -> None:
    token = Path(ray_home["HOME"]) / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)  # as Ray 2.60 writes it under the usual umask
    proc = subprocess.run([sys.executable, "-c", LISTEN], capture_output=True, text=True, timeout=180, env=ray_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ok"] == 1 and got["gcs"].startswith("127.0.0.1:")
    assert got["listening"] and all(is_loopback(ip) for ip in got["listening"]), got["listening"]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64  # tightened, not replaced


def test_a_missing_token_file_is_created_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raysim.engine import local_ray

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    local_ray.private_token()
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_a_private_ray_without_token_auth_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before `ray.init`, in the one line the CLI prints (exit 2): a warning would scroll away."""
    from raysim.engine import local_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match=r"^RAY_AUTH_MODE=disabled would start this run's private Ray without token authentication.*unset RAY_AUTH_MODE"):
        local_ray.start(1, None)


# --- items 12 and 13: what the runs record and log (on the session's Ray) ---------------------


def test_provenance_records_the_command_the_user_typed(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """The driver runs in an actor, whose sys.argv is Ray's worker command line (node address,
    ports, session name): provenance.json must hold the CLI's argv instead."""
    from raysim.run import main

    from helpers import tiny_overrides

    argv = ["--out", str(tmp_path / "run"), *tiny_overrides(oph_root, **{"federation.rounds": 1, "resources.actors": 1})]
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "run" / "provenance.json").read_text())["argv"]
    assert recorded == ["raysim.run", *argv]


def test_sample_paths_are_withheld_from_actor_errors_under_pseudonymize(ray_session, oph_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A corrupt sample file found by a client actor: with eval.pseudonymize its path (which
    embeds the patient number) is withheld from the error, which also reaches Ray's logs."""
    import pandas as pd

    from raysim.run import main

    from helpers import tiny_overrides

    name = str(pd.read_csv(oph_copy / "meta_site1_race_test.csv", dtype=str, keep_default_na=False)["filename"][0])
    victim = oph_copy / "all" / name
    victim.write_bytes(victim.read_bytes()[:100])
    key = tmp_path / "id.key"  # a file: the session's actors never see this test's environment
    key.write_text("k" * 32)
    key.chmod(0o600)
    overrides = tiny_overrides(oph_copy, **{"resources.actors": 1, "eval.pseudonymize": True, "eval.id_key_file": key, "data.cache": False})
    assert main(["--out", str(tmp_path / "run"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {oph_copy}/<a sample file: path withheld under eval.pseudonymize>: not a readable npz file"), err
    assert Path(name).stem not in err[0]


def test_withholding_keeps_csv_names_and_other_paths() -> None:
    from raysim.datasets import DataError
    from raysim.engine.client_actor import withhold_sample_paths

    message = "/d/root/all/p00042_s7.npz: not readable; see /d/root/meta_site1.csv and /tmp/cache/x.npy"
    got = withhold_sample_paths(DataError(message), "/d/root")
    assert type(got) is DataError and str(got) == "/d/root/<a sample file: path withheld under eval.pseudonymize>: not readable; see /d/root/meta_site1.csv and /tmp/cache/x.npy"


# --- item 14: the cluster files, checked as text (never run against AWS or Kubernetes here) ---

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
KEYS = "/etc/raysim/keys"


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((CLUSTER / name).read_text())


def _pod_templates(job: dict) -> dict[str, dict]:
    spec = job["spec"]
    pods = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]}
    pods |= {f"workers {g['groupName']}": g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    return pods | {"submitter": spec["submitterPodTemplate"]}


def test_efs_is_mounted_over_tls_and_setup_stops_otherwise() -> None:
    cfg = _yaml("aws-gpu.yaml")
    commands = [c for key in ("initialization_commands", "setup_commands") for c in cfg.get(key) or []]
    mounts = [c for c in commands if "mount -t" in c]
    assert mounts and all(re.search(r"mount -t efs -o (\S*,)?tls(,|\s)", c) for c in mounts), mounts
    assert any(re.search(r"findmnt .*/shared .*127\\\.0\\\.0\\\.1.*\|\| \{.*exit 1; \}", c) for c in commands), "setup does not stop when /shared is not the TLS tunnel's mount"
    assert any(re.search(r"command -v mount\.efs .*exit 1", c) for c in commands)


def test_no_secret_on_a_command_line() -> None:
    for path in sorted(CLUSTER.iterdir()):
        assert "--from-literal" not in path.read_text(), f"{path.name}: a Secret from --from-literal puts its value in shell history and the process list"
    header = (CLUSTER / "rayjob.yaml").read_text()
    assert re.search(r"kubectl create secret generic raysim-ray-token --from-file=auth_token=\S*\.ray/auth_token", header)


def test_rayjob_pods_are_restricted_and_fenced_by_a_network_policy() -> None:
    job, policy = _yaml("rayjob.yaml"), _yaml("networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and "Ingress" in policy["spec"]["policyTypes"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    peers = [rule for rule in policy["spec"]["ingress"]]
    assert peers[0] == {"from": [{"podSelector": {"matchLabels": selected}}]}  # each other, any port
    assert all(rule.get("ports") for rule in peers[1:]), "another peer may reach every port"
    for name, template in _pod_templates(job).items():
        assert selected.items() <= template["metadata"]["labels"].items(), f"{name}: not selected by the NetworkPolicy"
        spec = template["spec"]
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, f"{name}/{container['name']} may run as root"
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], f"{name}/{container['name']}"


def test_actors_get_their_key_files_read_only_and_private() -> None:
    text = (CLUSTER / "rayjob.yaml").read_text()
    job = _yaml("rayjob.yaml")
    assert re.search(r"kubectl create secret generic raysim-keys --from-file=id_key=", text)
    assert f"eval.id_key_file={KEYS}/id_key" in text and f"algorithm.noise_key_file={KEYS}/noise_key" in text
    for name, template in _pod_templates(job).items():
        if name == "submitter":
            continue
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (ray_container,) = spec["containers"]
        (keys,) = [m for m in ray_container["volumeMounts"] if m["mountPath"] == KEYS]
        assert keys["readOnly"] is True and volumes[keys["name"]]["emptyDir"]["medium"] == "Memory", name
        (init,) = spec["initContainers"]
        secret = [volumes[m["name"]]["secret"] for m in init["volumeMounts"] if "secret" in volumes[m["name"]]]
        assert secret == [{"secretName": "raysim-keys", "defaultMode": 0o400, "optional": True}], name
        uid = ray_container["securityContext"]["runAsUser"]
        assert f"install -m 0400 -o {uid} " in " ".join(init["command"]), f"{name}: the key files are not the Ray user's with mode 0400"
        assert any(m["name"] == keys["name"] and m["mountPath"] == KEYS for m in init["volumeMounts"]), name
    launcher = (CLUSTER / "aws-gpu.yaml").read_text()
    assert re.search(r"mode 0600 under /shared/keys/ \(e\.g\. eval\.id_key_file=/shared/keys/id_key\)", launcher), "the launcher does not say where key files go"


def test_readme_says_the_cluster_files_were_never_run() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = " ".join(readme.split("## Security and privacy", 1)[1].split("\n## ", 1)[0].split())
    assert "the cluster files have not been run against AWS or Kubernetes" in section


def test_readme_says_what_every_built_in_method_sends() -> None:
    """The privacy boundary is listed method by method: every built-in method is named in the
    README's "What each method's update carries" list (six were missing once)."""
    from helpers import BUILT_IN

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listing = readme.split("What each method's update carries, method by method:", 1)[1].split("\n\n", 1)[0]
    named = {name for line in listing.splitlines() if line.startswith("- ") for name in re.findall(r"`([a-z_0-9]+)`", line.split(":", 1)[0])}
    assert [name for name in BUILT_IN if name not in named] == []
