"""Weight-only INT8/INT4 quantization of the ChatGLM linear layers, in the official format.

Per output row o of a weight W [out, in]:
    scale[o] = max_j |W[o, j]| / (2^(bits-1) - 1)          (/127 for INT8, /7 for INT4)
    q[o, j]  = round(W[o, j] / scale[o])                    (torch.round: half to even)
INT4 packs two values per int8 byte, the EVEN input column in the HIGH nibble:
    byte[o, j] = (q[o, 2j] << 4) | (q[o, 2j+1] & 0x0F)      -> int8 [out, in/2]
and unpacks with sign extension, exactly as the official C/CUDA kernels. A quantized layer
stores `weight` (int8 [out, in] or packed [out, in/2]), `weight_scale` [out] and the float
`bias`: the key names and shapes of the official INT4/INT8 checkpoints.

Two deliberate departures from the official code, both where it has no defined result:
rows whose scale is 0 (all-zero rows, or a scale that underflows its dtype) quantize to 0
instead of 0/0 = NaN cast to int8, and q is clamped to [-(2^(bits-1)-1), 2^(bits-1)-1].

Kernels (CPU choices measured with scripts/bench_quant.py; no dense weight is ever formed):
- CPU, bf16 activations, few rows (<= 32; <= 8 where the CPU has native bf16):
  `torch._weight_int8pack_mm`; INT8 decoding runs 2-3x faster than a dense fp32 matmul;
- CPU otherwise: turn blocks of 256 weight rows into floats (bf16 for 9+ rows of bf16
  activations on CPUs with native bf16, else fp32), multiply block by block and scale the
  output, not the weight. Blocks stay cache-resident, so this runs at about the speed of
  the dense matmul of the same dtype. INT4 blocks are unpacked as [high nibbles | low
  nibbles] and the activation columns are permuted to match (no nibble interleaving);
- CUDA and other devices: dequantize to the activation dtype and call F.linear (the
  official CUDA kernels also dequantize to fp16 before a dense matmul).
Backward reaches the input only: grad_x = (grad_y * scale) @ q, block by block on CPU,
grad_y @ dequantized weight elsewhere (fp16 gradients must not be scaled down first). The
weight never gets a gradient, and only the int8 weight and the scale are saved for backward.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import ARCH_GLM1, ARCH_GLM2
from .prompt_learning import SOFT_PROMPT_KEY_PREFIXES

SUPPORTED_BITS = (4, 8)

# CPU kernel choices (measured, see the module docstring).
_BLOCK_ROWS = 256  # weight rows dequantized at once: 4 MiB of fp32 at in_features=4096
_QUANTIZE_BLOCK_ROWS = 1024  # weight rows quantized at once (temporaries of 8-16 MiB at in_features=4096)
# Up to this many bf16 activation rows torch._weight_int8pack_mm beats the fp32 block path.
_INT8PACK_MAX_ROWS = 32
# On CPUs with native bf16 (avx512_bf16/AMX) bf16 blocks win from this many rows on; below
# it bf16 matrix-vector products are slower than int8pack (forward) and fp32 (backward).
_NATIVE_BF16_MIN_ROWS = 9
# torch._weight_int8pack_mm on CPU (torch 2.13) crashes or returns NaN unless in_features is a
# multiple of 16; 64 keeps a margin for other instruction sets. Every real ChatGLM shape is.
_INT8PACK_IN_FEATURES_MULTIPLE = 64


@dataclass(frozen=True)
class FamilyQuantization:
    """Which linears of one architecture are quantized, and the official scale dtype.

    `linears` are full module names under the causal-LM root with `{i}` for the layer index;
    the leading `transformer.` may be absent (names relative to the inner model).
    `scale_dtype` None keeps the weight's dtype.
    """

    linears: tuple[str, ...]
    scale_dtype: torch.dtype | None
    _pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        alternatives = []
        for name in self.linears:
            body = re.escape(name.removeprefix("transformer.")).replace(r"\{i\}", r"\d+")
            alternatives.append(body)
        object.__setattr__(self, "_pattern", re.compile(r"(?:transformer\.)?(?:" + "|".join(alternatives) + r")"))

    def matches(self, module_name: str) -> bool:
        return self._pattern.fullmatch(module_name) is not None


QUANTIZED_LINEARS: dict[str, FamilyQuantization] = {
    # ChatGLM-6B's quantization.py casts the scale to fp16 whatever the weight dtype.
    ARCH_GLM1: FamilyQuantization(
        linears=(
            "transformer.layers.{i}.attention.query_key_value",
            "transformer.layers.{i}.attention.dense",
            "transformer.layers.{i}.mlp.dense_h_to_4h",
            "transformer.layers.{i}.mlp.dense_4h_to_h",
        ),
        scale_dtype=torch.float16,
    ),
    # ChatGLM2/3 keep the scale in the weight's dtype.
    ARCH_GLM2: FamilyQuantization(
        linears=(
            "transformer.encoder.layers.{i}.self_attention.query_key_value",
            "transformer.encoder.layers.{i}.self_attention.dense",
            "transformer.encoder.layers.{i}.mlp.dense_h_to_4h",
            "transformer.encoder.layers.{i}.mlp.dense_4h_to_h",
        ),
        scale_dtype=None,
    ),
}


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be 4 or 8, found {bits!r}")
    return bits


def _family(architecture: str) -> FamilyQuantization:
    try:
        return QUANTIZED_LINEARS[architecture]
    except KeyError:
        raise ValueError(
            f"unknown ChatGLM architecture {architecture!r}; expected one of {sorted(QUANTIZED_LINEARS)}"
        ) from None


# ----------------------------------------------------------------------------------------
# Pure functions: quantize, pack, unpack, dequantize
# ----------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [out, in] (in even) into int8 [out, in/2].

    Byte j of a row holds column 2j in its high nibble and column 2j+1 in its low nibble.
    """
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 matrix [out, in], found {q.dtype} {list(q.shape)}")
    if q.shape[1] % 2:
        raise ValueError(f"INT4 packing needs an even number of input columns, found {q.shape[1]}")
    as_bytes = q.view(torch.uint8)  # unsigned, so << 4 drops the sign bits instead of overflowing
    return ((as_bytes[:, 0::2] << 4) | (as_bytes[:, 1::2] & 0x0F)).view(torch.int8)


