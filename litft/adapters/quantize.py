"""Quantized frozen base weights for QLoRA-style training (Dettmers et al. 2023, arXiv 2305.14314).

Modes (`--quantize`), all with bitsandbytes' storage and kernels:

    bnb.nf4     4-bit NormalFloat codes, one fp32 absmax per block of 64 weights     4.5 bits / weight
    bnb.nf4-dq  nf4 + double quantization: the absmaxes themselves in 8 bit
                (blocks of 256, one fp32 scale each)                                  ~4.13 bits / weight
    bnb.fp4     4-bit float codes (e2m1), as nf4                                      4.5 bits / weight
    bnb.fp4-dq  fp4 + double quantization                                             ~4.13 bits / weight
    bnb.int8    LLM.int8 (arXiv 2208.07339): int8 rows with one fp32 absmax per row  ~8 bits / weight

Why litft quantizes by itself instead of using Lightning's `BitsandbytesPrecision`: that plugin
refuses to start without CUDA, while bitsandbytes >= 0.49 quantizes and runs `Linear4bit` /
`Linear8bitLt` forward and backward on CPU as well. So the loader below builds the model on the
meta device and materialises it tensor by tensor: a Linear weight chosen for quantization goes
straight from the checkpoint into a bnb `Params4bit` / `Int8Params` on the target device, and
everything else loads as usual. The peak memory of loading is the quantized model plus the
transients of quantizing one tensor (a few copies of it), never the whole model in 16/32 bit.

What stays unquantized (explicitly):
  * the token embedding, unless `quantize_embedding` is on (off by default), and norms: by default
    only `nn.Linear` layers are quantized;
  * `lm_head` by default (the `skip` list, `--quantize_skip`, overridable): the output projection
    is the layer most sensitive to quantization error and QLoRA leaves it in 16 bit too;
  * a head tied to the embedding (SmolLM2, Gemma, Llama 3.2) is the embedding: quantized exactly when
    the embedding is, whatever the skip list says (an untied head follows the skip list);
  * biases, and of course the adapters, which train in full precision on top of the frozen base.

`quantize_embedding` (opt-in) stores the embedding table like a Linear weight of the same mode
(`QuantizedEmbedding`): 4-bit codes + the QuantState of `quantize_4bit(table, blocksize=64)`, or
int8 rows + one absmax per row. A lookup dequantizes only the rows it reads; a tied head
(`QuantizedTiedHead`) computes its logits from the same storage (stored and counted once). It
matters where the vocabulary is large next to the model: at the SmolLM2-135M shape the bf16
embedding is 21% of the model, and nf4-dq goes from 0.415x to 0.259x of bf16 with it. It needs
n_embd divisible by 64 (a LitftError otherwise, before any weight is read): 4-bit blocks then
never straddle two token rows, so a row's codes and statistics can be gathered on their own.

Gradients: bnb's autograd functions dequantize the frozen weight in backward to pass the gradient
on to the input, so the adapters of every layer get exact gradients through the dequantized
weights; the quantized weights themselves never get a gradient. On CPU (fp32 compute) a LoRA layer
over a 4-bit base does the same with litft's own dequantization into one reused buffer
(`litft.cpu_kernels.dequantize_4bit`, bit-equal to bnb's) instead of calling the bnb layer.
"""
from __future__ import annotations

import ctypes
import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from packaging.version import Version
from torch import nn
from torch.nn import functional as F

from litft.adapters.inject import TARGET_ALIASES
from litft.checkpoint import check_checkpoint_dir, load_model
from litft.cpu_kernels import dequantize_4bit, litft_dequantizes, quant_state_absmax
from litft.models.config import Config
from litft.models.gpt import GPT
from litft.utils import LitftError

