import pytest

from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config


def test_demo_config_loads_with_typed_overrides():
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            "train.lr=1e-4",
            "train.lora.r=8",
            "data.dedup.threshold=0.9",
            "data.input=[a.jsonl, b.jsonl]",
            "serve.port=9000",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.lora.r == 8
    assert cfg.data.dedup.threshold == 0.9
    assert cfg.data.input == ["a.jsonl", "b.jsonl"]
    assert cfg.serve.port == 9000


def test_unknown_key_names_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, ["train.lrr=0.1"])
    msg = str(e.value)
    assert "train.lrr: unknown key" in msg
    assert "lr" in msg and "max_steps" in msg


def test_bad_value_names_the_key_and_the_value():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, ["train.zero_stage=5"])
    assert "train.zero_stage" in str(e.value) and "5" in str(e.value)
    with pytest.raises(ConfigError, match="train.lr.*'fast'"):
        load_config(DEFAULT_CONFIG, ["train.lr=fast"])


def test_cross_field_rule_and_malformed_override():
    with pytest.raises(ConfigError, match="max_replicas"):
        load_config(DEFAULT_CONFIG, ["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(DEFAULT_CONFIG, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such.yaml")


def test_stage_dirs_live_under_runs_name(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, [f"runs_dir={tmp_path}", "name=exp1"])
    assert cfg.stage_dir("train") == tmp_path / "exp1" / "train"


def test_dedup_knobs_have_short_forms():
    cfg = load_config(None, ["dedup.threshold=0.85", "dedup.num_perm=64", "dedup.ngram=3"])
    assert (cfg.data.dedup.threshold, cfg.data.dedup.num_perm, cfg.data.dedup.ngram) == (0.85, 64, 3)


def test_adapters_are_named_apart_and_learn_from_their_own_data():
    one = "{name: support, stages: [{kind: sft, data: data/instructions.jsonl}], lora: {r: 4}}"
    cfg = load_config(DEFAULT_CONFIG, [f"adapters=[{one}]"])
    assert cfg.adapter("support").lora.r == 4 and cfg.adapter("support").stages[0].kind == "sft"
    with pytest.raises(ConfigError, match="no adapter 'sales' in this config; it has: support"):
        cfg.adapter("sales")
    with pytest.raises(ConfigError, match="distinct names"):
        load_config(DEFAULT_CONFIG, [f"adapters=[{one}, {one}]"])
    with pytest.raises(ConfigError, match="distinct names, none the run's own"):
        load_config(DEFAULT_CONFIG, ["adapters=[{name: demo, stages: [{kind: sft, data: data/instructions.jsonl}]}]"])
    with pytest.raises(ConfigError, match="stage kinds sft or dpo"):
        load_config(DEFAULT_CONFIG, ["adapters=[{name: x, stages: [pretrain]}]"])
    with pytest.raises(ConfigError, match="pretrain with `where`"):
        load_config(DEFAULT_CONFIG, ["adapters=[{name: x, stages: [{kind: pretrain}]}]"])
    part = load_config(DEFAULT_CONFIG, ["adapters=[{name: libs, stages: [{kind: pretrain, where: {id: 'lib*'}}]}]"])
    assert part.adapter("libs").stages[0].where == {"id": "lib*"}
    with pytest.raises(ConfigError, match="`where` picks curated documents for a pretrain stage"):
        load_config(
            DEFAULT_CONFIG,
            ["adapters=[{name: x, stages: [{kind: sft, data: data/instructions.jsonl, where: {id: a}}]}]"],
        )
    twice = "{kind: sft, data: data/instructions.jsonl}"
    with pytest.raises(ConfigError, match="stages need distinct names"):
        load_config(DEFAULT_CONFIG, [f"adapters=[{{name: x, stages: [{twice}, {twice}]}}]"])
