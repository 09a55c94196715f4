"""Every model, adapter, tokenizer and model config the pipeline opens goes through here, so the rules
hold everywhere: weights come from safetensors only (a pickled .bin can run code when it is read), and
code shipped with a model (`auto_map`) runs only when `model.trust_remote_code` says so."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError


def _refuse_pickles(path: Path, what: str, names: tuple[str, ...]) -> None:
    if path.is_dir() and not any(path.glob("*.safetensors")) and any((path / n).exists() for n in names):
        raise ConfigError(
            f"{path}: {what} weights are pickled ({', '.join(n for n in names if (path / n).exists())}); "
            "only safetensors are loaded, since unpickling can run code. Convert them with "
            "save_pretrained(..., safe_serialization=True) in a trusted environment"
        )


def _from_pretrained(load, path: str | Path, trust_remote_code: bool, **kwargs):
    try:
        return load(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(
                f"{path} needs the code it ships (auto_map) to load; set model.trust_remote_code=true "
                "only if you trust its source"
            ) from None
        raise


def load_model(auto_class, path: str | Path, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained(path)` under the rules: AutoModelForCausalLM, AutoModelForMaskedLM, ..."""
    _refuse_pickles(Path(path), "model", ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt"))
    return _from_pretrained(auto_class.from_pretrained, path, trust_remote_code, use_safetensors=True, **kwargs)


def empty_model(auto_class, config, trust_remote_code: bool = False, **kwargs):
    """The architecture `config` describes, without weights: built under `torch.device("meta")`, it
    allocates nothing (the weights come from elsewhere, e.g. another worker)."""
    return auto_class.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, path, trust_remote_code, **kwargs)


def load_model_config(path: str | Path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, path, trust_remote_code, **kwargs)


def load_adapter(model, path: str | Path, **kwargs):
    """A peft adapter onto `model`, from adapter_model.safetensors only, and only onto the base it was
    trained on when the adapter says which (pipeline.json, written by training)."""
    from peft import PeftModel

    _refuse_pickles(Path(path), "adapter", ("adapter_model.bin",))
    check_adapter_base(Path(path), Path(model.name_or_path))
    return PeftModel.from_pretrained(model, str(path), **kwargs)


def check_adapter_base(adapter: Path, base: Path) -> None:
    from pipeline.digest import path_digest

    record = adapter / "pipeline.json"
    if not record.is_file() or not base.is_dir():
        return
    trained_on = json.loads(record.read_text())
    if trained_on.get("base_digest") and trained_on["base_digest"] != path_digest(base):
        raise ConfigError(
            f"the adapter in {adapter} was trained on the base model in {trained_on['base_model']} "
            f"(fingerprint {trained_on['base_digest']}), and {base} is another model (fingerprint "
            f"{path_digest(base)}): apply it to the base it was trained on, or train it again"
        )