__all__ = [
    "QuantMode", "QUANTIZE_MODES", "DEFAULT_SKIP", "BLOCKSIZE", "parse_quantize", "check_bitsandbytes",
    "check_quantize", "default_device", "quantize_targets", "quantize_weight", "quantized_linear",
    "quantize_model", "load_quantized_model", "is_quantized_linear", "dequantize_weight", "dequantize_model",
    "weight_bytes", "QuantizedEmbedding", "QuantizedTiedHead", "check_embedding_width",
]

BLOCKSIZE = 64  # QLoRA's block size for the 4-bit absmax statistics
MIN_BNB = {"cpu": "0.49", "cuda": "0.43"}  # 4/8-bit forward+backward on CPU arrived in 0.49


@dataclass(frozen=True)
class QuantMode:
    name: str
    bits: int  # 4 or 8
    quant_type: str | None = None  # "nf4" / "fp4" for 4 bit
    double_quant: bool = False  # 8-bit absmaxes ("compress_statistics" in bnb)


QUANTIZE_MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("bnb.nf4", 4, "nf4"), QuantMode("bnb.nf4-dq", 4, "nf4", True),
    QuantMode("bnb.fp4", 4, "fp4"), QuantMode("bnb.fp4-dq", 4, "fp4", True),
    QuantMode("bnb.int8", 8),
)}
DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)


def parse_quantize(mode: str | QuantMode) -> QuantMode:
    if isinstance(mode, QuantMode):
        return mode
    if mode not in QUANTIZE_MODES:
        raise LitftError(f"unknown quantize mode {mode!r}: use one of {', '.join(QUANTIZE_MODES)}")
    return QUANTIZE_MODES[mode]


def check_bitsandbytes(device: torch.device | str, version: str | None = None) -> None:
    """bitsandbytes is installed and new enough to quantize on `device` (`version`: the installed one)."""
    kind = torch.device(device).type
    if version is None:
        try:
            bitsandbytes = _bnb()
        except ImportError as e:
            raise LitftError(f"quantization needs bitsandbytes, which failed to import ({e}): "
                             "pip install 'bitsandbytes>=0.49'") from None
        version = bitsandbytes.__version__
    need = MIN_BNB.get(kind)
    if need is None:
        raise LitftError(f"quantization runs on CPU or CUDA, not on {kind!r}")
    if Version(version) < Version(need):
        why = " (4/8-bit forward and backward on CPU need it)" if kind == "cpu" else ""
        raise LitftError(f"bitsandbytes {version} is too old to quantize on {kind}{why}: "
                         f"pip install -U 'bitsandbytes>={need}'")


def default_device() -> torch.device:
    """Where the training loop will run: quantize straight there (Fabric sets the current CUDA device
    of each process before the module's configure_model runs)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_quantize(mode: str, device: torch.device | str | None = None) -> QuantMode:
    """Validate a `--quantize` value and the bitsandbytes install, before any model loads."""
    parsed = parse_quantize(mode)
    check_bitsandbytes(device or default_device())
    return parsed


def _bnb():
    # bnb warns at import that it could not fetch an optional CPU kernel for the *packed inference*
    # layout of 4-bit weights; litft never uses that layout (see quantized_linear), so silence it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


# ------------------------------------------------------------------------ which layers
def _matches(name: str, pattern: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == pattern or leaf == TARGET_ALIASES.get(pattern) or fnmatch.fnmatchcase(name, pattern)


def quantize_targets(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the `nn.Linear` layers to quantize: all but those matching `skip` and a head tied to
    the embedding. A skip entry matches a layer by its last name (lm_head, down_proj, or a short
    alias: down) or by a glob on its full name (blocks.0.*); an entry matching nothing is an error,
    so a typo never silently quantizes a layer meant to stay in full precision."""
    skip = list(skip)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unused = [s for s in skip if not any(_matches(n, s) for n, _ in linears)]
    if unused:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise LitftError(f"quantize_skip entries {unused} match no Linear layer; the Linear layers are named "
                         f"{leaves} (entries may also be globs on full names, e.g. 'blocks.0.*')")
    shared = {id(p) for n, m in model.named_modules() if not isinstance(m, nn.Linear) for p in m.parameters(False)}
    return [n for n, m in linears
            if not any(_matches(n, s) for s in skip) and id(m.weight) not in shared]  # tied head: skip


