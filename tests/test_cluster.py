"""The KubeRay manifests parse and point at things that exist in this repo."""
from pathlib import Path

import yaml

from conftest import REPO
from pipeline.config import load_config

MANIFESTS = sorted((REPO / "cluster").rglob("*.yaml"))


def test_every_manifest_is_a_kuberay_v1_document():
    assert MANIFESTS
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1", path
            assert doc["kind"] in {"RayCluster", "RayJob", "RayService"}, path


def test_rayjob_entrypoint_script_config_and_runtime_env_exist():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "RayJob":
                continue
            python, script, flag, config, *overrides = doc["spec"]["entrypoint"].split()
            assert (python, flag) == ("python", "--config")
            assert (REPO / script).is_file() and script.startswith("rayjobs/")
            load_config(REPO / config, overrides)  # the job's config and overrides validate
            runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert isinstance(runtime_env, dict) and runtime_env["working_dir"] == "."
            head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
            assert head["dashboard-host"] == "127.0.0.1" and head["num-cpus"] == "0"
            assert Path(config).suffix == ".yaml"
