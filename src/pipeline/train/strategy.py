"""DeepSpeed settings derived from our config (the user never writes DeepSpeed JSON by hand)."""
from __future__ import annotations


def deepspeed_config(batch_size: int, grad_accum: int, grad_clip: float, lr: float,
                     zero_stage: int, use_gpu: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # torch_adam: the fused DeepSpeed Adam would JIT-compile a C++ op on CPU first
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "bf16": {"enabled": use_gpu},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
