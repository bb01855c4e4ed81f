"""Static checks of cluster/: launcher config, KubeRay RayJobs, runtime env and the README's commands.

Nothing is started: the files are parsed and checked with the installed Ray (its packaged launcher
schema and `RuntimeEnv`), and every script / config they tell people to run must exist in the repo.
"""

from __future__ import annotations

import json
import re
import shlex
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CLUSTER_YAML = CLUSTER / "cluster.yaml"
RUNTIME_ENV_YAML = CLUSTER / "runtime_env.yaml"
README = CLUSTER / "README.md"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

# manifest -> the script its entrypoint must run
MANIFESTS = {
    CLUSTER / "kuberay" / "finetune-rayjob.yaml": "jobs/finetune.py",
    CLUSTER / "kuberay" / "score-rayjob.yaml": "jobs/score.py",
}
EXPECTED_REFERENCES = {
    "jobs/finetune.py",
    "jobs/score.py",
    "configs/finetune/mistral7b_qlora_gpu.yaml",
    "configs/score/mistral7b_gpu.yaml",
}
# Dependencies come from the image / venv; a per-job install would re-resolve the CUDA stack.
INSTALLER_FIELDS = {"pip", "uv", "conda"}


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else "latest"


# ------------------------------------------------------------------------------- path references

_CODE_BLOCK = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.M | re.S)
_CONFIG_ARG = re.compile(r"--config(?:=|\s+)['\"]?([^\s'\"]+)")
_PYTHON_SCRIPT = re.compile(r"\bpython3?\s+(?:-u\s+)?['\"]?([^\s'\"]+\.py)\b")
# Repo files named anywhere in a command: `--runtime-env cluster/...`, `ray up cluster/...`, `-f cluster/...`
_REPO_FILE = re.compile(r"(?<![\w./-])((?:cluster|jobs|configs)/[\w./-]+\.(?:py|ya?ml))\b")


def _command_texts() -> list[tuple[str, str]]:
    """(source, text) for every place that holds commands: entrypoints, README code blocks, configs."""
    texts = []
    for manifest in MANIFESTS:
        entrypoint = ((_load_yaml(manifest) or {}).get("spec") or {}).get("entrypoint") or ""
        texts.append((_rel(manifest), entrypoint))
    for block in _CODE_BLOCK.findall(README.read_text()):
        texts.append((_rel(README), block))
    for path in (CLUSTER_YAML, RUNTIME_ENV_YAML):
        texts.append((_rel(path), path.read_text()))
    return texts


def _references() -> dict[str, set[str]]:
    """Repo-relative path -> the files that reference it."""
    refs: dict[str, set[str]] = {}
    for source, text in _command_texts():
        text = text.replace("\\\n", " ")  # shell line continuations
        for pattern in (_CONFIG_ARG, _PYTHON_SCRIPT, _REPO_FILE):
            for path in pattern.findall(text):
                refs.setdefault(path, set()).add(source)
    return refs


REFERENCES = _references()


def test_expected_commands_are_referenced():
    # Guards the existence checks below against passing vacuously (e.g. a regex or README drift).
    missing = EXPECTED_REFERENCES - REFERENCES.keys()
    assert not missing, f"no command in cluster/ references {sorted(missing)}"
    for source in [_rel(m) for m in MANIFESTS] + [_rel(README)]:
        configs = {p for p, srcs in REFERENCES.items() if source in srcs and p.startswith("configs/")}
        assert configs, f"{source}: no `--config configs/...` found in its commands"


@pytest.mark.parametrize("path", sorted(REFERENCES))
def test_referenced_path_exists(path):
    where = ", ".join(sorted(REFERENCES[path]))
    assert (REPO / path).is_file(), f"{path} is referenced by {where} but does not exist in the repo"


# ------------------------------------------------------------------------------ cluster launcher


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    config = _load_yaml(CLUSTER_YAML)
    assert isinstance(config, dict), f"{CLUSTER_YAML} must be a YAML mapping"
    return config


def test_cluster_yaml_matches_ray_schema(launcher_config):
    schema = json.loads(RAY_SCHEMA.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(launcher_config), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_cluster_yaml_passes_ray_up_checks(launcher_config):
    # What `ray up` runs before launching anything: merge provider defaults, then validate
    # (head_node_type present, sum of min_workers <= max_workers, docker settings, ...).
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(launcher_config))


