"""A plain-PyTorch stand-in for TRL 1.15's Triton log-prob kernel, so SFTTrainer trains on CPU.

TRL 1.15 routes SFTTrainer's loss through `ChunkedLogProbFunction`, a Triton kernel; a CPU torch has no Triton,
TRL leaves the name `None`, and training dies at step 1 (`'NoneType' object has no attribute 'apply'`). TRL 1.16
has a fallback, but unsloth 2026.10.9 caps trl at 1.15.0. This module computes the same five per-token outputs
with ordinary autograd; it is installed only where TRL found no kernel, so GPU runs keep the fused one.
"""

from __future__ import annotations


class TorchLogProbFunction:
    """Same call signature and outputs as `trl.kernels.ChunkedLogProbFunction.apply`."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        import torch

        logits = hidden.float() @ weight.float().t()
        if bias is not None:
            logits = logits + bias.float()
        logits = logits * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logits = logits / temperature
        log_probs_all = torch.log_softmax(logits, dim=-1)
        log_probs = log_probs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = log_sum_sq_probs = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = -(log_probs_all.exp() * log_probs_all).sum(-1)
        if "log_sum_sq_probs" in outputs:
            log_sum_sq_probs = torch.logsumexp(2 * log_probs_all.detach(), dim=-1)
        if "mean_logits" in outputs:
            mean_logits = logits.detach().mean(-1)
        if "is_top1" in outputs:
            is_top1 = logits.detach().argmax(-1) == targets  # argmax takes the first maximum, as the kernel does
        return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def install() -> bool:
    """Put the fallback in place if TRL has no kernel here; True when it was installed."""
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is None:
        trl_utils._ChunkedLogProbFunction = TorchLogProbFunction
        return True
    return False
