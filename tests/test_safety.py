"""Safe loading: safetensors only, no model-shipped code unless trusted, safe YAML, loopback by default."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.loading import load_adapter, load_model


@pytest.fixture()
def tiny_dir(tmp_path):
    model = AutoModelForCausalLM.from_config(
        Qwen3Config(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=128,
        )
    )
    model.save_pretrained(tmp_path / "ok")
    return model, tmp_path


def test_pickled_weights_are_refused(tiny_dir):
    model, tmp = tiny_dir
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp / "ok" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickled.*only safetensors"):
        load_model(AutoModelForCausalLM, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(ConfigError, match="adapter weights are pickled"):
        load_adapter(model, pickled)
    assert load_model(AutoModelForCausalLM, tmp / "ok").config.vocab_size == 256


def test_models_loaded_in_16_bits_from_several_threads_leave_the_default_dtype_alone(tiny_dir):
    """transformers loads a model under torch.set_default_dtype(its dtype): two threads loading at once
    (adapters trained side by side from one driver) used to leave bfloat16 as the process's default,
    every time, and the next model built was 16-bit. load_model builds one model at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.loading import model_from_config

    model, tmp = tiny_dir

    def load(i: int) -> torch.dtype:
        if i % 2:
            return model_from_config(AutoModelForCausalLM, model.config).dtype
        return load_model(AutoModelForCausalLM, tmp / "ok", dtype=torch.bfloat16).dtype

    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            dtypes = list(pool.map(load, range(8)))
        assert dtypes == [torch.bfloat16, torch.float32] * 4
        assert torch.get_default_dtype() == torch.float32


def test_model_code_runs_only_when_trusted(tiny_dir):
    _, tmp = tiny_dir
    config = json.loads((tmp / "ok" / "config.json").read_text())
    config.update(
        model_type="shipped-code",
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"},
    )
    (tmp / "ok" / "config.json").write_text(json.dumps(config))
    (tmp / "ok" / "configuration_x.py").write_text("raise SystemExit('this code must not run')\n")
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        load_model(AutoModelForCausalLM, tmp / "ok")
    assert PipelineConfig().model.trust_remote_code is False


def test_config_yaml_cannot_construct_python_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not (tmp_path / "pwned").exists()


def test_everything_listens_on_loopback_by_default():
    cfg = PipelineConfig()
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.api_key_env == "PIPELINE_API_KEY"


@pytest.mark.integration
def test_local_ray_runs_without_a_dashboard(ray_local):
    import ray

    assert not ray.get_runtime_context().gcs_address.startswith("0.0.0.0")
    assert not ray._private.worker.global_worker.node.address_info.get("webui_url")


@pytest.mark.integration
def test_the_local_rays_processes_skip_the_actors_only_a_cluster_needs(ray_local):
    """Ray Data's Parquet footer pool sized to the local CPUs, Ray Train's preemption watcher off: set
    before the local Ray starts, so the processes it starts (where Ray Data and Ray Train run) see them."""
    import ray

    @ray.remote
    def settings() -> tuple:
        return tuple(
            os.environ.get(k) for k in ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
        )

    assert ray.get(settings.remote()) == ("1", "0")


ANOTHER_RAY = """
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
print("up", flush=True)
input()
cluster.shutdown()
"""
PROBE = "import ray; from pipeline.runtime import init_ray; init_ray(num_cpus=1); print(ray.cluster_resources()['CPU'])"


@pytest.mark.integration
def test_without_ray_address_a_run_starts_its_own_ray_beside_another_on_the_machine():
    """A Ray that `ray start` (or a test's cluster) left on this machine is not joined: ray.init() alone
    would find it through /tmp/ray and run the stage there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "up"
        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
        assert probe.stdout.split()[-1:] == ["1.0"], probe.stdout + probe.stderr[-3000:]
    finally:
        other.communicate("stop\n", timeout=120)
