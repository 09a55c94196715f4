"""Render cluster/profiles.yaml into KubeRay v1 manifests: cluster/kuberay/<profile>/.

    python cluster/render.py            # every profile
    python cluster/render.py gpu-small  # one

Each profile gets a shared-storage PVC and a RayCluster (CPU head that schedules no work, one
worker group, in-tree autoscaling), which its kustomization.yaml applies; a RayJob per stage that
runs on that RayCluster; a self-contained RayJob for the whole pipeline; and a RayService that
serves the quantized model at / and the web console at /console.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from pipeline.config import load_config  # noqa: E402
from pipeline.serving.schemas import ServeArgs  # noqa: E402

RAY_VERSION = "2.60.0"
CLUSTER = "llm-pipeline"
RUNS = "/mnt/runs"  # the PVC's mount point in every pod: runs, checkpoints and models live here
APP_DIR = "/app"  # where the image holds this repository (see Dockerfile)
STAGES = ["curate", "train", "quantize", "distill", "adapt", "eval", "serve"]
ENV = [
    {"name": "NCCL_DEBUG", "value": "WARN"},
    {
        "name": "PIPELINE_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-pipeline-api-key", "key": "key", "optional": True}},
    },
]


def pod(profile: dict, role: str, cpu: str, memory: str, gpus: int, shm: str) -> dict:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    container = {
        "name": f"ray-{role}",
        "image": profile["image"],
        "env": ENV,
        "resources": {"limits": limits, "requests": limits},
        "volumeMounts": [{"name": "runs", "mountPath": RUNS}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if role == "head":
        container["ports"] = [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 8000, "name": "serve"},
        ]
    spec = {
        "containers": [container],
        # NCCL and Ray's object store both live in shared memory; the default 64 MiB is far too small
        "volumes": [
            {"name": "runs", "persistentVolumeClaim": {"claimName": profile["storage"]["claim"]}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        ],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def cluster_spec(profile: dict) -> dict:
    workers = profile["workers"]
    group = "gpu" if workers["gpus"] else "cpu"
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": {
            # num-cpus 0: no pipeline task or replica lands on the head. The dashboard listens on the
            # pod network because KubeRay submits jobs and checks Serve through it; only the ClusterIP
            # head service reaches it (kubectl port-forward), nothing outside the cluster
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": pod(profile, "head", profile["head"]["cpu"], profile["head"]["memory"], 0, "1Gi"),
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": workers["replicas"],
                "minReplicas": workers["min"],
                "maxReplicas": workers["max"],
                "rayStartParams": {
                    "num-cpus": str(workers["cpu"]),
                    **({"num-gpus": str(workers["gpus"])} if workers["gpus"] else {}),
                },
                "template": pod(profile, "worker", workers["cpu"], workers["memory"], workers["gpus"], workers["shm"]),
            }
        ],
    }


def overrides(profile: dict) -> list[str]:
    train, serve = profile["train"], profile["serve"]
    return [
        f"runs_dir={RUNS}",
        f"train.num_workers={train['num_workers']}",
        f"train.use_gpu={str(train['use_gpu']).lower()}",
        f"train.zero_stage={train['zero_stage']}",
        f"serve.min_replicas={serve['min_replicas']}",
        f"serve.max_replicas={serve['max_replicas']}",
        f"serve.num_cpus={serve['num_cpus']}",
        f"serve.num_gpus={serve['num_gpus']}",
    ]


def rayjob(profile: dict, stage: str, inline_cluster: bool) -> dict:
    runtime_env = {"working_dir": APP_DIR, "env_vars": {"NCCL_DEBUG": "WARN", "PYTHONUNBUFFERED": "1"}}
    spec = {
        "entrypoint": " ".join(["python", f"rayjobs/{stage}.py", "--config", profile["config"], *overrides(profile)]),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
        "submissionMode": "K8sJobMode",
        "backoffLimit": 1,
        "ttlSecondsAfterFinished": 3600,
    }
    if inline_cluster:
        # the whole pipeline on a cluster of its own; kept after the job so the endpoint stays up
        spec.update(shutdownAfterJobFinishes=False, rayClusterSpec=cluster_spec(profile))
    else:
        spec.update(clusterSelector={"ray.io/cluster": CLUSTER})
    name = f"{CLUSTER}-{stage}" if not inline_cluster else f"{CLUSTER}-all"
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name}, "spec": spec}


def serve_config(profile: dict) -> dict:
    cfg = load_config(ROOT.parent / profile["config"], overrides(profile))
    run = f"{RUNS}/{cfg.name}"
    args = ServeArgs.from_config(cfg, f"{run}/quantize/awq", adapters_dir=f"{run}/adapters")
    # no runtime_env: the image has the repo installed, and Serve takes only remote working_dirs
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "llm",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": args.model_dump(exclude_none=True),
            },
            {  # the web console over the runs on the PVC, with a playground on the endpoint beside it
                "name": "console",
                "route_prefix": "/console",
                "import_path": "serve.console:build_console",
                "args": {"runs_dir": RUNS, "endpoint": "http://127.0.0.1:8000", "config": profile["config"]},
            },
        ],
    }


def render(name: str, profile: dict) -> dict[str, list[dict]]:
    storage = profile["storage"]
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": storage["claim"]},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": storage["size"]}}},
    }
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": f"{CLUSTER}-serve"},
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config(profile), sort_keys=False),
            "rayClusterConfig": cluster_spec({**profile, "image": profile.get("serve_image", profile["image"])}),
        },
    }
    files = {
        "pvc.yaml": [pvc],
        "raycluster.yaml": [
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": {"name": CLUSTER},
                "spec": cluster_spec(profile),
            }
        ],
        **{f"rayjob-{stage}.yaml": [rayjob(profile, stage, False)] for stage in STAGES if stage != "serve"},
        "rayjob-pipeline.yaml": [rayjob(profile, "pipeline", True)],
        "rayservice.yaml": [service],
    }
    # `kubectl apply -k` brings up the long-lived parts only; jobs and the service are applied one
    # by one, in order (a stage reads the one before; the service needs the quantized model)
    files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "labels": [{"pairs": {"app.kubernetes.io/part-of": CLUSTER, "profile": name}}],
            "resources": ["pvc.yaml", "raycluster.yaml"],
        }
    ]
    return files


class _Dumper(yaml.SafeDumper):
    """Plain YAML for humans and kubectl: no &anchors for repeated blocks, multi-line strings as |."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def write(name: str, files: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink()
    for filename, docs in files.items():
        header = f"# Rendered by `python cluster/render.py {name}` from cluster/profiles.yaml: edit there, not here.\n"
        (out / filename).write_text(header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False))


def main(argv: list[str]) -> None:
    profiles = yaml.safe_load((ROOT / "profiles.yaml").read_text())
    for name in argv or profiles:
        write(name, render(name, profiles[name]), ROOT / "kuberay" / name)
        print(f"cluster/kuberay/{name}/")


if __name__ == "__main__":
    main(sys.argv[1:])
