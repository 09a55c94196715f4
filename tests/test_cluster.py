"""cluster/: the KubeRay manifests are what cluster/render.py makes of cluster/profiles.yaml, use
only fields of KubeRay's v1 CRDs (tests/kuberay_schema.py), and point at things that exist here."""

import importlib
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kuberay_schema import SCHEMAS
from ray.serve.schema import ServeDeploySchema

from conftest import REPO
from pipeline.config import load_config
from pipeline.serving.schemas import ServeArgs

sys.path.insert(0, str(REPO / "cluster"))
import render  # noqa: E402

PROFILES = yaml.safe_load((REPO / "cluster" / "profiles.yaml").read_text())
MANIFESTS = sorted((REPO / "cluster" / "kuberay").rglob("*.yaml"))


def docs(kind: str | None = None):
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if kind is None or doc["kind"] == kind:
                yield path, doc


def test_committed_manifests_are_the_rendered_profiles():
    for name, profile in PROFILES.items():
        out = REPO / "cluster" / "kuberay" / name
        rendered = render.render(name, profile)
        assert sorted(p.name for p in out.glob("*.yaml")) == sorted(rendered), name
        for filename, expected in rendered.items():
            assert list(yaml.safe_load_all((out / filename).read_text())) == expected, (
                f"{out / filename} is stale: run `python cluster/render.py`"
            )


def test_every_document_matches_the_kuberay_v1_schema():
    assert len(MANIFESTS) == 11 * len(PROFILES)  # kustomization, PVC, cluster, 7 RayJobs, RayService
    for path, doc in docs():
        jsonschema.validate(doc, SCHEMAS[doc["kind"]]), path


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda d: d["spec"].update(entrypointz="x"), "entrypointz"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="4"), "is not of type"),
        (lambda d: d["spec"].update(shutdownAfterJobFinishes="no"), "is not of type"),
        (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
    ],
)
def test_the_schema_rejects_unknown_fields_and_wrong_types(mutate, error):
    doc = next(d for _, d in docs("RayJob") if "rayClusterSpec" in d["spec"])
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.validate(doc, SCHEMAS["RayJob"])


def test_rayjobs_run_our_entrypoints_with_valid_configs_and_runtime_envs():
    stages = set()
    for path, doc in docs("RayJob"):
        python, script, flag, config, *overrides = doc["spec"]["entrypoint"].split()
        assert (python, flag) == ("python", "--config") and script.startswith("rayjobs/")
        assert (REPO / script).is_file()
        load_config(REPO / config, overrides)  # the job's config and overrides validate
        runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert isinstance(runtime_env, dict) and runtime_env["working_dir"] == render.APP_DIR
        assert runtime_env["env_vars"]["NCCL_DEBUG"] == "WARN"
        assert ("rayClusterSpec" in doc["spec"]) != ("clusterSelector" in doc["spec"]), path
        stages.add(Path(script).stem)
    assert stages == {"curate", "train", "quantize", "distill", "adapt", "eval", "pipeline"}
    # each entrypoint hands its own stage to the CLI (test_rayjob submits some of them as real jobs)
    for script in (REPO / "rayjobs").glob("[!_]*.py"):
        command = "run" if script.stem == "pipeline" else script.stem
        assert f'run_stage("{command}")' in script.read_text(), script


def test_clusters_keep_work_off_the_head_and_size_gpu_groups_consistently():
    for path, doc in docs():
        if "spec" not in doc:
            continue
        spec = (
            doc["spec"].get("rayClusterSpec")
            or doc["spec"].get("rayClusterConfig")
            or (doc["spec"] if doc["kind"] == "RayCluster" else None)
        )
        if spec is None:
            continue
        assert spec["enableInTreeAutoscaling"] is True and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            gpus = group["rayStartParams"].get("num-gpus")
            assert limits.get("nvidia.com/gpu") == gpus, path
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["medium"] == "Memory"
            assert {"mountPath": "/mnt/runs", "name": "runs"} in pod["containers"][0]["volumeMounts"]


def test_rayservice_serve_config_is_a_valid_serve_deployment_of_our_app():
    for _, doc in docs("RayService"):
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(serve_config)
        app, console = serve_config["applications"]
        for application in (app, console):
            module, attr = application["import_path"].split(":")
            assert callable(getattr(importlib.import_module(module), attr))
        assert console["route_prefix"] == "/console" and console["args"]["runs_dir"] == "/mnt/runs"
        args = ServeArgs(**app["args"])
        assert args.model_dir.startswith("/mnt/runs/") and args.model_dir.endswith("/quantize/awq")
        assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    gpu = yaml.safe_load(next(d for p, d in docs("RayService") if "gpu-small" in str(p))["spec"]["serveConfigV2"])
    assert gpu["applications"][0]["args"]["num_gpus"] == 1


def test_a_replica_being_stopped_may_finish_a_request_as_long_as_one_may_run():
    from serve.app import ingress_options, model_options

    args = ServeArgs(model_dir="/mnt/runs/demo/quantize/awq", request_timeout_s=90)
    assert model_options(args)["graceful_shutdown_timeout_s"] == 90
    assert ingress_options(args)["graceful_shutdown_timeout_s"] == 90


def test_kustomization_lists_files_that_exist():
    for path, doc in docs("Kustomization"):
        for resource in doc["resources"]:
            assert (path.parent / resource).is_file()
