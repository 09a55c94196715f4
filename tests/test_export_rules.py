"""The export rules without Ray: the quality gate's decision, and refusing what could not be loaded back."""

import pytest

from pipeline.config import ConfigError


def test_quality_gate_decisions():
    from pipeline.export.stage import gate

    ok = gate({"perplexity_change": 0.015}, 0.02, force=False)
    assert ok["gate"]["passed"] and ok["serve_model"] == "awq"
    bad = gate({"perplexity_change": 0.05}, 0.02, force=False)
    assert not bad["gate"]["passed"] and bad["serve_model"] is None
    forced = gate({"perplexity_change": 0.05}, 0.02, force=True)
    assert forced["gate"]["forced"] and forced["serve_model"] == "awq"


def test_asymmetric_awq_of_moe_experts_is_refused_before_calibrating(tiny_model_dir):
    from pipeline.export.awq import check_supported

    check_supported(tiny_model_dir, symmetric=True, trust_remote_code=False)
    with pytest.raises(ConfigError, match="quantize.symmetric=true"):
        check_supported(tiny_model_dir, symmetric=False, trust_remote_code=False)
