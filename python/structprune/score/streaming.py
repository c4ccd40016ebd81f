"""Running a causal LM one block at a time, weights read from the checkpoint block by block.

Peak memory is one decoder block plus the parts outside the blocks (embeddings, final norm, head)
plus the calibration activations, whatever the model's depth: a 65B checkpoint is scored on one
GPU. The model's own modules do the computation: a one-block *shell* of the model (same class,
``num_hidden_layers = 1``) holds the non-block weights, and its single block is refilled with each
layer's weights in turn; blocks that the model builds differently from their index (DeepSeek's dense
blocks before mixture-of-experts ones) run in a block of their own structure, swapped in as they
load (``StreamedModel.load_block``). The arguments the model passes to its blocks (rotary embeddings, masks,
positions) are captured by running the shell with a module standing in for the block that records
its call and stops; the loss is computed by running the shell with a stand-in that returns the last
block's output. So any decoder-only transformers model whose blocks are called one after another is
supported without model-specific code. Encoders (a model class that cannot generate: BERT,
RoBERTa, DistilBERT…) run the same way on padded passages under an attention mask, with the MLM
loss where the checkpoint has an MLM head, else the embedding probe of ``structprune.models.sentence``.

Gradients go backwards block by block: each block is recomputed from its saved input and the
incoming gradient is back-propagated through it, giving exactly the gradients of full-model
autograd (tests check this to 1e-5) with one block's weights in memory. Both passes can start at a
given block (``start``), from saved activations and a saved ``BackwardState``, so that an
interrupted run resumes (``structprune.score.journal``).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, Iterator, List, Optional, Sequence, Set, Tuple, cast

import torch
from torch import nn

from structprune.io.atomic import write_atomically
from structprune.io.checkpoint import TensorInfo, read_checkpoint
from structprune.io.dtypes import SAFETENSORS_DTYPES
from structprune.models.loading import is_encoder
from structprune.models.sentence import pool, probe_loss, read_pooling
from structprune.score.calibration import attention_mask
from structprune.errors import StreamingError
from structprune.score.float32_compute import float32_linears
from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY
from structprune.tracing.export import ExpertPiece, checkpoint_layout

if TYPE_CHECKING:
    from structprune.score.lora_probes import AdapterGrads



@dataclass
class ParamStats:
    """What the importance estimators see of one parameter of one block (model naming).

    The tensors are the loaded block's own storage (no copies, so that scoring holds one block's
    weights and gradients, not two): they are valid during the call that receives them and are
    overwritten when the next block loads. Copy them to keep them."""

    name: str
    weight: torch.Tensor
    grad: Optional[torch.Tensor] = None
    """Gradient of the summed calibration loss (sum over samples of per-sample mean-token losses / N)."""
    fisher: Optional[torch.Tensor] = None
    """Mean over samples of the squared per-sample gradient."""
    adapter: Optional["AdapterGrads"] = None
    """A LoRA adapter on this weight and its gradients, in place of ``grad`` (``lora-grad``)."""


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        super().__init__("captured block inputs")
        self.hidden, self.args, self.kwargs = hidden, args, kwargs


class _Capture(nn.Module):
    """Stands in for block 0: records how the model calls its blocks, then stops the forward."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(hidden_states, args, kwargs)


class ArgumentsByKind(dict):
    """The keyword arguments the model passes to block 0, carrying the positional and keyword
    arguments of every kind of block (``by_kind``), for a model whose config's ``layer_types``
    mixes attention kinds: each kind has its own mask (sliding window or full) and, in Gemma 3, its
    own rotary table. ``StreamedModel.run_block`` picks the loaded block's; every caller passes them
    through unchanged."""

    def __init__(self, kwargs: Dict[str, Any], by_kind: Dict[str, Tuple[Tuple[Any, ...], Dict[str, Any]]]) -> None:
        super().__init__(kwargs)
        self.by_kind = by_kind


