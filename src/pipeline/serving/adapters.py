"""The LoRA adapters a server answers with beside its base model: every folder under `adapters_dir`
that holds a peft adapter, named by its folder (runs/<name>/adapters/<adapter>/ by default). A request
picks one with the OpenAI `model` field; the base keeps the server's model name."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger("pipeline.serve")
BASE = "__base__"  # peft's name for the rows of a mixed batch that no adapter changes


def find_adapters(adapters_dir: str | None, base_name: str) -> dict[str, Path]:
    """Adapter name -> folder, sorted by name; {} without a folder to look in (a RayService names the
    run's adapters folder before any adapter is trained into it)."""
    if not adapters_dir:
        return {}
    root = Path(adapters_dir)
    if not root.is_dir():
        log.warning("no adapters folder at %s: serving the base model alone", root)
        return {}
    found = {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}
    for clash in {base_name, BASE} & set(found):
        raise ConfigError(f"the adapter in {found[clash]} is named like the base model ({clash!r}): rename its folder")
    return found
