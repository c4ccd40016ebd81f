"""Building the model a config describes on the meta device (no weights, no memory): one way for
every stage that needs one: tracing, the cut plans' shape verification, bias compensation, the
shape check before ``apply``, and the class the streamed shell is built from."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

from structprune.errors import PlanError, TraceError
from structprune.models import formats


def load_config(source: Any) -> Any:
    """The transformers config of a config object (copied), a model directory or its config.json."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return copy.deepcopy(source)
    path = Path(source)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "config.json").is_file():
        raise TraceError(f"{path}: no config.json")
    try:
        # Never the model directory's own code (`auto_map`): with trust_remote_code unset,
        # transformers asks on stdin, and a piped "y" would run it.
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds
        raise TraceError(f"{path}: cannot read config.json: {err}") from err


def model_class(config: Any) -> Any:
    """The transformers class a config builds: its ``architectures[0]``, else the causal-LM or base auto class."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if archs:
        cls = getattr(transformers, archs[0], None)
        if cls is not None and hasattr(cls, "_from_config"):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    raise TraceError(f"no transformers model class for model_type {getattr(config, 'model_type', None)!r}")


def instantiate_on_meta(model_cls: Any, config: Any, attn: Optional[str]) -> Tuple[Any, str]:
    """The model on the meta device in float32, with sdpa attention where the class supports it
    (else eager). Returns ``(model, attn_implementation)``."""
    import torch

    choices = [attn] if attn else ["sdpa", "eager"]
    last: Optional[BaseException] = None
    for impl in choices:
        cfg = copy.deepcopy(config)
        try:
            with torch.device("meta"):
                if hasattr(model_cls, "from_config"):
                    model = model_cls.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
                else:
                    model = model_cls._from_config(cfg, attn_implementation=impl, dtype=torch.float32)
        except (ValueError, ImportError, NotImplementedError, TypeError) as err:
            last = err
            continue
        used = getattr(model.config, "_attn_implementation", None) or impl
        return model, used
    raise TraceError(f"cannot build {getattr(model_cls, '__name__', model_cls)} on the meta device: {last}")


def meta_model(source: Any) -> Any:
    """The model a config (or model directory) describes, on the meta device: no weights, no memory.
    Used to check that an edited config implies the shapes a cut plan writes."""
    config = load_config(source)
    model, _ = instantiate_on_meta(model_class(config), config, None)
    return model


def config_class(config: Mapping[str, Any]) -> Any:
    """The stock config class of a config.json's ``model_type``."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        raise PlanError("config.json has no model_type, so its edits cannot be checked")
    return type(AutoConfig.for_model(model_type))


def meta_model_of(config: Mapping[str, Any]) -> Any:
    """The model an edited config.json describes, in any format, on the meta device."""
    import torch

    if config.get("model_type") == formats.DECILM_MODEL_TYPE:
        from structprune.models.decilm.configuration_decilm import DeciLMConfig
        from structprune.models.decilm.modeling_decilm import DeciLMForCausalLM

        with torch.device("meta"):
            return DeciLMForCausalLM(DeciLMConfig.from_dict(dict(config)))
    model = meta_model(config_class(config).from_dict(dict(config)))
    with torch.device("meta"):
        formats.apply_layer_overrides(model, model.config)
    return model