def _unpack_int4_halves(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(even columns, odd columns) of a packed [out, in/2] int8 matrix, each int8 [out, in/2]."""
    high = packed >> 4  # arithmetic shift of a signed byte: sign-extends the high nibble
    low = ((packed & 0x0F) ^ 8) - 8  # sign-extends the low nibble without relying on overflow
    return high, low


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 [out, in/2] -> int8 [out, in] with values in [-8, 7]."""
    if packed.dim() != 2 or packed.dtype != torch.int8:
        raise ValueError(
            f"unpack_int4 expects a packed int8 matrix [out, in/2], found {packed.dtype} {list(packed.shape)}"
        )
    high, low = _unpack_int4_halves(packed)
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def quantize_weight(
    weight: torch.Tensor, bits: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a dense weight [out, in] per output row with the official formulas.

    The scale is computed in the weight's dtype and then cast to `scale_dtype` (None: keep
    the weight's dtype); q = round(W / scale) follows torch type promotion between the two,
    as the official code does. Returns (qweight, scale): qweight int8 [out, in] for INT8 or
    packed int8 [out, in/2] for INT4; scale [out] in `scale_dtype`.
    """
    bits = _check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"quantize_weight expects a floating-point matrix [out, in], found {weight.dtype} {list(weight.shape)}"
        )
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"INT4 quantization needs an even number of input features, found {weight.shape[1]}")
    max_q = 2 ** (bits - 1) - 1
    scale_dtype = weight.dtype if scale_dtype is None else scale_dtype
    rows = weight.shape[0]
    qweight = torch.empty(rows, weight.shape[1] * bits // 8, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=scale_dtype, device=weight.device)
    # Row blocks: every formula is per row, so this is exact, and the temporaries stay one block
    # large (a streamed 6B weight never needs several dense copies at once).
    for start in range(0, rows, _QUANTIZE_BLOCK_ROWS):
        block = weight[start : start + _QUANTIZE_BLOCK_ROWS]
        block_scale = (block.abs().amax(dim=-1) / max_q).to(scale_dtype)
        divisor = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)  # zero rows -> q = 0, not NaN
        q = torch.round(block / divisor[:, None]).clamp_(-max_q, max_q).to(torch.int8)
        qweight[start : start + block.shape[0]] = pack_int4(q) if bits == 4 else q
        scale[start : start + block.shape[0]] = block_scale
    return qweight, scale


def unpacked_weight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer weight int8 [out, in] of a stored qweight (INT4 is unpacked)."""
    return unpack_int4(qweight) if _check_bits(bits) == 4 else qweight


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """scale[o] * q[o, j] as a dense [out, in] matrix in `dtype` (None: the scale's dtype).

    Both factors are cast to `dtype` first, then multiplied once: the same result as the
    official extraction kernels (fp32 on CPU, fp16 on CUDA).
    """
    dtype = scale.dtype if dtype is None else dtype
    return unpacked_weight(qweight, bits).to(dtype) * scale.to(dtype)[:, None]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


def _to_block_order(x: torch.Tensor, bits: int) -> torch.Tensor:
    """INT4 blocks hold [even columns | odd columns]: permute the activation columns to match."""
    return torch.cat((x[:, 0::2], x[:, 1::2]), dim=1) if bits == 4 else x


def _from_block_order(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return x
    half = x.shape[1] // 2
    return torch.stack((x[:, :half], x[:, half:]), dim=-1).reshape(x.shape[0], -1)


def _weight_blocks(qweight: torch.Tensor, bits: int):
    """Yield (start, stop, int8 rows [stop-start, in] in block order) over the weight."""
    for start in range(0, qweight.shape[0], _BLOCK_ROWS):
        rows = qweight[start : start + _BLOCK_ROWS]
        if bits == 4:
            rows = torch.cat(_unpack_int4_halves(rows), dim=1)
        yield start, start + rows.shape[0], rows


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run natively here (without, oneDNN emulates them 2-4x slower than fp32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _cpu_block_dtype(dtype: torch.dtype, rows: int) -> torch.dtype:
    """The dtype the block path multiplies in for `rows` activation (or gradient) rows."""
    native = dtype == torch.bfloat16 and rows >= _NATIVE_BF16_MIN_ROWS and _cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


def _cpu_forward(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, in] @ (scale * q)^T -> [M, out] in x's dtype, on CPU."""
    rows, in_features = x.shape
    qweight = qweight.contiguous()
    if x.dtype == torch.bfloat16 and in_features % _INT8PACK_IN_FEATURES_MULTIPLE == 0:
        max_rows = _NATIVE_BF16_MIN_ROWS - 1 if _cpu_has_native_bf16() else _INT8PACK_MAX_ROWS
        if rows <= max_rows:
            x_blocked = _to_block_order(x.contiguous(), bits)
            scale_bf16 = scale.to(torch.bfloat16)
            out = x.new_empty(rows, qweight.shape[0])
            for start, stop, block in _weight_blocks(qweight, bits):
                out[:, start:stop] = torch._weight_int8pack_mm(x_blocked, block, scale_bf16[start:stop])
            return out
    compute_dtype = _cpu_block_dtype(x.dtype, rows)
    x_blocked = _to_block_order(x.to(compute_dtype), bits)
    out = torch.empty(rows, qweight.shape[0], dtype=torch.float32, device=x.device)
    for start, stop, block in _weight_blocks(qweight, bits):
        out[:, start:stop] = F.linear(x_blocked, block.to(compute_dtype))
    return out.mul_(scale.float()).to(x.dtype)


def _cpu_grad_input(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """grad [M, out] @ (scale * q) -> [M, in] in fp32, on CPU; the gradient is scaled, not the weight."""
    compute_dtype = _cpu_block_dtype(grad.dtype, grad.shape[0])
    scaled = (grad.float() * scale.float()).to(compute_dtype)
    grad_x = torch.zeros(grad.shape[0], qweight.shape[1] * 8 // bits, dtype=torch.float32, device=grad.device)
    for start, stop, block in _weight_blocks(qweight.contiguous(), bits):
        grad_x += scaled[:, start:stop] @ block.to(compute_dtype)  # block sums accumulate in fp32
    return _from_block_order(grad_x, bits)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ (scale * q)^T with a gradient for x only; saves the int8 weight, not a dense one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.bits = bits
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(qweight, scale)
        x2d = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu":
            y = _cpu_forward(x2d, qweight, scale, bits)
        else:
            y = F.linear(x2d, dequantize_weight(qweight, scale, bits, x.dtype))
        return y.reshape(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        qweight, scale = ctx.saved_tensors
        grad2d = grad_y.reshape(-1, grad_y.shape[-1])
        if grad_y.device.type == "cpu":
            grad_x = _cpu_grad_input(grad2d, qweight, scale, ctx.bits)
        else:
            # Scaling the weight, not the gradient, keeps small fp16 gradients from underflowing.
            grad_x = grad2d @ dequantize_weight(qweight, scale, ctx.bits, grad_y.dtype)
        return grad_x.to(ctx.x_dtype).reshape(ctx.x_shape), None, None, None


# ----------------------------------------------------------------------------------------
# Module and model surgery
# ----------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored as INT8 or packed INT4 (official layout and names).

    Parameters (all requires_grad=False): `weight` int8 [out, in] (INT8) or [out, in/2]
    (INT4), `weight_scale` [out] (any float dtype; cast to the activation dtype in forward),
    `bias` [out] or None. Input [..., in] in fp32/bf16/fp16; output [..., out] in the same
    dtype. Gradients flow to the input only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Empty holders of the official shapes; `dtype` is the scale and bias dtype."""
        super().__init__()
        self.bits = _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 quantization needs an even number of input features, found {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, scale_dtype: torch.dtype | None = None, empty_init: bool = False
    ) -> QuantizedLinear:
        """Quantize `linear` (its bias is kept as is, frozen).

        `scale_dtype` None keeps the weight's dtype. `empty_init` builds uninitialised holders
        instead (scale in the weight's dtype) for a quantized state dict to load into.
        """
        weight = linear.weight
        if empty_init:
            module = cls(
                linear.in_features, linear.out_features, bits, bias=False, device=weight.device, dtype=weight.dtype
            )
        else:
            qweight, scale = quantize_weight(weight.detach(), bits, scale_dtype)
            module = cls(linear.in_features, linear.out_features, bits, bias=False, device="meta", dtype=scale.dtype)
            module.weight = nn.Parameter(qweight, requires_grad=False)
            module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects inputs [..., {self.in_features}], found {list(x.shape)}")
        out = _QuantizedMatmul.apply(x, self.weight, self.weight_scale, self.bits)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer multiplies by (for checks and export)."""
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


def is_quantized_linear_name(architecture: str, name: str) -> bool:
    """Whether module `name` (e.g. "transformer.layers.0.attention.dense") is quantized in `architecture`."""
    return _family(architecture).matches(name)


def quantize_linear_state(
    architecture: str, name: str, tensor: torch.Tensor, bits: int
) -> dict[str, torch.Tensor] | None:
    """Quantize one dense state-dict entry while loading.

    For `<linear>.weight` of a quantized linear, returns {`<linear>.weight`: int8 qweight,
    `<linear>.weight_scale`: scale} with the family's official scale dtype; for any other
    key (biases included) returns None.
    """
    bits = _check_bits(bits)
    module_name, _, leaf = name.rpartition(".")
    if leaf != "weight" or not is_quantized_linear_name(architecture, module_name):
        return None
    qweight, scale = quantize_weight(tensor, bits, _family(architecture).scale_dtype)
    return {name: qweight, f"{module_name}.weight_scale": scale}


def quantize(
    model: nn.Module, bits: int, empty_init: bool = False, device: torch.device | str | None = None
) -> nn.Module:
    """Replace the family's quantized linears of `model` in place; sets `config.quantization_bit`.

    `model` is a ChatGLM causal LM or its inner model (anything with `.config.architecture`).
    `empty_init` builds empty holders of the official shapes for a pre-quantized state dict.
    `device` (None: where each weight is) is where each weight is quantized and its layer is put,
    as the official `quantize(..., device=...)`. A model already quantized to `bits` is returned
    unchanged; one quantized to other bits raises. Returns `model`.
    """
    bits = _check_bits(bits)
    architecture = model.config.architecture
    family = _family(architecture)
    present = {module.bits for module in model.modules() if isinstance(module, QuantizedLinear)}
    if present == {bits}:
        return model
    if present:
        raise ValueError(
            f"the model is already quantized to INT{'/INT'.join(map(str, sorted(present)))}; "
            f"it cannot be re-quantized to INT{bits} (reload the dense checkpoint)"
        )
    # Names only: holding the modules would keep every dense weight alive until the end.
    names = [name for name, module in model.named_modules() if family.matches(name)]
    if not names:
        raise ValueError(
            f"no quantizable linear found in this {architecture!r} model; expected names like {family.linears[0]!r}"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, expected torch.nn.Linear")
        if device is not None:
            linear = linear.to(device)
        setattr(parent, child, QuantizedLinear.from_linear(linear, bits, family.scale_dtype, empty_init))
        del linear
    model.config.quantization_bit = bits
    return model


def quantize_model(
    model: nn.Module, bits: int, empty_init: bool = False, device: torch.device | str | None = None
) -> nn.Module:
    """`model.quantize(bits)` of the official ChatGLM classes, on a causal LM; returns `model`.

    Quantizes the same four linears per layer as the official quantization.py, in its packed
    format and scale dtype (ChatGLM-6B: fp16 scales from any weight dtype; ChatGLM2/3: the weight's),
    in place, whatever the model's dtype. The soft-prompt encoder, if any, is cast to fp32 and
    stays trainable (what the official recipe does by hand after `quantize`). Bits other than
    4/8 and a second quantization are errors (the official returns the model unchanged and logs).
    """
    bits = _check_bits(bits)
    present = sorted({module.bits for module in model.modules() if isinstance(module, QuantizedLinear)})
    if present:
        raise ValueError(
            f"this model is already quantized (INT{'/INT'.join(map(str, present))}); quantize() runs once, "
            "on a dense model: load the dense checkpoint again to quantize it differently"
        )
    quantize(model, bits, empty_init, device)
    for prefix in SOFT_PROMPT_KEY_PREFIXES:
        encoder = _submodule_or_none(model, prefix.rstrip("."))
        if encoder is not None:
            encoder.float().requires_grad_(True)
    return model


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