class _Inject(nn.Module):
    """Stands in for block 0: returns a given tensor as the output of the last block."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.output


class ActivationStore:
    """Saved block inputs, in memory up to a byte budget and on disk past it.

    Without ``directory`` the disk part is a temporary directory removed by ``close``. With one,
    every tensor is also written there (atomically, as ``BLOCK-MICROBATCH.pt``) and kept after
    ``close``, so that a resumed run reads the activations an interrupted one saved."""

    def __init__(self, budget: int = DEFAULT_ACTIVATION_MEMORY, directory: Optional[Path] = None) -> None:
        self.budget = budget
        self.in_memory = 0
        self.directory = directory
        self._tensors: Dict[Tuple[int, int], torch.Tensor] = {}
        self._disk_only: Set[Tuple[int, int]] = set()
        self._temporary: Optional[tempfile.TemporaryDirectory] = None

    def put(self, key: Tuple[int, int], tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        self._forget(key)
        fits = self.in_memory + size <= self.budget
        if fits:
            self._tensors[key] = tensor.to("cpu", copy=True) if tensor.device.type != "cpu" else tensor.clone()
            self.in_memory += size
        else:
            self._disk_only.add(key)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_torch_atomically(tensor.cpu(), self.directory / _activation_file(key))
        elif not fits:
            torch.save(tensor.cpu(), self._temporary_dir() / _activation_file(key))

    def get(self, key: Tuple[int, int], device: torch.device) -> torch.Tensor:
        """The saved tensor as a new tensor object (sharing memory when it is in memory already on
        ``device``), so that a caller marking it for gradients leaves the stored one untouched."""
        if key in self._tensors:
            return self._tensors[key].detach().to(device)
        path = (self.directory or self._temporary_dir()) / _activation_file(key)
        if not path.is_file():
            raise StreamingError(f"{path}: no saved input of block {key[0]}, micro-batch {key[1]}")
        return torch.load(path, map_location=device, weights_only=True)

    def release(self, key: Tuple[int, int]) -> None:
        """Frees the memory copy of a saved input no pass will read again (a copy in ``directory``
        stays, for resuming)."""
        dropped = self._tensors.pop(key, None)
        if dropped is not None:
            self.in_memory -= dropped.numel() * dropped.element_size()

    def discard(self, key: Tuple[int, int]) -> None:
        """Forgets a saved input for good: its memory copy and its file (in ``directory`` too)."""
        self._forget(key)
        folder = self.directory or (Path(self._temporary.name) if self._temporary is not None else None)
        if folder is not None:
            (folder / _activation_file(key)).unlink(missing_ok=True)

    @property
    def spilled(self) -> int:
        """How many of the activations put here went to disk only (past the budget)."""
        return len(self._disk_only)

    def close(self) -> None:
        self._tensors.clear()
        self.in_memory = 0
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def _forget(self, key: Tuple[int, int]) -> None:
        self._disk_only.discard(key)
        self.release(key)

    def _temporary_dir(self) -> Path:
        if self._temporary is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="structprune-activations-")
        return Path(self._temporary.name)


def save_torch_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`structprune.io.atomic.write_atomically`."""
    write_atomically(path, lambda temporary: torch.save(obj, temporary))


def _activation_file(key: Tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}.pt"


# glibc's mallopt parameter number for the size from which allocations get their own mapping.
_M_MMAP_THRESHOLD = -3
HEAP_MAPPING_THRESHOLD = 1 << 20


def _map_large_allocations() -> None:
    """Makes every allocation of ``HEAP_MAPPING_THRESHOLD`` bytes or more a mapping of its own,
    returned to the OS when freed. glibc otherwise raises this threshold (up to 32 MiB) each time a
    mapped chunk is freed, after which a block's activations and gradient slices (1–32 MiB each)
    come from the heap, whose freed holes stay resident: 0.3–0.4 GB more at the peak of a 7B block's
    backward pass. Process-wide, as the setting is. A no-op where mallopt is absent."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_MAPPING_THRESHOLD)


def _return_freed_heap(*, full_collection: bool = False) -> None:
    """Hands heap pages freed by earlier work back to the OS. glibc keeps them otherwise: tracing
    frees hundreds of MB of small Python objects just before scoring, and a block's backward pass
    many more, while block weights and gradients come from fresh mappings, so without this the
    freed heap and the next block add up in the resident set. A no-op where malloc_trim is absent.

    Between blocks only the young generations are collected: what a block's work leaves in
    reference cycles is young, and a full collection walks every object torch and transformers
    hold (~400 k), 0.1–1 s each time: 70 of the 84 s of a small SmolLM2 scoring run on a busy machine."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    gc.collect(2 if full_collection else 1)
    trim(0)


def _stored_dtype(model_dir: Path, info: TensorInfo) -> torch.dtype:
    if info.dtype not in SAFETENSORS_DTYPES:
        raise StreamingError(f"{model_dir / info.file}: tensor '{info.name}' is stored as {info.dtype}; scoring reads {', '.join(SAFETENSORS_DTYPES)}")
    return SAFETENSORS_DTYPES[info.dtype]


def _read_bytes(model_dir: Path, info: TensorInfo, into: torch.Tensor) -> None:
    """Fills the CPU uint8 tensor ``into`` with the tensor's stored bytes. Plain reads rather than a
    memory map: mapped pages count in the resident set for as long as the map lives, and
    safetensors' reader copies each tensor once more on top."""
    assert info.offset is not None and into.numel() == info.nbytes
    path = model_dir / info.file
    window = into.numpy().data
    descriptor = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            count = os.preadv(descriptor, [window[done:]], info.offset + done)
            if count == 0:
                raise StreamingError(f"{path}: tensor '{info.name}' ends at byte {info.offset + info.nbytes}, past the end of the file")
            done += count
    finally:
        os.close(descriptor)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def holds(block: nn.Module, path: str) -> bool:
    """Whether ``block`` has a submodule at ``path`` (blocks of different structure hold different ones)."""
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def _experts_kernel(model_class: Any, dtype: torch.dtype) -> Dict[str, str]:
    """The experts kernel for the shell where transformers' default cannot run: its ``grouped_mm``
    has no float64 kernel (the eager per-expert loop computes the same in any dtype)."""
    can_set = getattr(model_class, "_can_set_experts_implementation", None)
    if dtype == torch.float64 and can_set is not None and can_set():
        return {"experts_implementation": "eager"}
    return {}


