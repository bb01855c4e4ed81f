"""What a base model's modules are, known on the driver without loading a weight: its architecture built on the
meta device from its config.json (a fraction of a second, even for 7B). Two user errors are found with it before
any work starts, where peft would otherwise find them inside every actor or training worker (and Ray Train
would retry them): `lora.target_modules` naming modules the base does not have, and an adapter whose weights do
not fit its own adapter_config.json or its base model.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# The keys of peft's LoRA matrices in an adapter file: the rank is dim 0 of A, dim 1 of B.
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")
SAVED_PREFIX = "base_model.model."


def meta_model(name_or_path: str, trust_remote_code: bool = False):
    """The base model's architecture with no weights (every tensor on the meta device), or None where it cannot be
    built here (an architecture this transformers does not know, remote code): then the loader has the last word,
    as before, and nothing is refused for it."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a check that cannot run must not refuse a model the loader may take
        logger.debug("could not build %s on the meta device; its modules are not checked here", name_or_path,
                     exc_info=True)
        return None


def adaptable_module_names(model) -> list[str]:
    """The names (last part, as lora.target_modules takes them) of the modules LoRA can adapt, sorted."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)})


def check_target_modules(name_or_path: str, target_modules: list[str], trust_remote_code: bool = False) -> None:
    """Every name in `target_modules` names at least one module of the base model (peft matches a name against
    the end of a module's dotted path), else a ConfigError naming the missing ones and the names there are."""
    from sentiment_ray.config import ConfigError

    model = meta_model(name_or_path, trust_remote_code)
    if model is None:
        return
    paths = [name for name, _ in model.named_modules() if name]
    missing = [t for t in target_modules if not any(p == t or p.endswith(f".{t}") for p in paths)]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                          f"a module of base model {name_or_path} ({type(model).__name__}); modules LoRA can adapt "
                          f"there: {', '.join(adaptable_module_names(model))}")


def _describe(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_adapter_weights(weights: str, shapes: dict[str, tuple], adapter_dir: Path, config_path: str,
                          base: str, trust_remote_code: bool = False) -> None:
    """The tensors of an adapter file (`shapes`: key -> shape, from its safetensors header; `weights` names the
    file in messages) are those peft builds from its adapter_config.json (`adapter_dir` holds it locally;
    `config_path` names it) on base model `base`: same keys, same shapes. An AdapterError names the first
    difference: a rank other than the config's r, a module the base does not have or of another size (the adapter
    belongs to another base model), LoRA weights of a module the config does not target, or none of one it does."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from peft.utils.error import NoMatchingPeftModuleError

    from sentiment_ray.model.errors import AdapterError

    model = meta_model(base, trust_remote_code)
    if model is None:
        return
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # noqa: BLE001 - whatever peft makes of a bad config, it is the config that is bad
        raise AdapterError(f"{config_path}: not a peft adapter config ({type(exc).__name__}: {exc})") from None
    config.inference_mode = True
    module_paths = {name for name, _ in model.named_modules() if name}
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        peft_model = get_peft_model(model, config)
    except NoMatchingPeftModuleError:
        targets = getattr(config, "target_modules", None)
        raise AdapterError(f"{config_path}: target_modules {sorted(targets or [])} name no module of base model "
                           f"{base} ({type(model).__name__}): the adapter belongs to another base model (pass "
                           "--base-model with that one) or its config is damaged") from None
    except Exception:  # noqa: BLE001 - a config peft cannot apply here is left to the loader to report
        logger.debug("could not apply %s to %s on the meta device", config_path, base, exc_info=True)
        return
    # save_embedding_layers=False: "auto" may look the base up on the hub; saved embeddings are checked below.
    expected = {k: tuple(v.shape) for k, v in
                get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    for key, shape in sorted(shapes.items()):
        lora = LORA_KEY.match(key)
        if key in expected:
            want = expected[key]
            if tuple(shape) == want:
                continue
            rank_dim = 0 if lora and lora["ab"] == "A" else 1
            if lora and len(shape) == len(want) and all(
                    a == b for d, (a, b) in enumerate(zip(shape, want)) if d != rank_dim):
                raise AdapterError(f"{weights}: LoRA rank {shape[rank_dim]} weights ({key} is {_describe(shape)}), "
                                   f"but {config_path} says r: {want[rank_dim]} for that module; the weights do not "
                                   "match their own config: copy or train the adapter again")
            raise AdapterError(f"{weights}: {key} is {_describe(shape)}, but base model {base} makes it "
                               f"{_describe(want)}: the adapter was trained on another base model; pass --base-model "
                               "with that one")
        module = lora["module"] if lora else key.removeprefix(SAVED_PREFIX).rsplit(".", 1)[0]
        if module not in module_paths:
            raise AdapterError(f"{weights}: holds {key}, for module {module}, which base model {base} "
                               f"({type(model).__name__}) does not have: the adapter was trained on another base "
                               "model; pass --base-model with that one")
        if lora:
            raise AdapterError(f"{weights}: holds LoRA weights for {module}, which {config_path} does not target "
                               "(target_modules); the weights do not match their own config: copy or train the "
                               "adapter again")
        saved = base_shapes.get(key.removeprefix(SAVED_PREFIX))
        if saved is not None and saved != tuple(shape):  # a saved full layer (embeddings) of another base
            raise AdapterError(f"{weights}: {key} is {_describe(shape)}, but base model {base} makes it "
                               f"{_describe(saved)}: the adapter was trained on another base model; pass "
                               "--base-model with that one")
    missing = [k for k in expected if LORA_KEY.match(k) and k not in shapes]
    if missing:
        matrices = "matrix" if len(missing) == 1 else "matrices"
        raise AdapterError(f"{weights}: has no weights for {len(missing)} LoRA {matrices} that {config_path} asks "
                           f"for (e.g. {missing[0]}); the weights do not match their own config: copy or train the "
                           "adapter again")