def test_cluster_yaml_has_gpu_worker_type(launcher_config):
    assert launcher_config["provider"]["type"] == "aws"
    node_types = launcher_config["available_node_types"]
    head = launcher_config["head_node_type"]
    gpu_types = {
        name: spec for name, spec in node_types.items() if name != head and spec["resources"].get("GPU", 0) >= 1
    }
    # Declared GPU resources are what let the autoscaler scale a GPU type up from zero.
    assert gpu_types, f"no worker type declares resources: {{GPU: >=1}} in {sorted(node_types)}"
    for name, spec in gpu_types.items():
        assert spec.get("max_workers", 0) >= 1, f"{name}: max_workers must allow at least one GPU node"
        assert spec.get("min_workers", 0) <= spec["max_workers"], f"{name}: min_workers > max_workers"


def test_cluster_yaml_docker_image_matches_ray(launcher_config):
    images = [launcher_config["docker"][key] for key in ("image", "head_image", "worker_image")
              if key in launcher_config["docker"]]
    assert images, "docker.image is not set"
    for image in images:
        assert _image_tag(image).startswith(ray.__version__), f"{image}: tag should start with Ray {ray.__version__}"


def test_cluster_yaml_installs_the_synced_project(launcher_config):
    mounts = launcher_config.get("file_mounts") or {}
    synced = [remote for remote, local in mounts.items() if str(local).rstrip("/") in (".", "./")]
    assert synced, "file_mounts must sync the repository root ('.') to the nodes"
    commands = " ; ".join(launcher_config.get("setup_commands") or [])
    assert "pip install -e" in commands and any(remote in commands for remote in synced), (
        f"setup_commands must pip install -e the synced project ({synced}); got {commands!r}"
    )


# --------------------------------------------------------------------------------- runtime envs


def _check_runtime_env(data, where: str) -> RuntimeEnv:
    assert isinstance(data, dict), f"{where}: a runtime env must be a mapping, got {type(data).__name__}"
    assert "working_dir" in data, f"{where}: working_dir is missing"
    unknown = set(data) - RuntimeEnv.known_fields
    # RuntimeEnv accepts unknown keys as plugin fields, so a typo ("env_var") would pass silently.
    assert not unknown, f"{where}: unknown runtime_env fields {sorted(unknown)}"
    installers = INSTALLER_FIELDS & set(data)
    assert not installers, f"{where}: {sorted(installers)} set; packages must come from the image/venv"
    return RuntimeEnv(**data)  # Ray's own validation (types, working_dir path or URI, ...)


def test_runtime_env_yaml_is_accepted_by_ray(monkeypatch):
    data = _load_yaml(RUNTIME_ENV_YAML)
    monkeypatch.chdir(REPO)  # `working_dir: .` means "submit from the repo root"
    runtime_env = _check_runtime_env(data, _rel(RUNTIME_ENV_YAML))
    assert (REPO / runtime_env["working_dir"]).resolve() == REPO
    excluded = {pattern.strip("/") for pattern in data.get("excludes") or []}
    # The working_dir is zipped through the GCS, which caps its size.
    for heavy in (".venv", ".git"):
        assert heavy in excluded, f"{_rel(RUNTIME_ENV_YAML)}: excludes should list {heavy}/"


def _job_runtime_envs():
    yield _rel(RUNTIME_ENV_YAML), _load_yaml(RUNTIME_ENV_YAML)
    for path in sorted(MANIFESTS):
        yield path.name, yaml.safe_load(_load_yaml(path)["spec"]["runtimeEnvYAML"])


