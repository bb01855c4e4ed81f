"""`model.quantization: fp8`: the decoder's linear layers as dynamic row-wise float8 (e4m3) matmuls.

Each `nn.Linear` inside the decoder (the attention and MLP projections; never the LM head, whose two label rows the
scorer reads in bf16, the embeddings or the norms) becomes an `Fp8Linear`: its weight stored once as e4m3 with one
float32 scale per output channel (the row's absolute maximum over 448, e4m3's largest finite value), and at every
call the activations quantized the same way, one scale per row (token), before `torch._scaled_mm` multiplies the two
on the GPU's fp8 tensor cores and applies both scales, giving bfloat16. "Dynamic": the activation scales are
computed from each forward's own values, so there is nothing to calibrate. The LoRA adapter is merged into the base
weights first (peft `merge_and_unload`, as `model.merge_adapter` does), so the adapter's update is quantized with
the weight it belongs to.

The module's forward is plain torch (amax, divide, clamp, cast, `_scaled_mm`), which dynamo traces: under the
compiled forwards (`forward: compiled*`) inductor fuses the activation quantization into the kernel before it, and
q/k/v (and gate/up), which quantize the same input, share one quantization (AOTAutograd's common-subexpression
pass). No package is needed beyond torch (torchao's `Float8DynamicActivationFloat8WeightConfig` does the same
arithmetic; it would have to travel to the GPU machines and match their torch).

Where it runs: float8 matmuls need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); on
Hopper row-wise scaling goes through cuBLAS, on Ada through CUTLASS, and both give bfloat16 only, which is why
`model.dtype` must be bfloat16 (or auto) with fp8 (config.py). Anywhere else (CPU, an A100, a float32 model on a
CPU actor) the scorer logs one warning line saying why and scores in the configured dtype; the applied setting is
what the scorer reports (`SentimentScorer.quantization`, the manifest's `quantization`): `fp8_rowwise`, or
`none (fp8 unavailable: ...)`. `_scaled_mm` wants the inner dimension and the output features to be multiples of
16: a linear of another shape stays in bfloat16 (and the applied setting counts it).

Accuracy: e4m3 keeps 3 mantissa bits, so each element is rounded by up to 2^-4 of itself (tests/model/test_fp8.py
bounds the round trip and a matmul's error against float32). Whether that costs scores anything measurable is what
benchmarks/gpu_fp8.py measures on SmolLM2 (accuracy, ECE, |Δp| against bf16) beside the 7B forward's speed.
"""

from __future__ import annotations

import logging

import torch

from sentiment_ray.config import NO_QUANTIZATION, QUANTIZATIONS

logger = logging.getLogger(__name__)

APPLIED_FP8 = "fp8_rowwise"
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# A row of zeros would get the scale 0 and divide by it: its scale is floored, and its values stay 0.
AMAX_FLOOR = 1e-12
DIMENSION_MULTIPLE = 16  # _scaled_mm's inner dimension and output features
MIN_CAPABILITY = (8, 9)
# cuBLAS's fast accumulation for fp8 (fewer promotions of partial sums to float32), as torchao's inference default.
FAST_ACCUM = True


def rowwise_scales(values):
    """[rows, 1] float32 scales: each row's absolute maximum over E4M3_MAX (values [rows, features])."""
    return values.abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR) / E4M3_MAX


def to_e4m3(values, scales):
    """`values / scales` rounded to float8 e4m3, clamped into its range first: float32 division can land a hair
    above 448, and what a cast does beyond e4m3's range is not the same on every device and torch version
    (saturating on this CPU build, NaN in some GPU kernels); clamped, it is the largest value everywhere."""
    return (values.float() / scales).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rowwise(values):
    """(e4m3 values, [rows, 1] float32 scales) of a 2-D tensor: values ≈ e4m3.float() * scales."""
    scales = rowwise_scales(values)
    return to_e4m3(values, scales), scales


def shape_fits(in_features: int, out_features: int) -> bool:
    return in_features % DIMENSION_MULTIPLE == 0 and out_features % DIMENSION_MULTIPLE == 0