# ------------------------------------------------------------------------ quantize
def quantize_weight(weight: torch.Tensor, mode: str | QuantMode, device: torch.device | str,
                    module: nn.Module | None = None) -> nn.Parameter:
    """A frozen bnb parameter holding `weight` (out, in) quantized on `device`.

    4 bit: `Params4bit`, i.e. exactly `bnb.functional.quantize_4bit(weight, blocksize=64, quant_type,
    compress_statistics=double_quant)`; 8 bit: `Int8Params` (`int8_vectorwise_quant` of the fp16 weight)."""
    bnb, mode = _bnb(), parse_quantize(mode)
    device = torch.device(device)
    if mode.bits == 4:
        param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE, quant_type=mode.quant_type,
                                  compress_statistics=mode.double_quant, module=module)
        return param.to(device)  # .to() on an unquantized Params4bit quantizes on that device
    param = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    return param.to(device)  # quantizes (on `device`) when leaving the CPU copy


def quantized_linear(linear: nn.Module, mode: str | QuantMode, device: torch.device | str = "meta",
                     weight: torch.Tensor | None = None) -> nn.Module:
    """An empty (meta) bnb layer shaped like `linear`, or a quantized one when `weight` is given.
    Its bias (if any) is a plain full-precision parameter, filled in by the caller."""
    bnb, mode = _bnb(), parse_quantize(mode)
    has_bias = linear.bias is not None
    if mode.bits == 4:
        # compute_dtype None: bnb computes in the dtype of the activations, i.e. the run's precision
        # (fp32 on CPU, bf16 with bf16-true).
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=None,
                                  compress_statistics=mode.double_quant, quant_type=mode.quant_type, device="meta")
        # On CPUs with AVX512-BF16, bnb repacks a 4-bit weight in place the first time it runs in eval
        # mode without grad (e.g. validation), into an inference layout that computes in bf16 and that
        # the training path cannot differentiate through. Keep the one layout: eval == train numerics.
        layer.support_avx512bf16_for_cpu = False
    else:
        # threshold 6.0: LLM.int8's outlier decomposition, as transformers / peft use it.
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
    if weight is not None:
        layer.weight = quantize_weight(weight, mode, device, module=layer)
    return layer


def check_embedding_width(n_embd: int) -> None:
    """`quantize_embedding` needs rows made of whole 4-bit blocks (see the module docstring)."""
    if n_embd % BLOCKSIZE:
        raise LitftError(f"quantize_embedding needs n_embd divisible by {BLOCKSIZE} (so that no quantization "
                         f"block spans two token rows); this model has n_embd={n_embd}: leave "
                         "quantize_embedding off for it")


