"""Which LoRA adapter answers each row of a batch, and the arithmetic that applies them all at once.

peft can mix adapters in one batch (`adapter_names`), but two things stand in a server's way:
- It applies a mixed batch adapter by adapter: at every LoRA layer and every generated token, each
  adapter in the batch gathers its rows, runs its two small matmuls and scatters them back. With 8
  adapters in a batch of 8 the demo's model generated at half the speed of the same batch on one adapter.
- It hands the names to the layers through hooks that it adds to the whole model for the length of a
  `generate` call, so two generations at once on one replica (a stream beside a batch) read each other's.

So each LoRA linear layer keeps its adapters' weights stacked (slot 0 is no adapter: zeros; a smaller
rank is padded with zeros, which add nothing; the scale is folded into B), and a batch gathers each
row's slot and applies every adapter in two batched matmuls, as vLLM's punica kernels do on GPUs. peft
still loads, holds and unloads the adapters; the stacks are rebuilt from its weights after each change.
A module an adapter trained in full (modules_to_save) answers each row with that row's adapter's copy
(peft would use its one active adapter's copy, or none, for every row). The rows are set per thread, so
concurrent generations stay apart. Any other adapter layer (DoRA or a bias on B, LoRA on embeddings or
on parameters) takes peft's own per-row path, given the same per-thread names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

from pipeline.serving.adapters import BASE


class AdapterRows:
    def __init__(self):
        self.local = threading.local()
        self.slot: dict[str, int] = {}  # peft's adapter name -> its slot in every stack (0: none)
        self.stacks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.hooks: list = []
        self.switched_off: list = []  # layers whose peft forward is the base module alone while installed

    def install(self, model) -> None:
        """Stack the adapters `model` holds and hook its LoRA layers (call it after every change to them,
        while nothing generates); a model without adapters gets nothing."""
        self.uninstall()
        if not isinstance(model, PeftModel):
            return
        layers = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        names = sorted({name for m in layers if isinstance(m, LoraLayer) for name in m.lora_A})
        self.slot = {name: i + 1 for i, name in enumerate(names)}
        for layer in layers:
            if isinstance(layer, LoraLinear) and is_plain(layer):
                self.stacks.append(stacked(layer, self.slot))
                self._switch_off(layer, partial(self._add_rows, *self.stacks[-1]))
            elif isinstance(layer, ModulesToSaveWrapper):
                self._switch_off(layer, self._own_copies)
            else:
                self.hooks.append(layer.register_forward_pre_hook(self._name_rows, with_kwargs=True))

    def _switch_off(self, layer, hook) -> None:
        """peft's forward of `layer` becomes its base module's; `hook` adds each row's adapter to that.
        peft's own flag is set directly: enable_adapters() also changes requires_grad, and on a
        modules_to_save wrapper it fails when the active adapter holds no copy there."""
        layer._disable_adapters = True
        self.switched_off.append(layer)
        self.hooks.append(layer.register_forward_hook(hook))

    def uninstall(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for layer in self.switched_off:
            layer._disable_adapters = False
        self.hooks, self.switched_off, self.stacks, self.slot = [], [], [], {}

    def stacked_bytes(self) -> int:
        """Memory the stacks take (beside peft's own copy of the adapters)."""
        return sum(t.numel() * t.element_size() for stack in self.stacks for t in stack)

    @contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Each row's adapter (peft's name; None or BASE for none) for the forward passes this thread runs."""
        peft_names = [name or BASE for name in names]
        slots = [self.slot.get(name, 0) for name in peft_names]
        # made once per generate on the stacks' device, not once per layer and token
        device = self.stacks[0][0].device if self.stacks else None
        self.local.names = peft_names
        self.local.slots = torch.tensor(slots, device=device) if any(slots) else None
        try:
            yield
        finally:
            self.local.names = self.local.slots = None

    def _name_rows(self, module, args, kwargs):
        names = getattr(self.local, "names", None)
        return None if names is None else (args, {**kwargs, "adapter_names": names})

    def _own_copies(self, module: ModulesToSaveWrapper, args, output: torch.Tensor):
        """The rows whose adapter trained this module in full get that copy's output."""
        names = getattr(self.local, "names", None) or []
        for name in set(names) & set(module.modules_to_save):
            rows = torch.tensor([i for i, row in enumerate(names) if row == name], device=output.device)
            output = output.index_copy(0, rows, module.modules_to_save[name](args[0][rows]).to(output.dtype))
        return output

    def _add_rows(self, a_stack: torch.Tensor, b_stack: torch.Tensor, module, args, output: torch.Tensor):
        slots = getattr(self.local, "slots", None)
        if slots is None:  # no row has an adapter
            return None
        x = args[0]
        if x.shape[0] != len(slots):
            raise RuntimeError(f"a batch of {x.shape[0]} rows was given adapters for {len(slots)}")
        h = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_stack.dtype)  # [rows, tokens, in]
        low = torch.bmm(h, a_stack[slots].transpose(1, 2))  # [rows, tokens, rank]
        delta = torch.bmm(low, b_stack[slots].transpose(1, 2))  # [rows, tokens, out]
        return output + delta.reshape(output.shape).to(output.dtype)


def is_plain(layer: LoraLinear) -> bool:
    """Every adapter of the layer is A then B times a scale: no DoRA or other variant, no bias on B."""
    return not layer.lora_variant and not any(layer.lora_bias.values())


def stacked(layer: LoraLinear, slot: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's adapters as [slots, rank, in] and [slots, out, rank] (scale folded into B); the slot of an
    adapter that does not touch this layer stays zero, as does slot 0."""
    held = [name for name in slot if name in layer.lora_A]
    first = layer.lora_A[held[0]].weight
    rank = max(layer.lora_A[name].weight.shape[0] for name in held)
    a_stack = first.new_zeros(len(slot) + 1, rank, layer.in_features)
    b_stack = first.new_zeros(len(slot) + 1, layer.out_features, rank)
    with torch.no_grad():
        for name in held:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a_stack[slot[name], : a.shape[0]] = a
            b_stack[slot[name], :, : b.shape[1]] = b * layer.scaling[name]
    return a_stack, b_stack
