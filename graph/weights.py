"""The model's weights as data: which tensors a checkpoint must hold, how they are fused, and the
format each matrix is stored and multiplied in.

Checkpoint names follow the Hugging Face Llama layout; `{i}` stands for the layer index. q/k/v are
fused into one [q + 2kv, d] projection and gate/up into one [2F, d] projection, so a decode step
runs 4 weight products per layer instead of 7.

Formats (WeightFormat): float32 / bfloat16 / float16 matrices, and the weight-only integer formats
of kernels/quant_linear.py: int8 per output channel, int4 in groups of 32 inputs. A quantized
checkpoint (a GGUF import's treadle-quant.safetensors) hands its matrices over as QuantizedTensors;
`ModelWeights.from_state_dict` keeps them as they are, or converts every matrix to one format.
Under int4 the embedding (and the LM head it is tied to) is stored as int8, as GGUF's Q4 models
ship it: the head's error reaches every logit directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels.linear import (
    INT4_CPU_KERNEL,
    INT8_CPU_KERNEL,
    pack_int4_cpu,
)
from ..kernels.quant_linear import (
    GROUP,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from .config import ModelConfig

# Checkpoint tensor name -> (field, row block inside the fused field). Order inside a fused field
# is the order of its row blocks.
LAYER_TENSORS: dict[str, tuple[str, int]] = {
    "model.layers.{i}.input_layernorm.weight": ("attn_norm", 0),
    "model.layers.{i}.self_attn.q_proj.weight": ("qkv", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("qkv", 1),
    "model.layers.{i}.self_attn.v_proj.weight": ("qkv", 2),
    "model.layers.{i}.self_attn.q_proj.bias": ("qkv_bias", 0),
    "model.layers.{i}.self_attn.k_proj.bias": ("qkv_bias", 1),
    "model.layers.{i}.self_attn.v_proj.bias": ("qkv_bias", 2),
    "model.layers.{i}.self_attn.o_proj.weight": ("o", 0),
    "model.layers.{i}.post_attention_layernorm.weight": ("mlp_norm", 0),
    "model.layers.{i}.mlp.gate_proj.weight": ("gate_up", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("gate_up", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("down", 0),
}
MODEL_TENSORS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold for `cfg`, with its shape."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    layer = {
        "model.layers.{i}.input_layernorm.weight": (d,),
        "model.layers.{i}.self_attn.q_proj.weight": (q, d),
        "model.layers.{i}.self_attn.k_proj.weight": (kv, d),
        "model.layers.{i}.self_attn.v_proj.weight": (kv, d),
        "model.layers.{i}.self_attn.o_proj.weight": (d, q),
        "model.layers.{i}.post_attention_layernorm.weight": (d,),
        "model.layers.{i}.mlp.gate_proj.weight": (f, d),
        "model.layers.{i}.mlp.up_proj.weight": (f, d),
        "model.layers.{i}.mlp.down_proj.weight": (d, f),
    }
    if cfg.qkv_bias:
        layer |= {
            "model.layers.{i}.self_attn.q_proj.bias": (q,),
            "model.layers.{i}.self_attn.k_proj.bias": (kv,),
            "model.layers.{i}.self_attn.v_proj.bias": (kv,),
        }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        shapes |= {name.format(i=i): shape for name, shape in layer.items()}
    return shapes


class WeightFormat(str, Enum):
    """How a weight matrix is stored (and so which products can multiply it)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    INT8 = "int8"  # per output channel: W = scales[n] * q, q in [-127, 127]
    INT4 = "int4"  # per 32 inputs: W = scales[g, n] * q + mins[g, n], q in [0, 15]

    @property
    def quantized(self) -> bool:
        return self in (WeightFormat.INT8, WeightFormat.INT4)

    @property
    def dtype(self) -> torch.dtype:
        """The float formats' torch dtype."""
        if self.quantized:
            raise ValueError(f"{self.value} weights have no float dtype")
        return _FLOAT_DTYPES[self]

    @classmethod
    def of(cls, value: str | torch.dtype | WeightFormat) -> WeightFormat:
        """A format from its name or a float torch dtype; anything else is a ValueError."""
        if isinstance(value, torch.dtype):
            for fmt, dtype in _FLOAT_DTYPES.items():
                if dtype == value:
                    return fmt
        else:
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"weight format {value!r}: expected one of "
                         f"{', '.join(f.value for f in cls)} (or a float torch dtype)")