def test_job_logs_keep_ray_data_progress():
    # A long scoring job is watched through its logs: Ray Data's periodic progress summary must stay in them.
    for where, runtime_env in _job_runtime_envs():
        env_vars = runtime_env.get("env_vars") or {}
        assert str(env_vars.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0")) == "0", f"{where}: Ray Data progress is off"


def test_runtime_env_upload_holds_the_code(tmp_path):
    # Build the zip exactly as `ray job submit` would (its excludes + .gitignore) and look inside:
    # jobs import sentiment_ray from this upload, so an over-eager exclude breaks them on the cluster.
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    excludes = _load_yaml(RUNTIME_ENV_YAML).get("excludes") or []
    target = tmp_path / "working_dir.zip"
    packaging.create_package(str(REPO), target, include_gitignore=True, excludes=list(excludes))
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())

    package_files = {
        _rel(p)
        for p in (REPO / "sentiment_ray").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    needed = package_files | {p for p in REFERENCES if (REPO / p).is_file()}
    missing = sorted(needed - names)
    assert not missing, f"excluded from the working_dir upload but needed on the cluster: {missing}"
    leaked = sorted({n.split("/")[0] for n in names} & {".venv", ".git", ".device", "demo_output"})
    assert not leaked, f"working_dir upload includes {leaked}"
    assert target.stat().st_size < packaging.GCS_STORAGE_MAX_SIZE // 2, "working_dir upload is near the GCS size cap"


# ------------------------------------------------------------------------------------ KubeRay


@pytest.fixture(scope="module", params=sorted(MANIFESTS), ids=lambda p: p.name)
def manifest(request) -> tuple[Path, dict]:
    data = _load_yaml(request.param)
    assert isinstance(data, dict), f"{request.param} must be a YAML mapping"
    return request.param, data


def _containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs") or []:
        yield group.get("groupName", "?"), group["template"]["spec"]


def _gpu_limit(container: dict) -> int:
    return int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def test_rayjob_kind_and_lifecycle(manifest):
    path, data = manifest
    assert data["apiVersion"] == "ray.io/v1", path.name
    assert data["kind"] == "RayJob", path.name
    spec = data["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{path.name}: the GPU cluster must be torn down"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int), f"{path.name}: ttlSecondsAfterFinished missing"


def test_rayjob_ray_version_matches_installed_ray(manifest):
    path, data = manifest
    cluster_spec = data["spec"]["rayClusterSpec"]
    assert str(cluster_spec["rayVersion"]) == ray.__version__, f"{path.name}: rayVersion"
    for group, pod in _containers(cluster_spec):
        for container in pod["containers"]:
            tag = _image_tag(container["image"])
            assert tag.startswith(ray.__version__), (f"{path.name} {group}: image {container['image']} "
                                                     f"is not Ray {ray.__version__}")


def test_rayjob_entrypoint_runs_expected_script(manifest):
    path, data = manifest
    argv = shlex.split(data["spec"]["entrypoint"])
    assert argv[:2] == ["python", MANIFESTS[path]], f"{path.name}: entrypoint {argv[:2]}"
    assert "--config" in argv, f"{path.name}: entrypoint passes no --config"


def test_rayjob_runtime_env_is_accepted_by_ray(manifest):
    path, data = manifest
    runtime_env = _check_runtime_env(yaml.safe_load(data["spec"]["runtimeEnvYAML"]), f"{path.name} runtimeEnvYAML")
    # Inside the cluster there is no local checkout to upload: the code must come from a URI.
    assert "://" in runtime_env["working_dir"], f"{path.name}: working_dir must be a remote zip URI"


def test_rayjob_gpu_worker_group(manifest):
    path, data = manifest
    groups = data["spec"]["rayClusterSpec"].get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if any(_gpu_limit(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{path.name}: no worker group requests nvidia.com/gpu in its limits"
    for group in gpu_groups:
        assert group.get("replicas", 0) >= 1, f"{path.name} {group.get('groupName')}: replicas must be >= 1"


def test_rayjob_mounts_shared_pvc(manifest):
    # Adapters, data and outputs must be visible to the head (driver) and every GPU pod.
    path, data = manifest
    for group, pod in _containers(data["spec"]["rayClusterSpec"]):
        pvc_volumes = {v["name"] for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["name"] for m in container.get("volumeMounts") or [] if m["mountPath"] == "/shared"}
            assert mounts & pvc_volumes, f"{path.name} {group}/{container['name']}: no PVC mounted at /shared"


# ------------------------------------------------------------------------- retries and scaling (KubeRay)


def _entrypoint_config(path: Path, data: dict):
    """The typed config the manifest's entrypoint runs with, read by the CLI's own parser and loader (an unknown
    flag or override fails here, as it would on the cluster)."""
    from sentiment_ray.cli import build_parser, job_config

    argv = shlex.split(data["spec"]["entrypoint"])
    command = "finetune" if argv[1] == "jobs/finetune.py" else "score"
    args = build_parser().parse_args([command, *argv[2:]])
    args.config = str(REPO / args.config)  # relative to the job's working dir: the repository
    return job_config(args)


def _shared_paths(cluster_spec: dict) -> set[str]:
    """Mount paths of a PVC in every container of the head and every worker group: what outlives a pod."""
    shared = None
    for _, pod in _containers(cluster_spec):
        pvc_volumes = {v["name"] for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"] for m in container.get("volumeMounts") or [] if m["name"] in pvc_volumes}
            shared = mounts if shared is None else shared & mounts
    return shared or set()


def _outlives_the_cluster(path: str | None, shared: set[str]) -> bool:
    if not path:
        return False
    if "://" in path:
        return not path.startswith("file://")  # an object store
    return any(Path(path).is_relative_to(mount) for mount in shared)


def test_rayjob_worker_groups_are_fixed_or_autoscaled(manifest):
    # maxReplicas above minReplicas does nothing without the autoscaler: the operator keeps `replicas` pods.
    path, data = manifest
    cluster_spec = data["spec"]["rayClusterSpec"]
    for group in cluster_spec.get("workerGroupSpecs") or []:
        name = group.get("groupName")
        low, replicas, high = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 0)
        assert low <= replicas <= high, f"{path.name} {name}: replicas {replicas} not in [{low}, {high}]"
        if high > low:
            assert cluster_spec.get("enableInTreeAutoscaling") is True, (
                f"{path.name} {name}: maxReplicas {high} > minReplicas {low}, but enableInTreeAutoscaling is not "
                "true: nothing would ever add a replica")


def test_rayjob_is_retried_and_its_entrypoint_resumes(manifest):
    """A retry (a new cluster, the same entrypoint) must finish the failed attempt's work, not be refused or start
    over: --resume-if-exists, outputs on storage that outlives the cluster, and for finetuning a named run whose
    checkpoints outlive it too."""
    path, data = manifest
    spec = data["spec"]
    assert spec.get("backoffLimit", 0) >= 1, f"{path.name}: a preempted head or failed driver should be retried"
    cfg = _entrypoint_config(path, data)
    assert cfg.resume_if_exists, f"{path.name}: backoffLimit {spec['backoffLimit']} reruns the entrypoint, which " \
                                 "needs --resume-if-exists to continue rather than be refused"
    shared = _shared_paths(spec["rayClusterSpec"])
    assert shared == {"/shared"}
    if MANIFESTS[path] == "jobs/finetune.py":
        assert cfg.ray.run_name, f"{path.name}: without ray.run_name a retry trains from step 0"
        assert _outlives_the_cluster(cfg.ray.storage_path, shared), f"{path.name}: ray.storage_path " \
            f"{cfg.ray.storage_path} is lost with the cluster, and the checkpoints a retry resumes from with it"
        assert _outlives_the_cluster(cfg.output_dir, shared), f"{path.name}: output_dir {cfg.output_dir}"
    else:
        for what in ("output", "input", "adapter"):
            assert _outlives_the_cluster(getattr(cfg, what), shared), f"{path.name}: {what} {getattr(cfg, what)}"


def test_score_rayjob_pool_matches_the_gpus():
    """The scoring actor pool has a fixed size: more actors than GPUs wait for GPUs that never come, fewer
    leave GPUs idle. (The finetune job trains on one GPU worker: test_rayjob_gpu_worker_group.)"""
    path = CLUSTER / "kuberay" / "score-rayjob.yaml"
    data = _load_yaml(path)
    cfg = _entrypoint_config(path, data)
    cluster_spec = data["spec"]["rayClusterSpec"]
    autoscaled = cluster_spec.get("enableInTreeAutoscaling") is True
    gpus = sum((group["maxReplicas"] if autoscaled else group["replicas"])
               * max(map(_gpu_limit, group["template"]["spec"]["containers"]))
               for group in cluster_spec.get("workerGroupSpecs") or [])
    wanted = cfg.pool_size * cfg.num_gpus_per_actor
    assert (wanted == gpus) if not autoscaled else (0 < wanted <= gpus), (
        f"{path.name}: pool_size {cfg.pool_size} x num_gpus_per_actor {cfg.num_gpus_per_actor} GPUs for a cluster "
        f"of {gpus}: set --pool-size to the GPU workers' count")
