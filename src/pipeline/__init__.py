"""llm-pipeline: corpus -> curated data -> fine-tuned MoE LLM -> AWQ 4-bit -> Ray Serve endpoint."""

__version__ = "0.1.0"
