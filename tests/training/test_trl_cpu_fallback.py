import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from sentiment_ray.training import trl_cpu_fallback
from sentiment_ray.training.trl_cpu_fallback import TorchLogProbFunction


def test_outputs_match_the_definitions():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(7, 16), torch.randn(50, 16), torch.randn(50)
    targets = torch.randint(0, 50, (7,))
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = TorchLogProbFunction.apply(
        hidden, weight, bias, targets, 2.0, 1024, None, 0.5, outputs)
    logits = (hidden @ weight.t() + bias) * 0.5 / 2.0
    probs = logits.softmax(-1)
    torch.testing.assert_close(log_probs, probs.log()[torch.arange(7), targets])
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(log_sum_sq, (probs ** 2).sum(-1).log())
    torch.testing.assert_close(mean_logits, logits.mean(-1))
    assert torch.equal(is_top1, logits.argmax(-1) == targets)


def test_softcapping_and_unrequested_outputs():
    hidden, weight = torch.randn(3, 8), torch.randn(10, 8)
    targets = torch.tensor([1, 2, 3])
    log_probs, entropy, *_ = TorchLogProbFunction.apply(hidden, weight, None, targets, 1.0, 1024, 5.0, 1.0,
                                                        ("log_probs",))
    logits = 5.0 * torch.tanh((hidden @ weight.t()) / 5.0)
    torch.testing.assert_close(log_probs, logits.log_softmax(-1)[torch.arange(3), targets])
    assert entropy is None


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="TRL uses its Triton kernel here")
def test_trl_fused_head_with_fallback_equals_the_models_own_loss_and_gradients(tiny_model_dir):
    """SFTTrainer's patched forward, fed by the fallback, must give the transformers loss exactly."""
    from trl.trainer.utils import add_fused_lm_head

    trl_cpu_fallback.install()
    torch.manual_seed(0)
    native = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fused = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_fused_lm_head(fused, outputs=("log_probs", "entropy", "is_top1"))
    input_ids = torch.randint(3, 400, (2, 12))
    labels = input_ids.clone()
    labels[:, :8] = -100  # completion-only, as SFTTrainer builds them
    native_loss = native(input_ids=input_ids, labels=labels).loss
    fused_loss = fused(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
    torch.testing.assert_close(fused_loss, native_loss, rtol=1e-5, atol=1e-6)
    native_loss.backward()
    fused_loss.backward()
    for (name, a), (_, b) in zip(native.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
