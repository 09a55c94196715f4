"""Every model, adapter, tokenizer and model config the pipeline opens goes through here, so the rules
hold everywhere: weights come from safetensors only (a pickled .bin can run code when it is read), and
code shipped with a model (`auto_map`) runs only when `model.trust_remote_code` says so."""

from __future__ import annotations

import json
import os
import threading
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


# transformers builds a model under torch.set_default_dtype(its dtype) and sets the old default back after.
# That default is one per process, so two threads building at once (adapters trained side by side from
# one driver, say) can restore each other's 16-bit dtype as the default, and every float tensor made later
# in the process is 16-bit. Models are built one at a time per process.
_BUILDING = threading.RLock()


def load_model(auto_class, path: str | Path, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained(path)` under the rules: AutoModelForCausalLM, AutoModelForMaskedLM, ..."""
    _refuse_pickles(Path(path), "model", ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt"))
    with _BUILDING:
        return _from_pretrained(auto_class.from_pretrained, path, trust_remote_code, use_safetensors=True, **kwargs)


def model_from_config(auto_class, config, trust_remote_code: bool = False, **kwargs):
    """The architecture `config` describes, freshly initialised; under `torch.device("meta")` it allocates
    nothing (to count it, or when its weights come from elsewhere, e.g. another worker)."""
    with _BUILDING:
        return auto_class.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, path, trust_remote_code, **kwargs)


def load_model_config(path: str | Path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, path, trust_remote_code, **kwargs)


class Checkpoint:
    """The safetensors files of a Hugging Face model folder, read a tensor at a time, with `pread`: the pages
    of a memory-mapped file that were read stay in the process's resident memory until the file is closed,
    so reading a mapped checkpoint through costs its whole size however little is kept. A file stays open
    while the object lives (with `pread`, an open file holds no memory). `file_of`: each tensor's file,
    empty for a folder without safetensors."""

    def __init__(self, model_dir: str | Path):
        model_dir, self._handles = Path(model_dir), {}
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: model_dir / file for name, file in weight_map.items()}
            return
        self.file_of = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            self.file_of |= dict.fromkeys(self._file(file).keys(), file)

    def _file(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt", backend="pread")
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, name: str):
        return self._file(self.file_of[name]).get_tensor(name)

    def slice(self, name: str):
        """The tensor's shape and dtype (`get_shape()`, `get_dtype()`), read without its data."""
        return self._file(self.file_of[name]).get_slice(name)


RECORD = "pipeline.json"  # beside an adapter: the base it was trained on; beside a 4-bit model: its 16-bit source


def write_adapter_record(adapter: Path, base_model: str | Path, base_digest: str) -> None:
    (adapter / RECORD).write_text(json.dumps({"base_model": str(base_model), "base_digest": base_digest}, indent=2))


def write_quantized_record(quantized: Path, source: Path) -> None:
    """A quantized model stands for the 16-bit model it was made from: an adapter trained on that model
    serves on this one (adapters stay 16-bit over a 4-bit base, as vLLM serves them)."""
    from pipeline.digest import path_digest

    # relative: the two usually sit in one stage folder, which is renamed when it is complete
    record = {"quantized_from": os.path.relpath(source, quantized), "quantized_from_digest": path_digest(source)}
    (quantized / RECORD).write_text(json.dumps(record, indent=2))


def model_fingerprints(model: Path) -> set[str]:
    """The fingerprints an adapter's base may carry to fit `model`: its own, and its 16-bit source's."""
    from pipeline.digest import path_digest

    record = model / RECORD
    source = json.loads(record.read_text()).get("quantized_from_digest") if record.is_file() else None
    return {path_digest(model)} | ({source} if source else set())


def load_adapter(model, path: str | Path, adapter_name: str = "default", fits: set[str] | None = None, **kwargs):
    """A peft adapter onto `model` (a plain model, or a peft model that holds others already), from
    adapter_model.safetensors only, and only onto the base it was trained on when the adapter says which
    (pipeline.json, written by training). `fits`: the base's model_fingerprints, when already known."""
    from peft import PeftModel

    _refuse_pickles(Path(path), "adapter", ("adapter_model.bin",))
    check_adapter_base(Path(path), Path(model.name_or_path), fits)
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter_name, **kwargs)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, **kwargs)


def load_base_for_adapters(model_dir: str | Path, trust_remote_code: bool = False):
    """A causal LM that LoRA adapters can be loaded onto. peft adds LoRA to a layer's `weight`, which a
    compressed-tensors 4-bit layer holds packed; so its 4-bit values are unpacked once at load (the same
    rounded numbers, in 16 bits), as adapters stay 16-bit over a 4-bit base."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((Path(model_dir) / "config.json").read_text())
    packed = config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if packed else {}
    return load_model(AutoModelForCausalLM, model_dir, trust_remote_code, **kwargs)


def check_adapter_base(adapter: Path, base: Path, fits: set[str] | None = None) -> None:
    """`fits`: model_fingerprints(base), passed by a server that checks many adapters against one base."""
    record = adapter / RECORD
    if not record.is_file() or not base.is_dir():
        return
    trained_on = json.loads(record.read_text())
    fits = model_fingerprints(base) if fits is None else fits
    if trained_on.get("base_digest") and trained_on["base_digest"] not in fits:
        raise ConfigError(
            f"the adapter in {adapter} was trained on the base model in {trained_on['base_model']} "
            f"(fingerprint {trained_on['base_digest']}), and {base} is another model (fingerprint "
            f"{', '.join(sorted(fits))}): apply it to the base it was trained on, or train it again"
        )