class Fp8Linear(torch.nn.Module):
    """y = x Wᵀ (+ b) with W stored as e4m3 and per-output-channel scales, x quantized per row at each call.

    Buffers, not parameters: nothing here trains, and transformers' `model.dtype` (the first floating parameter)
    stays the embeddings' bfloat16."""

    def __init__(self, weight, weight_scale, bias=None, out_dtype=None, use_fast_accum: bool = FAST_ACCUM):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in] float8_e4m3fn, row-major: weight.t() is column-major
        self.register_buffer("weight_scale", weight_scale)  # [1, out] float32, contiguous
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype or torch.bfloat16
        self.use_fast_accum = use_fast_accum

    @classmethod
    def from_linear(cls, linear, use_fast_accum: bool = FAST_ACCUM) -> Fp8Linear:
        weight = linear.weight.detach()
        quantized, scales = quantize_rowwise(weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantized.contiguous(), scales.reshape(1, -1).contiguous(), bias, weight.dtype, use_fast_accum)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        quantized, scales = quantize_rowwise(rows)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scales, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype, use_fast_accum=self.use_fast_accum)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self):
        """The weight as the matmul sees it, in float32: e4m3 values times their channel's scale."""
        return self.weight.float() * self.weight_scale.t()

    def reference(self, x):
        """The same arithmetic without `_scaled_mm`, in float32 (both operands rounded to e4m3 and scaled back):
        what the fp8 matmul computes up to its accumulation order; for tests on machines without fp8 matmuls."""
        rows = x.reshape(-1, self.in_features)
        quantized, scales = quantize_rowwise(rows)
        out = (quantized.float() * scales) @ self.dequantized_weight().t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(self.out_dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"float8_e4m3fn row-wise, out {self.out_dtype}")


def quantize_linears(root, use_fast_accum: bool = FAST_ACCUM) -> tuple[int, int]:
    """Replace every plain `nn.Linear` under `root` whose shape `_scaled_mm` takes by an Fp8Linear, in place;
    (replaced, kept) counts. No check of the device: `quantize_for_scoring` decides whether fp8 can run."""
    replaced = kept = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if not shape_fits(child.in_features, child.out_features):
                kept += 1
                continue
            setattr(parent, name, Fp8Linear.from_linear(child, use_fast_accum))
            replaced += 1
    return replaced, kept


def fp8_modules(root) -> list[Fp8Linear]:
    return [m for m in root.modules() if isinstance(m, Fp8Linear)]


def unavailable_reason(device, dtype) -> str | None:
    """Why fp8 matmuls cannot run for a model on `device` with weights of `dtype` (None: they can)."""
    if getattr(torch, "float8_e4m3fn", None) is None or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8 matmul"
    if device.type != "cuda":
        return "no CUDA" if not torch.cuda.is_available() else f"the model is on {device.type}, not CUDA"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}, "
                f"fp8 matmuls need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+")
    if dtype != torch.bfloat16:
        return f"the model is {str(dtype).removeprefix('torch.')}, fp8 replaces a bfloat16 model's linears"
    try:  # the kernel itself: a build or driver without it fails here, not in the first batch
        probe = torch.nn.Linear(32, 32, bias=False, device=device, dtype=dtype)
        Fp8Linear.from_linear(probe)(torch.ones(16, 32, device=device, dtype=dtype))
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure means: not here
        return f"torch._scaled_mm failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def patched_layers(decoder) -> str | None:
    """The module whose code a decoder layer runs where it is not transformers' own (Unsloth patches the classes
    and reads the projections' weights directly), else None."""
    layers = getattr(decoder, "layers", None)
    if not layers:
        return None
    layer = layers[0]
    for module in (layer, getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
        owner = getattr(getattr(module, "forward", None), "__module__", None) or "?"
        if module is not None and not owner.startswith("transformers."):
            return owner
    return None


def quantize_for_scoring(model, quantization: str, use_fast_accum: bool = FAST_ACCUM):
    """(model, applied): the scoring model with its decoder's linears in fp8 where `quantization` is fp8 and this
    device can run it (an unmerged LoRA adapter merged first), and the setting as applied, for the manifest:
    "none", "fp8_rowwise", or "none (fp8 unavailable: why)" after one warning line."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == NO_QUANTIZATION:
        return model, NO_QUANTIZATION
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder()
    weight = next(decoder.parameters())
    reason = unavailable_reason(weight.device, weight.dtype)
    if reason is None and (owner := patched_layers(decoder)):
        reason = f"the decoder layers run {owner.split('.')[0]}'s code, not transformers'"
    if reason is None and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # the adapter's update is quantized with its weight
        decoder = model.get_decoder()
    if reason is None:
        replaced, kept = quantize_linears(decoder, use_fast_accum)
        if not replaced:
            reason = f"no decoder linear has dimensions that are multiples of {DIMENSION_MULTIPLE}"
        elif kept:
            applied = (f"{APPLIED_FP8} ({replaced} of {replaced + kept} decoder linears; {kept} kept in bfloat16: "
                       f"dimensions not multiples of {DIMENSION_MULTIPLE})")
            logger.info("model.quantization=fp8: %s", applied)
            return model, applied
        else:
            logger.info("model.quantization=fp8: %d decoder linears as row-wise float8 matmuls", replaced)
            return model, APPLIED_FP8
    dtype = str(weight.dtype).removeprefix("torch.")
    logger.warning("model.quantization=fp8 cannot run here (%s): float8 matmuls need a CUDA GPU of compute "
                   "capability >= 8.9 and a bfloat16 model; scoring in %s without it", reason, dtype)
    return model, f"none (fp8 unavailable: {reason})"