_FLOAT_DTYPES = {
    WeightFormat.FLOAT32: torch.float32,
    WeightFormat.BFLOAT16: torch.bfloat16,
    WeightFormat.FLOAT16: torch.float16,
}


@dataclass
class QuantizedTensor:
    """A matrix W [out, in] as a quantized checkpoint stores it (kernels/quant_linear.py)."""

    format: WeightFormat  # INT8 or INT4
    codes: torch.Tensor  # INT8: int8 [out, in]; INT4: uint8 [out, in / 2], two codes per byte
    scales: torch.Tensor  # INT8: fp32 [out]; INT4: fp32 [in / 32, out]
    mins: torch.Tensor | None = None  # INT4: fp32 [in / 32, out]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.codes.shape
        return (rows, 2 * cols) if self.format == WeightFormat.INT4 else (rows, cols)

    def dequantize(self) -> torch.Tensor:  # fp32 [out, in]
        if self.format == WeightFormat.INT4:
            return dequantize_int4(self.codes, self.scales, self.mins)
        return dequantize_int8(self.codes, self.scales)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        mins = None if self.mins is None else self.mins.to(device)
        return QuantizedTensor(self.format, self.codes.to(device), self.scales.to(device), mins)

    @staticmethod
    def cat(blocks: list[QuantizedTensor]) -> QuantizedTensor:
        """Row blocks of one format stacked into one matrix (a fused projection)."""
        fmt = blocks[0].format
        mins = None if fmt == WeightFormat.INT8 else torch.cat([b.mins for b in blocks], dim=1)
        return QuantizedTensor(
            fmt,
            torch.cat([b.codes for b in blocks]),
            torch.cat([b.scales for b in blocks], dim=-1),  # [out] or [G, out]
            mins,
        )


Matrix = torch.Tensor | QuantizedTensor  # a state dict's matrix: float, or as a file quantized it


def quantize(w: Matrix, fmt: WeightFormat) -> Matrix:
    """`w` stored in `fmt`: a float tensor for the float formats, else a QuantizedTensor. Formats
    already met are kept; converting between two integer formats goes through fp32."""
    if isinstance(w, QuantizedTensor) and w.format == fmt:
        return w
    if not fmt.quantized:
        return (w.dequantize() if isinstance(w, QuantizedTensor) else w).to(fmt.dtype)
    w = w.dequantize() if isinstance(w, QuantizedTensor) else w
    if fmt == WeightFormat.INT8:
        return QuantizedTensor(fmt, *quantize_int8(w))
    return QuantizedTensor(fmt, *quantize_int4(w))