class QuantizedEmbedding(nn.Module):
    """A frozen token embedding stored in the format of the quantized Linear weights of `mode`.

    4 bit: the packed codes and QuantState of `bnb.functional.quantize_4bit(table, blocksize=64,
    quant_type, compress_statistics=double_quant)` (what a `Params4bit` holds); int8:
    `int8_vectorwise_quant` of the fp16 table (as `Int8Params`), int8 rows + one fp32 absmax per row.
    `forward` dequantizes only the looked-up rows; `dequantize()` gives the whole table.

    `weight` holds the codes' bytes *viewed* in the float dtype the embedding outputs (as bnb's
    `quant_storage` does for FSDP): GPT takes the activation dtype and device from `embed.weight`
    (RoPE tables, KV cache), so they must read right. Its values are meaningless; `codes` is the
    bnb layout. Casts of the module (`.to(bf16)`, Fabric's precision plugins) re-view those bytes
    instead of converting them (see `_apply`).
    """

    def __init__(self, table: torch.Tensor, mode: str | QuantMode, device: torch.device | str) -> None:
        super().__init__()
        bnb, self.mode = _bnb(), parse_quantize(mode)
        self.num_embeddings, self.embedding_dim = table.shape
        check_embedding_width(self.embedding_dim)
        table, dtype = table.detach().contiguous().to(device), table.dtype
        self.quant_state = None  # 4 bit: bnb's QuantState
        self.row_absmax = None  # int8: (num_embeddings,) fp32
        if self.mode.bits == 4:  # exactly Params4bit._quantize
            codes, self.quant_state = bnb.functional.quantize_4bit(
                table, blocksize=BLOCKSIZE, quant_type=self.mode.quant_type, compress_statistics=self.mode.double_quant)
        else:  # exactly Int8Params._quantize: rows of the fp16 weight
            codes, self.row_absmax, _ = bnb.functional.int8_vectorwise_quant(table.half())
        del table
        self.weight = nn.Parameter(codes.view(self.num_embeddings, -1).view(dtype), requires_grad=False)

    @property
    def codes(self) -> torch.Tensor:
        """The codes in bnb's layout: 4 bit (numel / 2, 1) uint8 as `quantize_4bit` returns them; int8 (V, C)."""
        if self.quant_state is None:
            return self.weight.view(torch.int8)
        return self.weight.view(torch.uint8).view(-1, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        bnb, shape = _bnb(), (*input_ids.shape, self.embedding_dim)
        if self.quant_state is None:
            rows = bnb.functional.int8_vectorwise_dequant(self.codes[input_ids].view(-1, self.embedding_dim),
                                                          self.row_absmax[input_ids].view(-1))
        else:
            # The rows' packed codes and their blocks' absmaxes, as a small quantized tensor of its own:
            # bitsandbytes dequantizes just these (rows are whole blocks: check_embedding_width).
            qs = self.quant_state
            packed = self.weight.view(torch.uint8)[input_ids]
            absmax = quant_state_absmax(qs).view(self.num_embeddings, -1)[input_ids]
            rows_state = bnb.functional.QuantState(absmax=absmax.reshape(-1), shape=torch.Size(shape), code=qs.code,
                                                   blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype)
            rows = bnb.functional.dequantize_4bit(packed.reshape(-1, 1), rows_state)
        return rows.view(shape).to(self.weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole (num_embeddings, embedding_dim) table as bitsandbytes dequantizes it: 4 bit in the dtype
        it was quantized from, int8 in fp32 (as `dequantize_weight` for the Linear layers)."""
        bnb = _bnb()
        if self.quant_state is None:
            return bnb.functional.int8_vectorwise_dequant(self.codes, self.row_absmax)
        return bnb.functional.dequantize_4bit(self.codes, self.quant_state)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedEmbedding:
        # nn.Module.to / .half() / .cuda() call fn on every tensor and would convert the codes' bytes as
        # if they were numbers. Give fn the bytes as uint8 (dtype casts leave integers alone, device
        # moves apply) and view them in the float dtype fn asks for; the statistics only change device.
        w = self.weight
        target = fn(torch.empty(0, dtype=w.dtype, device=w.device))
        w.data = fn(w.data.view(torch.uint8)).view(target.dtype)
        if self.quant_state is not None:
            self.quant_state.to(target.device)
        else:
            self.row_absmax = self.row_absmax.to(target.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode.name}"


class QuantizedTiedHead(nn.Linear):
    """The output head of a model whose head is tied to a `QuantizedEmbedding`: logits = x @ table^T,
    computed from the embedding's storage (stored and counted once). 4 bit: `bnb.matmul_4bit`, as a
    `Linear4bit` computes (gradient to the input through the dequantized table); int8: the table is
    dequantized per call and multiplied in the input's dtype (what bnb's int8 layers do in training
    on CPU; here in eval too).

    An `nn.Linear` (as bnb's Linear4bit is) so that adapters can target it as `lm_head`; `weight` is
    the embedding's parameter, so the tie reads as with an unquantized tied head."""

    def __init__(self, table: QuantizedEmbedding) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: that would allocate a weight of its own
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings
        self.table = table  # a submodule: moving the head alone moves the shared storage too
        self.register_parameter("bias", None)

    @property
    def weight(self) -> nn.Parameter:
        return self.table.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.table
        if t.quant_state is None:
            return F.linear(x, t.dequantize().to(x.dtype))
        return _bnb().matmul_4bit(x, t.codes.t(), t.quant_state)


def _install_quantized_embedding(model: GPT, table: torch.Tensor, mode: QuantMode, device: torch.device) -> None:
    model.embed = QuantizedEmbedding(table, mode, device)
    if model.config.tie_embeddings:  # the head is the embedding: same storage, not a second copy
        model.lm_head = QuantizedTiedHead(model.embed)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str | QuantMode, skip: Iterable[str] = DEFAULT_SKIP,
                   device: torch.device | str | None = None, quantize_embedding: bool = False) -> list[str]:
    """Quantize the Linear layers of an in-memory model in place (see `quantize_targets`), and with
    `quantize_embedding` its GPT token embedding (and a head tied to it); returns their names. For a
    checkpoint on disk prefer `load_quantized_model`, which never holds the whole full-precision model."""
    mode = parse_quantize(mode)
    device = torch.device(device) if device is not None else default_device()
    check_bitsandbytes(device)
    if quantize_embedding:
        check_embedding_width(model.config.n_embd)
    names = quantize_targets(model, skip)
    for name in names:
        linear = model.get_submodule(name)
        layer = quantized_linear(linear, mode, device, weight=linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=linear.bias.requires_grad)
        model.set_submodule(name, layer)
    if quantize_embedding:
        _install_quantized_embedding(model, model.embed.weight, mode, device)
        names.append("embed")
    return names


def _release_freed_memory() -> None:
    # glibc keeps the freed temporaries of each quantization in its heap; over a whole checkpoint that
    # grew the process by ~10x the quantized model in our measurements. Hand them back to the OS.
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


@torch.no_grad()
def load_quantized_model(
    checkpoint_dir: Path | str, quantize: str | QuantMode, skip: Iterable[str] = DEFAULT_SKIP,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, config: Config | None = None,
    quantize_embedding: bool = False,
) -> GPT:
    """Build the GPT of a litft checkpoint with its Linear layers (and with `quantize_embedding` its
    token embedding, and so a head tied to it) quantized while they load.

    The model is created on the meta device; the checkpoint streams in one tensor at a time: a weight
    of a layer to quantize becomes a bnb parameter (the embedding a `QuantizedEmbedding`) on `device`
    right away (its 16/32-bit copy is freed before the next tensor is read), anything else is placed
    on `device` (cast to `dtype` if given, else kept in the checkpoint's dtype, as
    `litft.checkpoint.load_model` does)."""
    mode = parse_quantize(quantize)
    device = torch.device(device) if device is not None else default_device()
    check_bitsandbytes(device)
    config = config or Config.from_checkpoint(check_checkpoint_dir(checkpoint_dir))
    if quantize_embedding:
        check_embedding_width(config.n_embd)
    targets: set[str] = set()

    def prepare(model: GPT) -> None:  # empty (meta) bnb layers where the quantized weights will go
        targets.update(quantize_targets(model, skip))
        for name in targets:
            model.set_submodule(name, quantized_linear(model.get_submodule(name), mode))

    def place(model: GPT, key: str, tensor: torch.Tensor) -> bool:
        module_name, _, attr = key.rpartition(".")
        if module_name in targets and attr == "weight":
            model.get_submodule(module_name).weight = quantize_weight(tensor, mode, device,
                                                                      module=model.get_submodule(module_name))
        elif quantize_embedding and key == "embed.weight":
            _install_quantized_embedding(model, tensor, mode, device)
        else:
            return False
        _release_freed_memory()
        return True

    return load_model(checkpoint_dir, device, dtype, config, prepare=prepare, place=place)


# ------------------------------------------------------------------------ dequantize
def is_quantized_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(w).__name__ in ("Params4bit", "Int8Params")


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a quantized layer computes with (a `QuantizedEmbedding`: its table), as
    bitsandbytes dequantizes it: 4 bit in the dtype it was quantized from; 8 bit as int8 x row
    absmax / 127 in fp32. A 4-bit layer litft computes with on CPU (`litft_dequantizes`): litft's dequantization."""
    if isinstance(layer, QuantizedEmbedding):
        return layer.dequantize()
    bnb = _bnb()
    w = layer.weight
    if litft_dequantizes(layer):  # what litft's QLoRA layers compute with on CPU (see litft.cpu_kernels)
        return dequantize_4bit(w, out=torch.empty(tuple(w.quant_state.shape)))
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    # Linear8bitLt moves CB/SCB from the parameter into its matmul state on the first forward
    cb = w.CB if getattr(w, "CB", None) is not None else layer.state.CB
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(cb, scb)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every quantized Linear (including adapters' base layers) by a plain `nn.Linear` holding
    its dequantized weight (in `dtype`, default the dtype it was quantized from; fp32 for int8), a
    `QuantizedEmbedding` by a plain `nn.Embedding`, and a head tied to it by an `nn.Linear` tied to
    that new embedding again. Returns the replaced names. Used to merge adapters into the weights
    they were trained against."""
    modules = list(model.named_modules())  # before any swap: the embedding is listed once, as itself
    tables: dict[int, nn.Parameter] = {}
    for name, q in modules:
        if isinstance(q, QuantizedEmbedding):
            w = q.dequantize()
            embedding = nn.Embedding(q.num_embeddings, q.embedding_dim, device="meta")
            embedding.weight = tables[id(q)] = nn.Parameter(w.to(dtype or w.dtype), requires_grad=False)
            model.set_submodule(name, embedding)
    for name, q in modules:
        if isinstance(q, QuantizedTiedHead):
            head = nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
            head.weight = tables[id(q.table)]
            model.set_submodule(name, head)
    names = [n for n, m in modules if isinstance(m, (QuantizedEmbedding, QuantizedTiedHead))]
    linears = [n for n, m in modules if is_quantized_linear(m)]
    for name in linears:
        q = model.get_submodule(name)
        w = dequantize_weight(q)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(w.to(dtype or w.dtype), requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().clone(), requires_grad=q.bias.requires_grad)
        model.set_submodule(name, linear)
    return names + linears


# ------------------------------------------------------------------------ accounting
def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_bytes(qs) -> int:
    """absmax (+ nested absmax, code books, offset) of a 4-bit QuantState."""
    n = _tensor_bytes(qs.absmax) + _tensor_bytes(qs.code)
    if qs.nested:
        n += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code) + _tensor_bytes(qs.offset)
    return n


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the base model's weights take: {"quantized": packed codes + all their statistics,
    "unquantized": every other parameter and buffer (embeddings unless quantized, norms, head,
    biases, adapters), "total": both}. Shared (tied) tensors count once."""
    seen: set[int] = set()
    quantized = unquantized = 0
    for module in model.modules():  # each module once, so a tied head's storage counts once
        if is_quantized_linear(module):
            w = module.weight
            seen.add(id(w))
            quantized += _tensor_bytes(w.data)
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                quantized += _quant_state_bytes(qs)
            else:  # int8: one fp32 absmax per row
                scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
                quantized += _tensor_bytes(scb)
        elif isinstance(module, QuantizedEmbedding):
            seen.add(id(module.weight))
            quantized += _tensor_bytes(module.weight.data) + (
                _tensor_bytes(module.row_absmax) if module.quant_state is None
                else _quant_state_bytes(module.quant_state))
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            unquantized += _tensor_bytes(t)
    return {"quantized": quantized, "unquantized": unquantized, "total": quantized + unquantized}