def _layer_kinds(config: Any, blocks: int) -> List[str]:
    """Each block's ``layer_types`` entry (sliding or full attention…) where the config mixes
    several; empty where every block is of one kind."""
    kinds = getattr(config, "layer_types", None)
    if not isinstance(kinds, (list, tuple)) or len(kinds) != blocks or len(set(kinds)) < 2:
        return []
    return [str(kind) for kind in kinds]


class StreamedModel:
    """A causal LM checkpoint run block by block (see the module docstring)."""

    def __init__(
        self,
        model_dir: os.PathLike | str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        blocks_prefix: str,
    ) -> None:
        from transformers import AutoConfig

        _map_large_allocations()
        _return_freed_heap(full_collection=True)
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.prefix = blocks_prefix
        self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        self.num_blocks = int(self.config.num_hidden_layers)
        self.block_returns_tuple = False
        """Whether the blocks return a tuple (older transformers) rather than a tensor: seen when a
        block runs; the loss pass mimics it."""
        self._pieces: Dict[str, List[Tuple[ExpertPiece, TensorInfo]]] = {}
        """Stacked expert parameters (model names) → the per-expert checkpoint tensors they are read from."""
        self._stored = self._index_checkpoint()
        self.layer_kinds = _layer_kinds(self.config, self.num_blocks)
        """Each block's ``layer_types`` entry where the config mixes several kinds; empty otherwise."""
        self.shell = self._build_shell()
        self.encoder = is_encoder(self.shell)
        """An encoder reads padded passages (``structprune.score.calibration.passage_batch``) under
        an attention mask; its loss is the MLM loss or, without an MLM head, the embedding probe."""
        without_head = cast(Any, self.shell).get_output_embeddings() is None
        self.pooling = read_pooling(self.model_dir) if self.encoder and without_head else None
        """An encoder without an MLM head: the pooling of its embeddings, for the probe loss."""
        self.stack = cast(nn.ModuleList, self.shell.get_submodule(self.prefix))
        self.block = self.stack[0]
        """The module that runs the loaded block: its group's representative (``load_block``)."""
        self._loaded_kind: Optional[str] = None
        self._group = 0
        self._group_of, self._representatives, self._block_shapes = self._block_groups()
        self._outside_names: List[str] = []
        self._outside_loaded: Set[str] = set()
        self._load_outside_blocks()

    # -- loading ---------------------------------------------------------------------------------

    def _index_checkpoint(self) -> Dict[str, TensorInfo]:
        """The stored tensors under the model's names for them (per-expert tensors that transformers
        stacks on load go to ``_pieces``)."""
        checkpoint = read_checkpoint(self.model_dir)
        names_on_load = checkpoint_layout(self.model_dir, list(checkpoint.tensors))
        for name, piece in names_on_load.experts.items():
            self._pieces.setdefault(piece.param, []).append((piece, checkpoint.tensors[name]))
        return {model_name: checkpoint.tensors[name] for name, model_name in names_on_load.renamed.items()}

    def _build_shell(self) -> nn.Module:
        from structprune.models.meta import model_class as shell_class

        shell_config = copy.deepcopy(self.config)
        for key in _per_layer_keys(self.config, self.num_blocks):
            setattr(shell_config, key, getattr(shell_config, key)[:1])
        shell_config.num_hidden_layers = 1
        # With blocks of several kinds, one block of each is built, so that what the model sets up
        # per kind (Gemma 3's rotary table for each) exists; the blocks after the first are dropped.
        kinds = list(dict.fromkeys(self.layer_kinds))
        if kinds:
            shell_config.num_hidden_layers, shell_config.layer_types = len(kinds), kinds
        model_class = shell_class(shell_config)
        # SDPA where the architecture has it; Gemma 2's soft-capped attention has only the eager path.
        attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
        with _no_init(), torch.device(self.device):
            model = model_class._from_config(shell_config, dtype=self.dtype, attn_implementation=attention, **_experts_kernel(model_class, self.dtype))
        if kinds:
            del cast(nn.ModuleList, model.get_submodule(self.prefix))[1:]
            model.config.num_hidden_layers, model.config.layer_types = 1, kinds[:1]
        # Skipping initialisation also skips tying; tie before loading so tied weights load once.
        model.tie_weights()
        model.eval()
        model.requires_grad_(False)
        if not isinstance(model.get_submodule(self.prefix), nn.ModuleList):
            raise StreamingError(f"{self.prefix} is not the block list of {type(model).__name__}")
        return model

    def _block_groups(self) -> Tuple[List[int], List[nn.Module], List[Dict[str, torch.Size]]]:
        """Each block's group, one module per group (the *representative* that runs its blocks)
        and each group's parameter shapes.

        Blocks are grouped by what the model builds for their layer index: the classes of their
        submodules and their parameters' and buffers' names and shapes, read from the whole model
        built on the meta device (no memory), and by their ``layer_types`` kind. The modeling code
        decides the structure from the index (DeepSeek's ``first_k_dense_replace`` dense blocks
        before mixture-of-experts ones, Qwen-MoE's ``mlp_only_layers`` and
        ``decoder_sparse_step``), so it is read here, not derived per architecture. Block 0's group
        runs in the shell's own block; every other group in a block built as the model builds the
        group's first, whose weights are freed at once (``load_block`` allocates them)."""
        from structprune.models.meta import instantiate_on_meta

        attention = cast(Any, self.shell).config._attn_implementation
        meta, _ = instantiate_on_meta(type(self.shell), self.config, attention)
        blocks = cast(nn.ModuleList, meta.get_submodule(self.prefix))
        if len(blocks) != self.num_blocks:
            raise StreamingError(f"{self.prefix} of {type(meta).__name__} holds {len(blocks)} blocks, the config says {self.num_blocks}")
        keys: Dict[Tuple[Any, ...], int] = {}
        group_of = []
        representatives: List[nn.Module] = []
        shapes: List[Dict[str, torch.Size]] = []
        for index, block in enumerate(blocks):
            key = (_structure(block), self.layer_kinds[index] if self.layer_kinds else None)
            if key not in keys:
                keys[key] = len(representatives)
                representative = self.block if index == 0 else self._built_as(type(block), index)
                shapes.append({name: parameter.shape for name, parameter in representative.named_parameters()})
                if index > 0:
                    _free_parameters(representative)
                representatives.append(representative)
            group_of.append(keys[key])
        return group_of, representatives, shapes

    def _built_as(self, block_class: type, index: int) -> nn.Module:
        """Block ``index`` as the model builds it (``block_class(config, layer_idx)``), on the
        device, from the shell's own config object with the full model's depth and per-layer
        entries while it is built: what the shell later sets on its config (attention or experts
        implementation) then holds for this block too."""
        config = cast(Any, self.shell).config
        per_layer = {key: getattr(config, key) for key in _per_layer_keys(self.config, self.num_blocks) if hasattr(config, key)}
        depth = config.num_hidden_layers
        try:
            for key in per_layer:
                setattr(config, key, copy.deepcopy(getattr(self.config, key)))
            config.num_hidden_layers = self.num_blocks
            with _no_init(), torch.device(self.device), _default_dtype(self.dtype):
                block = cast(nn.Module, block_class(config, index))
        except (TypeError, ValueError) as err:
            raise StreamingError(
                f"{self.model_dir}: block {index} is built unlike block 0, and {block_class.__name__}(config, layer_idx) cannot build it on its own: {err}"
            ) from err
        finally:
            for key, value in per_layer.items():
                setattr(config, key, value)
            config.num_hidden_layers = depth
        block.eval()
        block.requires_grad_(False)
        return block

    @property
    def representatives(self) -> List[nn.Module]:
        """Every module that runs blocks, one per structure (``block`` is one of them): hooks meant
        for a whole pass go on each."""
        return list(self._representatives)

    def block_of(self, index: int) -> nn.Module:
        """The module that runs block ``index`` (for its structure: module paths and classes; its
        weights are those of the loaded block, or empty)."""
        return self._representatives[self._group_of[index]]

    def _read(self, name: str) -> torch.Tensor:
        """A model-named tensor read from the checkpoint, on the device, in the compute dtype."""
        return self._read_stored(name).to(self.device, self.dtype)

    def _read_into(self, name: str, target: torch.Tensor) -> None:
        """Reads a model-named tensor into ``target`` (a parameter or buffer of the shell): straight
        into its memory when it is a CPU tensor of the stored dtype, else through one stored copy."""
        if name in self._pieces:
            self._read_stacked(name, target)
            return
        info = self._stored[name]
        if tuple(target.shape) != info.shape:
            raise StreamingError(f"{self.model_dir / info.file}: tensor '{info.name}' has shape {list(info.shape)}, the model expects {list(target.shape)}")
        target = target.detach()
        if target.device.type == "cpu" and target.dtype == _stored_dtype(self.model_dir, info) and target.is_contiguous():
            _read_bytes(self.model_dir, info, target.view(-1).view(torch.uint8))
        else:
            target.copy_(self._read_stored(name))

    def _read_stacked(self, name: str, target: torch.Tensor) -> None:
        """Fills a stacked expert parameter ``[experts, rows, …]`` from its per-expert tensors, each
        into its expert and its segment of the rows (Mixtral's w1 and w3 are the two halves of
        ``gate_up_proj``), as transformers stacks them on load."""
        target = target.detach()
        experts = {piece.expert for piece, _ in self._pieces[name]}
        if experts != set(range(target.shape[0])):
            raise StreamingError(f"{self.model_dir}: the checkpoint's experts for '{name}' are {sorted(experts)}, the model has {target.shape[0]}")
        for piece, info in sorted(self._pieces[name], key=lambda item: (item[1].file, item[1].offset or 0)):
            start = piece.offset(target.shape[1])
            part = target[piece.expert, start : start + info.shape[0]]
            if tuple(part.shape) != info.shape:
                raise StreamingError(f"{self.model_dir / info.file}: tensor '{info.name}' has shape {list(info.shape)}, the model expects {list(part.shape)}")
            part.copy_(self._read_info(info))

    def _read_stored(self, name: str) -> torch.Tensor:
        """A model-named tensor as stored (CPU, stored dtype)."""
        return self._read_info(self._stored[name])

    def _read_info(self, info: TensorInfo) -> torch.Tensor:
        """A checkpoint tensor as stored (CPU, stored dtype)."""
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        _read_bytes(self.model_dir, info, raw)
        return raw.view(_stored_dtype(self.model_dir, info)).reshape(info.shape)

    def _by_position(self, names: Sequence[str]) -> List[str]:
        """``names`` in file order, so that reads go through each shard front to back."""
        def position(name: str) -> Tuple[str, int]:
            info = self._stored[name] if name in self._stored else self._pieces[name][0][1]
            return info.file, info.offset or 0

        return sorted(names, key=position)

    def _load_outside_blocks(self) -> None:
        block_prefix = f"{self.prefix}.0."
        wanted = [n for n in self.shell.state_dict() if not n.startswith(block_prefix)]
        present = [n for n in wanted if n in self._stored]
        missing = set(wanted) - set(present)
        buffers = {name for name, _ in self.shell.named_buffers()}
        tied = set(_tied_names(self.shell))
        unexplained = sorted(n for n in missing if not n.startswith(block_prefix) and n not in buffers and n not in tied)
        if unexplained:
            raise StreamingError(f"{self.model_dir}: the checkpoint has no tensor for '{unexplained[0]}'")
        parameters = dict(self.shell.named_parameters())
        self._outside_names = [n for n in present if n in parameters]
        with torch.no_grad():
            for name in self._by_position([n for n in present if n in buffers]):
                self._read_into(name, self.shell.get_buffer(name))
        # The shell was built with (uninitialised) outside weights; each pass reads what it uses.
        self.unload_outside()
        self._input_only, self._output_only = self._one_sided_embeddings()

    def _one_sided_embeddings(self) -> Tuple[Set[str], Set[str]]:
        """The token-lookup weight only ``embed`` uses and the head weight only ``loss`` uses (both
        empty when they are one tied tensor): on a 7B model each is as large as a block."""
        named = {id(p): n for n, p in self.shell.named_parameters()}
        lookup = cast(Any, self.shell).get_input_embeddings()
        head = cast(Any, self.shell).get_output_embeddings()
        lookup_weight = getattr(lookup, "weight", None)
        head_weight = getattr(head, "weight", None)
        if lookup_weight is None or head_weight is None or lookup_weight is head_weight:
            return set(), set()
        return {named[id(lookup_weight)]}, {named[id(head_weight)]}

    def unload_outside(self) -> None:
        """Frees the weights outside the blocks (embeddings, final norm, head), which the block
        passes do not use. They are read again from the checkpoint when next needed: ``embed``
        reads all but the head, ``loss`` all but the token lookup, ``outside_parameters`` all."""
        for name in self._outside_names:
            parameter = self.shell.get_parameter(name)
            parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
        self._outside_loaded.clear()

    def _ensure_outside(self, skip: Collection[str] = ()) -> None:
        """Reads the weights outside the blocks that are not loaded yet, but those in ``skip``."""
        wanted = [n for n in self._outside_names if n not in self._outside_loaded and n not in skip]
        # Assigning .data keeps each Parameter object, so tied weights (one object) stay tied.
        for name in self._by_position(wanted):
            self.shell.get_parameter(name).data = self._read(name)
        self._outside_loaded.update(wanted)

    def unload_block(self) -> None:
        """Frees the loaded block's weights while no block runs (the loss pass); ``load_block``
        allocates them again."""
        _free_parameters(self.block)

    def load_block(self, index: int) -> None:
        """Fills the representative of block ``index``'s group with the weights (and stored
        buffers) of block ``index``, and makes it ``block`` (and the shell's block) after freeing
        the previous representative's weights: one block's weights are in memory at a time."""
        _return_freed_heap()
        self._switch_to(self._group_of[index])
        self._loaded_kind = self.layer_kinds[index] if self.layer_kinds else None
        full = f"{self.prefix}.{index}."
        shapes = self._block_shapes[self._group]
        for name, parameter in self.block.named_parameters():
            if parameter.numel() == 0 and shapes[name] != parameter.shape:
                parameter.data = torch.empty(shapes[name], dtype=parameter.dtype, device=parameter.device)
        targets: Dict[str, torch.Tensor] = {full + n: p for n, p in self.block.named_parameters()}
        absent = [name for name in targets if name not in self._stored and name not in self._pieces]
        if absent:
            raise StreamingError(f"{self.model_dir}: the checkpoint has no tensor '{absent[0]}', which the model builds for block {index}")
        targets.update({full + n: b for n, b in self.block.named_buffers() if full + n in self._stored})
        with torch.no_grad():
            for name in self._by_position(list(targets)):
                self._read_into(name, targets[name])

    def _switch_to(self, group: int) -> None:
        """Makes ``group``'s representative the block that runs, freeing the weights of the one before."""
        if group == self._group:
            return
        self.unload_block()
        self._group = group
        self.block = self._representatives[group]
        self.stack[0] = self.block

    @property
    def stored_per_expert(self) -> Set[str]:
        """The stacked expert parameters (model names) whose experts the checkpoint stores as
        separate tensors."""
        return set(self._pieces)

    def block_parameters(self, index: int) -> Dict[str, nn.Parameter]:
        """The loaded block's parameters under their names in the full model."""
        return {f"{self.prefix}.{index}.{n}": p for n, p in self.block.named_parameters()}

    def outside_names(self) -> List[str]:
        """Names of the parameters outside the blocks, without loading them."""
        local = f"{self.prefix}.0."
        return [n for n, _ in self.shell.named_parameters() if not n.startswith(local)]

    def outside_parameters(self) -> Dict[str, nn.Parameter]:
        self._ensure_outside()
        local = f"{self.prefix}.0."
        return {n: p for n, p in self.shell.named_parameters() if not n.startswith(local)}

    # -- running -----------------------------------------------------------------------------------

    @contextmanager
    def _standing_in(self, module: nn.Module) -> Iterator[None]:
        self.stack[0] = module
        try:
            yield
        finally:
            self.stack[0] = self.block

    def embed(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, Tuple[Any, ...], Dict[str, Any]]:
        """Hidden states entering block 0 and the arguments the model passes to every block (an
        :class:`ArgumentsByKind` where blocks of several kinds take different ones)."""
        self._ensure_outside(skip=self._output_only)
        hidden, args, kwargs = self._capture(input_ids)
        if not self.layer_kinds:
            return hidden, args, kwargs
        by_kind = {}
        shell_config = cast(Any, self.shell).config
        own = shell_config.layer_types
        try:
            # The shell's model reads the kind of its one block from its config at every forward.
            for kind in dict.fromkeys(self.layer_kinds):
                shell_config.layer_types = [kind]
                by_kind[kind] = self._capture(input_ids)[1:]
        finally:
            shell_config.layer_types = own
        return hidden, args, ArgumentsByKind(kwargs, by_kind)

    def _capture(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, Tuple[Any, ...], Dict[str, Any]]:
        with self._standing_in(_Capture()):
            try:
                self.shell(input_ids=input_ids.to(self.device), use_cache=False, **self._mask_argument(input_ids))
            except _Captured as captured:
                return captured.hidden, captured.args, captured.kwargs
        raise StreamingError(f"{type(self.shell).__name__} never called its first block")

    def run_block(self, hidden: torch.Tensor, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
        """The loaded block's hidden-state output for ``hidden``."""
        if isinstance(kwargs, ArgumentsByKind) and self._loaded_kind is not None:
            args, kwargs = kwargs.by_kind[self._loaded_kind]
        with float32_linears(self.device, self.dtype, accumulate_weight_grads=True):
            output = self.block(hidden, *args, **kwargs)
        self.block_returns_tuple = isinstance(output, (tuple, list))
        return _first(output)

    def _mask_argument(self, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """An encoder's attention mask over its padded passages (none for a causal LM)."""
        if not self.encoder:
            return {}
        return {"attention_mask": attention_mask(input_ids, self.config.pad_token_id).to(self.device)}

    def loss(self, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own loss from the last block's output: causal-LM or MLM loss through its
        head, or for an encoder without one the embedding probe (``structprune.models.sentence``)."""
        if self.pooling is not None:
            mask = attention_mask(input_ids, self.config.pad_token_id).to(self.device)
            with float32_linears(self.device, self.dtype, accumulate_weight_grads=True):
                return probe_loss(pool(last_hidden, mask, self.pooling), input_ids)
        self._ensure_outside(skip=self._input_only)
        labels = input_ids.to(self.device)
        if self.encoder:
            # The MLM head predicting each token of the unmasked passage; padding is not predicted.
            labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
        # The token lookup's output never reaches the loss (the first block's place is taken by
        # the saved output), so placeholder embeddings stand in and the lookup stays unread.
        width = cast(Any, self.shell).get_input_embeddings().embedding_dim
        placeholder = torch.zeros(*labels.shape, width, dtype=self.dtype, device=self.device)
        with self._standing_in(_Inject((last_hidden,) if self.block_returns_tuple else last_hidden)), float32_linears(self.device, self.dtype, accumulate_weight_grads=True):
            output = self.shell(inputs_embeds=placeholder, labels=labels, use_cache=False)
        return output.loss


def _per_layer_keys(config: Any, blocks: int) -> List[str]:
    """The config entries that hold one value per block (``layer_types``…), which the one-block
    shell cuts to block 0's."""
    return [key for key, value in vars(config).items() if isinstance(value, list) and len(value) == blocks]


def _structure(block: nn.Module) -> Tuple[Any, ...]:
    """What a block is built of: each submodule's path and class, and its own parameters' and
    buffers' names and shapes."""
    return tuple(
        (path, type(module).__name__, tuple((name, tuple(tensor.shape)) for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]))
        for path, module in block.named_modules()
    )


def _free_parameters(module: nn.Module) -> None:
    """Replaces the module's parameters' storage with empty tensors (the Parameter objects stay)."""
    for parameter in module.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating-point tensors created inside are of ``dtype``, as in transformers' ``_from_config(dtype=…)``."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _tied_names(model: nn.Module) -> List[str]:
    seen: Dict[int, str] = {}
    tied = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append(name)
        else:
            seen[id(param)] = name
    return tied


@contextmanager
def _no_init() -> Iterator[None]:
    """Skips random initialisation of the shell's weights: they are overwritten from the checkpoint."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, it only costs time
        yield
        return
    with no_init_weights():
        yield


@dataclass
class StreamedPass:
    """Calibration batches split into micro-batches, with each block's inputs saved."""

    micro_batches: List[torch.Tensor]
    block_args: List[Tuple[Tuple[Any, ...], Dict[str, Any]]]
    store: ActivationStore


def forward_pass(
    model: StreamedModel,
    input_ids: torch.Tensor,
    *,
    micro_batch: int,
    store: ActivationStore,
    start: int = 0,
    on_load: Optional[Callable[[int], None]] = None,
    on_block: Optional[Callable[[int, List[torch.Tensor], List[torch.Tensor]], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
    keep_inputs: bool = True,
) -> StreamedPass:
    """Runs every block in order, saving its inputs (and the last block's output) in ``store``;
    without ``keep_inputs`` (no backward pass follows), a block's inputs leave memory once it ran,
    so that memory holds two blocks' activations instead of every block's.
    ``on_load(index)`` runs once a block's weights are in (to attach hooks); ``on_block(index,
    inputs, outputs)`` sees its micro-batch inputs and outputs (activation statistics, block
    influence). A resumed pass starts at block ``start``: the blocks before it ran already and
    ``store`` holds the input of block ``start`` (a caller resuming after the last block sets
    ``model.block_returns_tuple`` as the interrupted run saw it)."""
    batches = list(input_ids.split(micro_batch))
    saved_args = []
    with torch.no_grad():
        for m, batch in enumerate(batches):
            # The block arguments (rotary tables, masks) are cheap to recompute, so they are never saved.
            hidden, args, kwargs = model.embed(batch)
            if start == 0:
                store.put((0, m), hidden)
            saved_args.append((args, kwargs))
        model.unload_outside()
        for index in range(start, model.num_blocks):
            model.load_block(index)
            if on_load is not None:
                on_load(index)
            inputs, outputs = [], []
            for m in range(len(batches)):
                hidden = store.get((index, m), model.device)
                args, kwargs = saved_args[m]
                out = model.run_block(hidden, args, kwargs)
                store.put((index + 1, m), out)
                if not keep_inputs:
                    store.release((index, m))
                if on_block is not None:
                    inputs.append(hidden)
                    outputs.append(out)
            if on_block is not None:
                on_block(index, inputs, outputs)
            if progress is not None:
                progress(index)
    return StreamedPass(batches, saved_args, store)


@dataclass
class BackwardState:
    """A block-by-block backward pass between two blocks, where it can stop and resume: blocks
    ``lowest_done`` and above are done, ``grads[m]`` is the loss gradient at the input of block
    ``lowest_done`` for micro-batch ``m``, and ``loss`` the loss of this process's samples."""

    lowest_done: int
    grads: List[torch.Tensor]
    loss: float


def backward_pass(
    model: StreamedModel,
    streamed: StreamedPass,
    *,
    fisher: bool,
    on_params: Callable[[Dict[str, ParamStats]], None],
    samples: Optional[int] = None,
    start: Optional[BackwardState] = None,
    on_state: Optional[Callable[[BackwardState], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
    outside: bool = True,
    weight_grads: bool = True,
    on_load: Optional[Callable[[int], None]] = None,
) -> float:
    """Back-propagates the calibration loss block by block, last to first, handing each block's
    parameter statistics to ``on_params`` (then the parameters outside the blocks), and the state
    after each block to ``on_state``. The loss is the mean over ``samples`` samples (default: the
    samples here; more when other processes score the rest) of each sample's mean token loss;
    returns this process's part of it. ``start`` resumes a pass that ``on_state`` saw. Without
    ``outside``, the parameters outside the blocks get no gradients (nothing asks for them);
    without ``weight_grads``, neither do the blocks' (only the inputs' gradients flow, and whatever
    ``on_load(index)``, called once a block's weights are in, hooks into the block).

    With ``fisher``, micro-batches must hold one sample, so that the squared gradient of each sample
    is accumulated (F = mean over samples of g²) without keeping per-sample copies.
    """
    batches = streamed.micro_batches
    total = samples if samples is not None else sum(b.shape[0] for b in batches)
    if fisher and any(b.shape[0] != 1 for b in batches):
        raise StreamingError("second-order scores need one sample per micro-batch")
    if start is None:
        model.unload_block()  # the loss pass needs the head, not the last block
    state = start if start is not None else _loss_gradients(model, streamed, total)
    grads = [g.to(model.device) for g in state.grads]
    model.unload_outside()
    for index in reversed(range(state.lowest_done)):
        model.load_block(index)
        if on_load is not None:
            on_load(index)
        params = model.block_parameters(index)
        tracker = _GradTracker(params, fisher)
        with _grad_enabled(params if weight_grads else {}):
            for m in range(len(batches)):
                hidden = streamed.store.get((index, m), model.device).requires_grad_(True)
                args, kwargs = streamed.block_args[m]
                out = model.run_block(hidden, args, kwargs)
                out.backward(grads[m])
                tracker.collect()
                assert hidden.grad is not None
                grads[m] = hidden.grad.detach()
                streamed.store.release((index, m))
        on_params(tracker.stats(total))
        tracker.release()
        if on_state is not None:
            on_state(BackwardState(index, list(grads), state.loss))
        if progress is not None:
            progress(index)
    if not outside:
        return state.loss
    # Outside the blocks a sample's gradient has two parts, from the loss (head, final norm) and
    # from the token lookup (embedding; both when tied): both are taken together per micro-batch
    # so that squared per-sample gradients are right.
    outside_parameters = model.outside_parameters()
    tracker = _GradTracker(outside_parameters, fisher)
    with _grad_enabled(outside_parameters):
        for m, batch in enumerate(batches):
            last = streamed.store.get((model.num_blocks, m), model.device)
            loss = model.loss(last, batch) * (batch.shape[0] / total)
            hidden, _, _ = model.embed(batch)
            # An encoder's embedding probe reads no weight outside the blocks.
            outputs: List[torch.Tensor] = [loss] if loss.requires_grad else []
            seeds: List[Optional[torch.Tensor]] = [None] if loss.requires_grad else []
            if hidden.requires_grad:
                outputs.append(hidden)
                seeds.append(grads[m])
            torch.autograd.backward(outputs, seeds)
            tracker.collect()
    on_params(tracker.stats(total))
    tracker.release()
    return state.loss


def _loss_gradients(model: StreamedModel, streamed: StreamedPass, total: int) -> BackwardState:
    """The loss and its gradient at the last block's output, per micro-batch."""
    grads: List[torch.Tensor] = []
    loss_total = 0.0
    with torch.enable_grad():
        for m, batch in enumerate(streamed.micro_batches):
            last = streamed.store.get((model.num_blocks, m), model.device).requires_grad_(True)
            loss = model.loss(last, batch) * (batch.shape[0] / total)
            (grad,) = torch.autograd.grad(loss, last)
            loss_total += float(loss.detach())
            grads.append(grad)
    return BackwardState(model.num_blocks, grads, loss_total)


class _GradTracker:
    """Accumulates gradients (and squared per-micro-batch gradients) of some parameters.

    Without Fisher, autograd itself sums the micro-batches' gradients into ``param.grad``: one
    gradient buffer per parameter, no copies. Fisher needs each micro-batch's own gradient, so each
    is taken out of ``param.grad`` and summed (and squared) separately."""

    def __init__(self, params: Dict[str, nn.Parameter], fisher: bool) -> None:
        self.params = params
        self.fisher = fisher
        self.grad: Dict[str, torch.Tensor] = {}
        self.squares: Dict[str, torch.Tensor] = {}

    def collect(self) -> None:
        if not self.fisher:
            return
        for name, param in self.params.items():
            if param.grad is None:
                continue
            g = param.grad.detach()
            if name in self.grad:
                self.grad[name] += g
            else:
                self.grad[name] = g.clone()
            if self.fisher:
                # The loss of one sample was scaled by 1/N; its own gradient is N times this one.
                self.squares[name] = self.squares.get(name, torch.zeros_like(g)) + g.square()
            param.grad = None

    def stats(self, samples: int) -> Dict[str, ParamStats]:
        out = {}
        for name, param in self.params.items():
            if self.fisher:
                grad = self.grad.get(name)
                fisher = self.squares[name].mul_(samples) if name in self.squares else None
            else:
                grad, fisher = (param.grad.detach() if param.grad is not None else None), None
            out[name] = ParamStats(name, param.detach(), grad, fisher)
        return out

    def release(self) -> None:
        for param in self.params.values():
            param.grad = None
        self.grad.clear()
        self.squares.clear()


@contextmanager
def _grad_enabled(params: Dict[str, nn.Parameter]) -> Iterator[None]:
    for p in params.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        # Gradients stay for the caller to read (``_GradTracker.stats``), which then releases them.
        for p in params.values():
            p.requires_grad_(False)
