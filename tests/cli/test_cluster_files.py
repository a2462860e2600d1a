"""Cross-references inside cluster/: what one file names, another must provide.

No cluster is needed: the files are parsed (YAML, shell by regex) and every name that crosses a
file boundary is checked against its other end: the wheel `submit.sh` builds and the runtime
environments install, the folder it stages and the ConfigMaps and mounts that carry it, the
volumes the mounts name, the paths the commands read and write, the variables they read, the
auth token and where it comes from, the dashboard's address and the shared-storage mount.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RAY_DEFAULT_TOKEN = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes, and Ray looks last
# Variables a file may read without setting: who sets them.
PROVIDED = {
    "RAY_HEAD_IP": "the cluster launcher, for worker_start_ray_commands",
    "RAY_RUNTIME_ENV_CREATE_WORKING_DIR": "Ray's pip plugin: the node's copy of working_dir",
}
VAR = re.compile(r"\$\{?([A-Za-z_]\w*)")
SWALLOWED = re.compile(r"\|\|\s*(true|:|exit 0)\b|;\s*true\s*$")
LAUNCHER_COMMANDS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def _text(name: str) -> str:
    return (CLUSTER / name).read_text()


def _header(text: str) -> str:
    """The leading comment block (shebang skipped), without the '#'s."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def _wheel() -> str:
    """The file `pip wheel .` writes: setup.cfg's name and version, a pure-Python py3 wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert not cfg.has_section("bdist_wheel"), "setup.cfg sets bdist_wheel options (a python tag?): derive the wheel's tag here"
    assert "ext_modules" not in cfg["options"], "extension modules make a platform wheel"
    name = re.sub(r"[-_.]+", "_", cfg["metadata"]["name"])
    return f"{name}-{Version(cfg['metadata']['version'])}-py3-none-any.whl"


def _stage() -> str:
    """The folder submit.sh builds the wheel into and copies tune_configs/ into."""
    text = _text("submit.sh")
    stage = re.search(r"^stage=(\S+)$", text, re.M)
    assert stage, "submit.sh: no stage=FOLDER"
    assert re.search(r'pip wheel \. -w "\$stage"', text), "submit.sh must build the wheel into $stage"
    assert re.search(r'cp -r tune_configs "\$stage/?"', text), "submit.sh must copy tune_configs/ into $stage"
    assert "--runtime-env cluster/runtime_env.yaml" in text
    return stage.group(1)


def _staged_files(folder: str) -> set[str]:
    """The regular files directly in a staged folder (what `kubectl create configmap --from-file=FOLDER` takes: not subfolders)."""
    stage = _stage()
    if folder.rstrip("/") == stage:
        return {_wheel()}
    if folder.rstrip("/") == f"{stage}/tune_configs":
        return {p.name for p in (ROOT / "tune_configs").iterdir() if p.is_file()}
    raise AssertionError(f"a ConfigMap from {folder}, which submit.sh does not stage")


def _launcher() -> dict:
    return yaml.safe_load(_text("aws-gpu.yaml"))


def _launcher_commands(cfg: dict) -> dict[str, list[str]]:
    commands = {key: list(cfg.get(key) or []) for key in LAUNCHER_COMMANDS}
    for node_type in cfg["available_node_types"].values():
        for key in ("initialization_commands", "setup_commands", "worker_setup_commands"):
            commands[key] += node_type.get(key) or []
    return commands


def _rayjob() -> dict:
    return yaml.safe_load(_text("rayjob.yaml"))


def _runtime_env_of_job(job: dict) -> dict:
    return yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def _pods(job: dict) -> dict[str, dict]:
    spec = job["spec"]
    pods = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]}
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        pods[f"worker group {group['groupName']}"] = group["template"]["spec"]
    pods["submitter"] = spec["submitterPodTemplate"]["spec"]
    return pods


def _configmaps(job_text: str) -> dict[str, list[str]]:
    """ConfigMaps the header creates: name -> the --from-file sources."""
    made = {}
    for line in _header(job_text).splitlines():
        match = re.search(r"kubectl create configmap (\S+)(.*)", line)
        if match:
            made[match.group(1)] = re.findall(r"--from-file=(\S+)", match.group(2).split("#")[0])
    return made


def _visible(container: dict, volumes: dict[str, dict], configmaps: dict[str, list[str]]) -> dict[str, str]:
    """Every file a container sees through its ConfigMap mounts: absolute path -> ConfigMap."""
    seen = {}
    for mount in container.get("volumeMounts") or []:
        source = volumes[mount["name"]].get("configMap")
        if not source:
            continue
        assert source["name"] in configmaps, f"ConfigMap {source['name']} is mounted but the header never creates it"
        keys = set().union(*(_staged_files(folder) for folder in configmaps[source["name"]]))
        if source.get("items"):
            files = {item["path"]: item["key"] for item in source["items"]}
            assert set(files.values()) <= keys, f"ConfigMap {source['name']}: items name keys it lacks: {set(files.values()) - keys}"
        else:
            files = {key: key for key in keys}
        if "subPath" in mount:
            assert mount["subPath"] in files, f"subPath {mount['subPath']} is not in ConfigMap {source['name']} ({sorted(files)})"
            seen[mount["mountPath"]] = source["name"]
        else:
            seen |= {str(PurePosixPath(mount["mountPath"]) / path): source["name"] for path in files}
    return seen


def _under(path: str, mount: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(mount) or PurePosixPath(mount) in PurePosixPath(path).parents


def _outs(text: str) -> list[str]:
    """Every `--out VALUE` that names a path or URI (prose such as "--out must be ..." has no '/')."""
    return re.findall(r"--out[= ]+([^\s\"'`]*/[^\s\"'`]*)", text)


# --- the wheel and the staged job folder ---------------------------------------------------


def test_every_wheel_name_is_the_one_submit_sh_builds() -> None:
    wheel = _wheel()
    for path in sorted(CLUSTER.iterdir()):
        for name in re.findall(r"raysim-[^\s/'\"`]*\.whl", path.read_text()):
            assert name == wheel, f"{path.name} names {name}; pip wheel . builds {wheel} (setup.cfg)"
    installed = f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{wheel}"
    assert yaml.safe_load(_text("runtime_env.yaml"))["pip"]["packages"] == [installed]
    assert _runtime_env_of_job(_rayjob())["pip"]["packages"] == [installed]


def test_runtime_envs_agree_with_the_staged_folder() -> None:
    local, job = yaml.safe_load(_text("runtime_env.yaml")), _runtime_env_of_job(_rayjob())
    assert local["working_dir"] == _stage(), "runtime_env.yaml must upload the folder submit.sh stages"
    assert {k: v for k, v in local.items() if k != "working_dir"} == {k: v for k, v in job.items() if k != "working_dir"}, "rayjob.yaml's runtime env differs from runtime_env.yaml beyond working_dir"
    code = "\n".join(p.read_text() for d in ("raysim", "datasets", "algorithms") for p in (ROOT / d).rglob("*.py"))
    for name in local.get("env_vars") or {}:
        assert re.search(rf"environ(\.get)?\(?\[?[\"']{name}[\"']", code), f"env_vars sets {name}, which raysim never reads"


# --- KubeRay RayJob --------------------------------------------------------------------------


def test_rayjob_mounts_name_defined_volumes_and_created_objects() -> None:
    text = _text("rayjob.yaml")
    job, configmaps = yaml.safe_load(text), _configmaps(text)
    for pod_name, pod in _pods(job).items():
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for container in pod["containers"]:
            mounts = container.get("volumeMounts") or []
            assert len({m["mountPath"] for m in mounts}) == len(mounts), f"{pod_name}: two mounts at one path"
            for mount in mounts:
                assert mount["name"] in volumes, f"{pod_name}/{container['name']} mounts volume {mount['name']}, which the pod does not define"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{pod_name}: ConfigMap {volume['configMap']['name']} is never created in the header"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in _header(text), f"{pod_name}: the header does not say to create PVC {volume['persistentVolumeClaim']['claimName']}"


def test_rayjob_submitter_sees_the_whole_job_folder() -> None:
    """K8sJobMode: `ray job submit` runs in the submitter pod and uploads working_dir from its disk."""
    text = _text("rayjob.yaml")
    job, configmaps = yaml.safe_load(text), _configmaps(text)
    assert job["spec"]["submissionMode"] == "K8sJobMode"
    workdir = _runtime_env_of_job(job)["working_dir"]
    layout = {_wheel()} | {f"tune_configs/{name}" for name in _staged_files(f"{_stage()}/tune_configs")}
    pod = _pods(job)["submitter"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    (container,) = pod["containers"]
    seen = _visible(container, volumes, configmaps)
    missing = sorted(path for path in layout if str(PurePosixPath(workdir) / path) not in seen)
    assert not missing, f"the submitter pod lacks {missing} under working_dir {workdir} (it sees {sorted(seen)})"


def test_rayjob_entrypoint_paths_exist_where_it_runs() -> None:
    text = _text("rayjob.yaml")
    job, configmaps = yaml.safe_load(text), _configmaps(text)
    workdir = _runtime_env_of_job(job)["working_dir"]
    pods = _pods(job)
    submitter = pods.pop("submitter")
    seen = _visible(submitter["containers"][0], {v["name"]: v for v in submitter.get("volumes") or []}, configmaps)
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] in (["python", "-m", "raysim.tune"], ["python", "-m", "raysim.run"])
    for arg in args[3:]:
        if arg.startswith(("tune_configs/", "configs/")):
            assert (ROOT / arg).is_file(), arg
            assert str(PurePosixPath(workdir) / arg) in seen, f"{arg} is not in the uploaded working_dir"
        elif arg.startswith("/"):  # written or read by the driver (head) and the trials (workers)
            for pod_name, pod in pods.items():
                volumes = {v["name"]: v for v in pod.get("volumes") or []}
                for container in pod["containers"]:
                    mount = [m for m in container.get("volumeMounts") or [] if _under(arg, m["mountPath"])]
                    assert mount, f"{arg}: no volume at that path in {pod_name}/{container['name']}"
                    assert "persistentVolumeClaim" in volumes[mount[-1]["name"]], f"{arg} is on a {pod_name} volume that is not the shared claim"
    assert _outs(job["spec"]["entrypoint"]), "the entrypoint writes nowhere shared (--out)"


def test_rayjob_token_auth_everywhere_from_the_created_secret() -> None:
    text = _text("rayjob.yaml")
    job = yaml.safe_load(text)
    secrets = dict(re.findall(r"kubectl create secret generic (\S+) --from-file=(\w+)=", _header(text)))
    assert secrets, "the header does not create the token Secret"
    for pod_name, pod in _pods(job).items():
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env") or []}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{pod_name}/{container['name']}: RAY_AUTH_MODE is not token"
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref, f"{pod_name}/{container['name']}: RAY_AUTH_TOKEN does not come from a Secret"
            assert secrets.get(ref["name"]) == ref["key"], f"{pod_name}: Secret {ref['name']} key {ref['key']} is not what the header creates ({secrets})"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head service (dashboard) must stay inside the Kubernetes network"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_rayjob_runtime_env_survives_the_submitter_shell() -> None:
    """KubeRay (K8sJobMode, no command of ours) runs `bash -c "... --runtime-env-json <Go-quoted JSON> ..."`."""
    job = _rayjob()
    (container,) = _pods(job)["submitter"]["containers"]
    assert not container.get("command"), "a submitter command of our own replaces KubeRay's: check it here instead"
    runtime_env = _runtime_env_of_job(job)
    env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    quoted = json.dumps(json.dumps(runtime_env, separators=(",", ":")))  # strconv.Quote, for ASCII text
    shell = subprocess.run(["bash", "-c", f"printf %s {quoted}"], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert json.loads(shell.stdout) == runtime_env, f"the submitter's shell rewrote the runtime env: {shell.stdout}"


# --- cluster launcher (AWS) ------------------------------------------------------------------


def test_launcher_dashboard_on_loopback() -> None:
    commands = _launcher_commands(_launcher())
    heads = [c for c in commands["head_start_ray_commands"] if re.search(r"\bray start\b.*--head", c)]
    assert len(heads) == 1
    host = re.search(r"--dashboard-host[= ](\S+)", heads[0])
    assert host and host.group(1) in LOOPBACK, f"dashboard bound to {host and host.group(1)}: it is reached through `ray dashboard` (SSH tunnel)"
    assert not any("0.0.0.0" in c for cs in commands.values() for c in cs)


def test_launcher_token_auth_has_a_token_on_every_node() -> None:
    text = _text("aws-gpu.yaml")
    cfg = yaml.safe_load(text)
    commands = _launcher_commands(cfg)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in commands[key] if re.search(r"\bray start\b", c)]
    assert len(starts) == 2
    for command in starts:
        assert re.search(r"(^|\s)RAY_AUTH_MODE=token\s", command), f"{command!r} does not enable token auth"
        path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command)
        token = path.group(1) if path else RAY_DEFAULT_TOKEN
        mounts = cfg.get("file_mounts") or {}
        assert token in mounts, f"{command!r} reads the token from {token}, which file_mounts does not provide on the nodes ({mounts})"
        assert mounts[token] == RAY_DEFAULT_TOKEN and "ray get-auth-token --generate" in _header(text), "the local token must be the one `ray get-auth-token --generate` writes"
        assert any(re.search(rf"test -s {re.escape(token)}\b.*exit 1", c) for c in commands["setup_commands"]), "setup does not stop on a missing token"
    assert "RAY_AUTH_TOKEN=" not in text, "a token in the config would be committed"


def test_launcher_shared_storage_fails_loudly_and_holds_the_outputs() -> None:
    text = _text("aws-gpu.yaml")
    cfg = yaml.safe_load(text)
    commands = _launcher_commands(cfg)
    for key, cs in commands.items():
        for command in cs:
            assert not SWALLOWED.search(command), f"{key}: {command!r} hides a failure"
    mounts = [(key, c) for key, cs in commands.items() for c in cs if re.search(r"\bmount -t\b", c)]
    assert len(mounts) == 1, mounts
    key, command = mounts[0]
    target = re.search(r"mount -t \S+ .*? (\S+):/\S* (/[\w/.-]+)", command)
    assert target, command
    server, path = target.groups()
    if "docker" in cfg:  # a container cannot mount NFS unprivileged: mount on the host, bind it in
        assert key == "initialization_commands", f"the mount runs in {key}, inside the container"
        options = " ".join(cfg["docker"].get("run_options") or [])
        assert re.search(rf"(-v|--volume)[= ]{re.escape(path)}:{re.escape(path)}(\s|$)", options), f"docker.run_options does not bind {path} into the container"
    region = re.search(r"\bregion=([\w-]+)", command)
    assert re.fullmatch(r"fs-\w+", server) and region and region.group(1) == cfg["provider"]["region"], f"{server} is not an EFS file system in {cfg['provider']['region']}"
    # in the container, `mountpoint` is true for any bind mount (an empty host folder too): check the file system's type
    fstype = re.compile(rf'^test "\$\(stat -f -c %T {re.escape(path)}\)" = nfs \|\| \{{.*\bexit 1; \}}$')
    assert any(fstype.search(c) for c in commands["setup_commands"]), f"setup does not stop when {path} in the container is not the NFS mount"
    outs = _outs(_header(text))
    assert outs and all(_under(out, path) or out.startswith("s3://") for out in outs), outs


def test_launcher_reads_only_provided_variables() -> None:
    for key, cs in _launcher_commands(_launcher()).items():
        for command in cs:
            assigned = set(re.findall(r"(?:^|\s)(?:export\s+)?(\w+)=", command))
            for name in VAR.findall(command):
                provided = name == "RAY_HEAD_IP" and key == "worker_start_ray_commands"  # PROVIDED: the launcher sets it there only
                assert name in assigned or provided, f"{key}: {command!r} reads ${name}, which nothing sets"


# --- files together --------------------------------------------------------------------------


def test_variables_are_set_or_documented() -> None:
    text = _text("submit.sh")
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assigned = set(re.findall(r"^\s*(?:export\s+)?(\w+)=", body, re.M))
    documented = set(VAR.findall(_header(text)))
    for name in VAR.findall(body):
        assert name in assigned or name in documented, f"submit.sh reads ${name} but neither sets it nor says so in its header"
    job = _rayjob()
    env = {e["name"] for pod in _pods(job).values() for c in pod["containers"] for e in c.get("env") or []}
    for where, value in (("entrypoint", job["spec"]["entrypoint"]), ("runtimeEnvYAML", job["spec"]["runtimeEnvYAML"]), ("runtime_env.yaml", _text("runtime_env.yaml"))):
        for name in VAR.findall("\n".join(line for line in value.splitlines() if not line.lstrip().startswith("#"))):
            assert name in PROVIDED or name in env, f"{where} reads ${name}, which nothing sets"


def test_outputs_go_to_shared_storage() -> None:
    job = _rayjob()
    shared = {m["mountPath"] for m in _pods(job)["head"]["containers"][0]["volumeMounts"]} & {"/shared"}
    assert shared, "rayjob.yaml does not mount /shared on the head"
    for path in sorted(CLUSTER.iterdir()):
        for out in _outs(path.read_text()):
            assert _under(out, "/shared") or re.match(r"(s3|gs)://", out), f"{path.name}: --out {out} is on one node's disk"


def test_images_exist_for_the_ray_version() -> None:
    """One image everywhere, the Ray version the RayJob declares; rayproject/ray-ml stopped at 2.49."""
    cfg, job = _launcher(), _rayjob()
    images = {cfg["docker"][k] for k in ("image", "head_image", "worker_image") if k in cfg["docker"]}
    images |= {c["image"] for pod in _pods(job).values() for c in pod["containers"]}
    assert len(images) == 1, images
    (image,) = images
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", image)
    assert match, f"{image}: not a published rayproject/ray GPU tag (rayproject/ray-ml images end at Ray 2.49)"
    version, minor = match.groups()
    assert version == job["spec"]["rayClusterSpec"]["rayVersion"]
    cfg_file = configparser.ConfigParser()
    cfg_file.read(ROOT / "setup.cfg")
    ray = next(Requirement(line) for line in cfg_file["options"]["install_requires"].split("\n") if line.strip().startswith("ray"))
    assert ray.specifier.contains(version), f"the image's Ray {version} is outside setup.cfg's {ray}"
    assert f"Python :: 3.{minor}" in cfg_file["metadata"]["classifiers"], f"the image's Python 3.{minor} is not one setup.cfg lists"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_commands_parse() -> None:
    commands = [c for cs in _launcher_commands(_launcher()).values() for c in cs]
    for command in [*commands, _text("submit.sh")]:
        check = subprocess.run(["bash", "-n"], input=command, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{command[:200]!r}: {check.stderr}"


def test_cluster_readme_lists_every_file() -> None:
    readme = _text("README.md")
    for path in CLUSTER.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "rayjob.yaml", "runtime_env.yaml", "submit.sh"])
def test_no_placeholder_outside_the_documented_ones(name: str) -> None:
    """Placeholders a user must replace are named in the file's header (or README), never silent."""
    text = _text(name)
    for placeholder in set(re.findall(r"\b(?:fs|sg|subnet)-X+\b|MY-[A-Z]+", text)):
        assert placeholder in _header(text), f"{name}: {placeholder} is not explained in the header"
