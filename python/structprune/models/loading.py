"""Loading a checkpoint directory as a model for evaluation: one function, so every command
loads models the same way (and refuses the same broken ones)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union, cast

import torch

from structprune.models import formats
from structprune.io.checkpoint import read_config
from structprune.errors import ModelLoadError, SettingError
from structprune.io.dtypes import DtypeLike, compute_dtype

if TYPE_CHECKING:  # transformers is imported only when a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PathLike = Union[str, "os.PathLike[str]"]
def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """A usable torch device: ``cpu``, or ``cuda[:N]`` when CUDA is available and N exists; every
    command's ``--device`` goes through here, so each refuses the same way (:class:`SettingError`)."""
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise SettingError(f"--device: must be cpu or cuda[:N], got {device!r}", option="--device") from err
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"--device: {device!r} asked for, but torch.cuda.is_available() is False (no CUDA build of torch, or no GPU)", option="--device")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise SettingError(f"--device: {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist", option="--device")
    elif target.type != "cpu":
        raise SettingError(f"--device: must be cpu or cuda[:N], got {device!r}", option="--device")
    return target


def load_model(path: PathLike, *, dtype: DtypeLike, device: Union[str, torch.device]) -> "PreTrainedModel":
    """The model in the directory ``path``, in ``dtype`` on ``device``, in eval mode: a stock
    checkpoint through ``AutoModelForCausalLM`` (an encoder through the class its config's
    ``architectures`` names), a non-uniform one structprune wrote (DeciLM or ``layers`` format, see
    ``structprune.models.formats``) through the classes that rebuild its layers.

    Refused with :class:`ModelLoadError`: a path that is not a directory with ``config.json``
    (never looked up on the Hugging Face hub), weights transformers cannot read, and weights that
    are missing or of the wrong shape for the config (transformers would initialise those at
    random and only warn, which would make every figure measured on the model meaningless).
    """
    model_dir = Path(path)
    torch_dtype = compute_dtype(dtype)
    target = resolve_device(device)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory (a model is a local checkpoint directory)")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: not a model directory: config.json is missing")
    try:
        # trust_remote_code=False: a model directory's own code (`auto_map`) is never run, even
        # where transformers would ask on stdin (a DeciLM output is built by structprune's classes).
        model, loading_info = _model_class(model_dir).from_pretrained(
            model_dir, dtype=torch_dtype, local_files_only=True, output_loading_info=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"{model_dir}: transformers cannot load it as a causal LM or encoder: {err}") from err
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"{model_dir}: the checkpoint lacks weights the config needs: {shown}")
    model.to(target)
    model.eval()
    return model


def load_tokenizer(path: PathLike) -> "PreTrainedTokenizerBase":
    """The tokenizer saved in the model directory ``path``.

    Never runs remote code: a DeciLM checkpoint names its own configuration class in ``auto_map``,
    which would make ``AutoTokenizer`` ask whether to run it (and wait on stdin); the tokenizer
    does not need it."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the stock config class reading a nemotron-nas config warns about it
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot load its tokenizer: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)


def load_pruned(path: PathLike, *, dtype: DtypeLike = "float32", device: Union[str, torch.device] = "cpu") -> "PreTrainedModel":
    """A transformers model for any checkpoint structprune writes, whatever its format (stock,
    ``decilm`` or ``layers``); no remote code is run. Same checks as :func:`load_model`."""
    return load_model(path, dtype=dtype, device=device)


def _model_class(model_dir: Path) -> Any:
    """The class whose ``from_pretrained`` reads the checkpoint in ``model_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_config(model_dir)
    encoder = encoder_class(config) if isinstance(config, dict) else None
    if not isinstance(config, dict) or not formats.is_pruned_layout(config):
        return encoder or AutoModelForCausalLM
    if config.get("model_type") == formats.DECILM_MODEL_TYPE:
        from structprune.models.decilm.modeling_decilm import DeciLMForCausalLM

        return DeciLMForCausalLM
    if encoder is not None:
        return formats.pruned_model_class(encoder)
    stock_config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    try:
        stock_class = cast(type, AutoModelForCausalLM._model_mapping[type(stock_config)])
    except KeyError as err:
        raise ModelLoadError(f"{model_dir}: transformers has no causal LM for model_type {stock_config.model_type!r}") from err
    return formats.pruned_model_class(stock_class)


def encoder_class(config: Mapping[str, Any]) -> Optional[type]:
    """The transformers class a config's ``architectures`` names when it is an encoder (a class
    that cannot generate: ``BertModel``, ``RobertaForMaskedLM``…), else ``None``. An encoder's
    model type often has a causal-LM class too (``BertLMHeadModel``), which would load a
    sentence-embedding checkpoint with a random head."""
    import transformers

    architectures = config.get("architectures") or []
    named = getattr(transformers, str(architectures[0]), None) if architectures else None
    if named is None or not hasattr(named, "can_generate") or named.can_generate():
        return None
    return named


def is_encoder(model: Any) -> bool:
    """Whether a loaded model is an encoder (its class cannot generate)."""
    return not model.can_generate()


__all__ = ["load_model", "load_pruned", "load_tokenizer", "resolve_device"]