@dataclass
class Linear:
    """A weight [out, in] (+ bias [out]) in one WeightFormat, with what each product reads.

    Float formats: `weight` is the matrix, and for FLOAT32 on the CPU `host` a numpy view of it
    (OpenBLAS). Integer formats: `weight` holds the codes and `scales` / `mins` the rest, as in
    QuantizedTensor; on the CPU `packed` / `packed_scales` hold torch's kernel form of them
    (kernels/linear.py). The bias keeps the activations' dtype.
    """

    weight: torch.Tensor  # float: [out, in]; INT8: int8 codes [out, in]; INT4: uint8 [out, in/2]
    bias: torch.Tensor | None = None
    host: np.ndarray | None = None
    format: WeightFormat | None = None  # None: the float format of weight.dtype
    scales: torch.Tensor | None = None  # INT8: fp32 [out]; INT4: fp32 [in / 32, out]
    mins: torch.Tensor | None = None  # INT4: fp32 [in / 32, out]
    packed: torch.Tensor | None = None  # INT4 on the CPU: pack_int4_cpu's codes
    packed_scales: torch.Tensor | None = None  # CPU: INT8 bf16 [out]; INT4 bf16 [in/32, out16, 2]
    host_int8: tuple[np.ndarray, np.ndarray] | None = None  # CPU INT8: numpy (codes, scales) views

    def __post_init__(self):
        if self.format is None:
            self.format = WeightFormat.of(self.weight.dtype)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        cols = self.weight.shape[1]
        return 2 * cols if self.format == WeightFormat.INT4 else cols

    @property
    def nbytes(self) -> int:
        """Bytes a product reads (the weight in its format, scales included; not the bias)."""
        parts = (self.weight, self.scales, self.mins)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def quantized(self) -> QuantizedTensor:
        if not self.format.quantized:
            raise ValueError(f"a {self.format.value} Linear is not quantized")
        return QuantizedTensor(self.format, self.weight, self.scales, self.mins)

    def dequantized(self) -> torch.Tensor:  # fp32 [out, in]
        return self.quantized().dequantize() if self.format.quantized else self.weight.float()

    @classmethod
    def of(
        cls,
        weight: Matrix,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | WeightFormat | str | None = None,
    ) -> Linear:
        """`dtype`, if given, is the format to store the weight in (converted or quantized here;
        kernels/linear.py and kernels/quant_linear.py multiply it); None keeps the weight's own."""
        if dtype is not None:
            weight = quantize(weight, WeightFormat.of(dtype))
        if isinstance(weight, QuantizedTensor):
            lin = cls(weight.codes.contiguous(), bias, format=weight.format,
                      scales=weight.scales.float().contiguous(),
                      mins=None if weight.mins is None else weight.mins.float().contiguous())
        else:
            weight = weight.contiguous()
            lin = cls(weight, bias)
        cpu = lin.weight.device.type == "cpu"
        if cpu and lin.format == WeightFormat.FLOAT32:
            lin.host = lin.weight.numpy()
        elif cpu and lin.format == WeightFormat.INT8:
            # numpy views for kernels/cpu_quant_linear.py (no conversion per call)
            lin.host_int8 = (lin.weight.numpy(), lin.scales.numpy())
            if INT8_CPU_KERNEL:
                lin.packed_scales = lin.scales.to(torch.bfloat16)
        elif cpu and lin.format == WeightFormat.INT4 and INT4_CPU_KERNEL:
            lin.packed, lin.packed_scales = pack_int4_cpu(lin.weight, lin.scales, lin.mins)
        return lin


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [d]
    qkv: Linear  # [q + 2kv, d]: q rows, then k rows, then v rows
    o: Linear  # [d, q]
    mlp_norm: torch.Tensor  # [d]
    gate_up: Linear  # [2F, d]: gate rows, then up rows
    down: Linear  # [d, F]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, d] float; a quantized embedding's codes (see embed_quant)
    layers: list[LayerWeights]
    norm: torch.Tensor  # [d]
    lm_head: Linear  # [V, d]; shares storage with `embed` when the embeddings are tied
    # The embedding as a quantized matrix when it is stored quantized (`embed` is then its codes;
    # a tied LM head is this same Linear), else None.
    embed_quant: Linear | None = None

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:  # [...] -> [..., d]
        """The embedding rows of `tokens` (fp32 when the table is quantized)."""
        if self.embed_quant is None:
            return F.embedding(tokens, self.embed)
        e, flat = self.embed_quant, tokens.reshape(-1)
        if e.format == WeightFormat.INT8:
            rows = dequantize_int8(e.weight[flat], e.scales[flat])
        else:
            rows = dequantize_int4(e.weight[flat], e.scales[:, flat], e.mins[:, flat])
        return rows.view(*tokens.shape, rows.shape[-1])

    def linears(self) -> list[Linear]:
        return [lin for lw in self.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [
            self.lm_head
        ]

    @property
    def weight_only(self) -> bool:
        """Whether some matrix is stored in another format than the activations' dtype (the norms'
        dtype): products then round their inputs (and outputs) to a narrower type, and a forward
        must compute every row as it would alone (graph/backend.py)."""
        act = WeightFormat.of(self.norm.dtype)
        return self.embed.dtype != self.norm.dtype or any(
            lin.format != act for lin in self.linears()
        )

    def formats(self) -> dict[WeightFormat, int]:
        """How many matrices (the LM head included) are stored in each format."""
        out: dict[WeightFormat, int] = {}
        for lin in self.linears():
            out[lin.format] = out.get(lin.format, 0) + 1
        return out

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Matrix],
        cfg: ModelConfig,
        weight_dtype: torch.dtype | WeightFormat | str | None = None,
    ) -> ModelWeights:
        """Fuse a checked HF-layout state dict (see loaders/safetensors_weights.py).

        `weight_dtype` (a float torch dtype or a WeightFormat) stores every matrix, the embedding
        included, in that format: float32/bfloat16/float16, or quantized to int8 or int4 (under
        int4 the embedding and LM head are int8, see the module docstring). None keeps each
        matrix as the state dict holds it: its float tensors, or a quantized checkpoint's
        QuantizedTensors. The norms keep the state dict's dtype, the dtype the forward computes in.
        """
        fmt = None if weight_dtype is None else WeightFormat.of(weight_dtype)
        head_fmt = WeightFormat.INT8 if fmt == WeightFormat.INT4 else fmt

        def fused(i: int, field: str) -> Matrix | None:
            blocks = sorted(
                (block, name.format(i=i))
                for name, (f, block) in LAYER_TENSORS.items()
                if f == field and name.format(i=i) in state
            )
            if not blocks:
                return None
            if fmt == WeightFormat.INT4 and field not in ("attn_norm", "mlp_norm", "qkv_bias"):
                for _, name in blocks:
                    if state[name].shape[1] % GROUP:
                        raise ValueError(
                            f"'{name}' has {state[name].shape[1]} inputs: int4 weights need a "
                            f"multiple of {GROUP} (groups of {GROUP}); use int8 for this model"
                        )
            parts = [state.pop(name) for _, name in blocks]
            if all(isinstance(p, torch.Tensor) for p in parts):
                return torch.cat(parts, dim=0)
            kinds = {p.format if isinstance(p, QuantizedTensor) else None for p in parts}
            if len(kinds) == 1:  # all quantized, in one format
                return QuantizedTensor.cat(parts)
            # Row blocks stored differently (e.g. a GGUF with q/k in Q4_K and v in Q6_K): the
            # fused matrix is kept exactly, in fp32.
            return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p.float()
                              for p in parts], dim=0)

        layers = []
        for i in range(cfg.num_layers):
            layers.append(
                LayerWeights(
                    attn_norm=fused(i, "attn_norm"),
                    qkv=Linear.of(fused(i, "qkv"), fused(i, "qkv_bias"), fmt),
                    o=Linear.of(fused(i, "o"), dtype=fmt),
                    mlp_norm=fused(i, "mlp_norm"),
                    gate_up=Linear.of(fused(i, "gate_up"), dtype=fmt),
                    down=Linear.of(fused(i, "down"), dtype=fmt),
                )
            )
        embed_lin = Linear.of(state["model.embed_tokens.weight"], dtype=head_fmt)
        if cfg.tie_word_embeddings:
            head = embed_lin
        else:
            head = Linear.of(state["lm_head.weight"], dtype=head_fmt)
        return cls(
            embed=embed_lin.weight,
            layers=layers,
            norm=state["model.norm.weight"],
            lm_head=head,
            embed_quant=embed_lin if embed_lin.format.quantized else None,
        )
