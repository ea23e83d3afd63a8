"""int8 and int4 KV cache formats: symmetric integers with one scale per group of values.

A cached vector (one token's K or V of one head, or one MLA latent row) is cut into groups
of ``group`` consecutive elements along the head dimension, each stored as small integers
and one scale:

* int8: groups of 64, ``scale = absmax / 127`` as fp16, integers ``round(x / scale)`` in
  [-127, 127], one byte each.
* int4: groups of 16, integers in [-8, 7] stored as ``q + 8`` (0..15), two per byte (element
  ``2i`` in the low nibble, ``2i + 1`` in the high one), and a one-byte scale in **e5m3**: an
  unsigned float of 5 exponent bits (bias 15, subnormals, fp16's range) and 3 mantissa bits,
  i.e. the fp16 bit pattern shifted right by 7 (``code << 7`` is the fp16 scale's bits; codes
  1..247, 0 an all-zero group never produced). The scale is the **least-squares choice** among
  six e5m3 codes around ``absmax / 7`` (the code nearest to it, four below, one above): each
  candidate's group is rounded and clipped to [-8, 7], and the one with the least summed
  squared error is kept (the first on a tie). A smaller scale clips the group's largest value
  a little and rounds all the others finer; with 16 levels that trade usually wins.

Why 16-value groups with byte scales: halving the group (32 -> 16) halves the values one
outlier coarsens, and an e5m3 byte instead of an fp16 scale keeps the bytes: 0.5 + 1/16 =
0.5625 bytes per value either way (bf16 / 3.56). Measured in docs/kv-cache.md.

Why groups along the head dimension, per token (not KIVI's per-channel keys): a per-channel
scale spans a group of *tokens*, but the engine writes one token at a time into a page.
Either a page's scale changes as it fills (re-quantizing tokens already stored, so a key's
stored value would depend on when it was read: prefix hits, chunk sizes and preemption would
change the scores) or the newest tokens stay unquantized in a side buffer (KIVI's residual),
which the paged cache, the prefix cache and the kernels would all have to know. Per-token
groups keep every token's stored bytes a function of that token alone, so every cache
property holds exactly as for fp8.

Bit-exact everywhere: every step of the int4 choice is one correctly rounded IEEE fp32
operation (division, product, difference, square) and the 16 squared errors are summed as a
fixed tree (halves added elementwise), so the Triton write kernel (attention/triton/packed.py)
stores the same bytes as this torch code on any device.

A float format ("bf16", "fp16", "fp32", "fp8") has no scale; it appears in a packed page
only beside an integer one (e.g. K in bf16, V in int4).

The contract every backend keeps (as for fp8, kvcache/kv_quant.py): attention sees K/V *as
stored*: this step's own K/V go through ``as_stored`` (quantize, dequantize), bit-equal to
what a later step reads back from the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT_BITS = {"int8": 8, "int4": 4}
GROUP = {"int8": 64, "int4": 16}
SCALE_BYTES = {"int8": 2, "int4": 1}  # fp16, e5m3
FLOAT_FORMATS = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                 "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                 "float8_e4m3fn": torch.float8_e4m3fn}
SCALE_DTYPE = torch.float16  # int8's scales
SCALE_MAX = float(torch.finfo(SCALE_DTYPE).max)
E5M3_MAX = 0xF7  # code 0xF8 << 7 would be fp16 infinity
INT4_CANDIDATES = (-4, -3, -2, -1, 0, 1)  # e5m3 codes tried, around the one nearest absmax / 7


@dataclass(frozen=True)
class PlaneFormat:
    """How one plane (K, V or the MLA latent) stores a vector of ``width`` elements."""

    name: str  # "int8", "int4", or a float format's canonical name
    bits: int
    group: int = 0  # elements per scale; 0: a float format, no scale
    scale_bytes: int = 0  # 2: fp16 scales (int8), 1: e5m3 (int4)

    @property
    def is_int(self) -> bool:
        return self.group > 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group_for(self, width: int) -> int:
        return math.gcd(width, self.group)

    def value_bytes(self, width: int) -> int:
        return width * self.bits // 8

    def scale_count(self, width: int) -> int:
        return width // self.group_for(width) if self.is_int else 0

    def token_bytes(self, rows: int, width: int) -> int:
        """Bytes of one token's ``rows`` vectors, scales included."""
        return rows * (self.value_bytes(width) + self.scale_bytes * self.scale_count(width))

    @property
    def float_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.name]


def plane_format(name: str, field: str = "kv_dtype") -> PlaneFormat:
    """The format named ``name`` ("int8", "int4", "bf16", "fp8", ...); ValueError naming ``field``."""
    key = str(name).strip().lower()
    if key in INT_BITS:
        return PlaneFormat(key, INT_BITS[key], GROUP[key], SCALE_BYTES[key])
    if key in FLOAT_FORMATS:
        dt = FLOAT_FORMATS[key]
        canon = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, "fp8")
        return PlaneFormat(canon, torch.finfo(dt).bits)
    known = ", ".join(["auto", *INT_BITS, *FLOAT_FORMATS])
    raise ValueError(f"{field}: unsupported dtype {name!r} for the KV cache (use one of {known}, or 'K,V' e.g. 'int4,int8')")


@dataclass(frozen=True)
class PackedKV:
    """The formats of a packed cache page: ``k`` (also the MLA latent's) and ``v``."""

    k: PlaneFormat
    v: PlaneFormat

    @property
    def label(self) -> str:
        return self.k.name if self.k == self.v else f"{self.k.name},{self.v.name}"


def _name(x) -> str:
    if isinstance(x, torch.dtype):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float8_e4m3fn: "fp8"}.get(x, str(x))
    return str(x)


def resolve(kv_dtype, k_dtype, v_dtype, model_dtype: torch.dtype) -> tuple[torch.dtype, PackedKV | None]:
    """The cache's storage dtype and, for a packed cache, its formats.

    ``kv_dtype`` is one format for both, or "K,V" (two); ``k_dtype``/``v_dtype`` override
    either side. None/"auto" is the model's dtype. K and V in one float format keep the plain
    layout ([2, blocks, block_size, heads, dim] of that dtype, PackedKV None); anything with
    an integer format, or two different formats, is a packed uint8 page (``kv_pages``)."""
    base = [None, None]
    if kv_dtype not in (None, "auto"):
        parts = [p for p in _name(kv_dtype).split(",")]
        if len(parts) > 2:
            raise ValueError(f"kv_dtype {kv_dtype!r}: give one format, or two ('K,V')")
        base = [parts[0], parts[-1]]
    names = [k_dtype if k_dtype not in (None, "auto") else base[0],
             v_dtype if v_dtype not in (None, "auto") else base[1]]
    fields = ("k_dtype" if k_dtype not in (None, "auto") else "kv_dtype",
              "v_dtype" if v_dtype not in (None, "auto") else "kv_dtype")
    fmts = [plane_format(_name(n) if n is not None else _name(model_dtype), f) for n, f in zip(names, fields)]
    k, v = fmts
    if not k.is_int and k == v:
        return k.float_dtype, None
    for f, field in zip(fmts, fields):
        if f.name == "fp32":
            raise ValueError(f"{field}: fp32 cannot share a packed page with {k.name}/{v.name} "
                             f"(use bf16 or fp16 beside an integer format)")
    return torch.uint8, PackedKV(k, v)


# ---------------------------------------------------------------- the arithmetic
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] times the normalized Sylvester Hadamard matrix (D a power of two): orthonormal,
    symmetric, its own inverse. Butterflies of adds and subtracts in fp32 (each row's result
    depends on that row alone, whatever the batch), returned in x's dtype."""
    return _hadamard32(x).to(x.dtype)


def _hadamard32(x: torch.Tensor) -> torch.Tensor:
    shape, D = x.shape, x.shape[-1]
    y = x.reshape(-1, D).float()
    h = 1
    while h < D:
        y = y.view(-1, D // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return y.reshape(shape) * D ** -0.5


def e5m3_decode(code: torch.Tensor) -> torch.Tensor:
    """e5m3 scale codes (uint8) -> their values in fp32 (exact: each is an fp16 value)."""
    return (code.to(torch.int16) << 7).view(torch.float16).float()


def e5m3_nearest(s: torch.Tensor) -> torch.Tensor:
    """The e5m3 code nearest to ``s`` >= 0 (fp32), as int16 in [0, 247] (via fp16's bits)."""
    bits = s.clamp(max=61440.0).to(torch.float16).view(torch.int16).to(torch.int32)
    return ((bits + 64) >> 7).clamp(0, E5M3_MAX).to(torch.int16)


def tree_sum(e: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) as a fixed tree of elementwise adds of halves."""
    while e.shape[-1] > 1:
        h = e.shape[-1] // 2
        e = e[..., :h] + e[..., h:]
    return e[..., 0]


def _int4_groups(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 groups xs [..., NG, 16] -> (integers in [-8, 7] as fp32, e5m3 codes uint8): the
    least-squares scale among ``INT4_CANDIDATES`` (module doc)."""
    c0 = e5m3_nearest(xs.abs().amax(-1) / 7.0)
    best = torch.full(c0.shape, float("inf"), device=xs.device)
    best_q = torch.zeros_like(xs)
    best_c = torch.zeros_like(c0)
    for dc in INT4_CANDIDATES:
        c = (c0 + dc).clamp(1, E5M3_MAX)
        s = e5m3_decode(c)[..., None]
        q = (xs / s).round().clamp(-8.0, 7.0)
        e = xs - q * s
        err = tree_sum(e * e)
        take = err < best
        best = torch.where(take, err, best)
        best_q = torch.where(take[..., None], q, best_q)
        best_c = torch.where(take, c, best_c)
    return best_q, best_c.to(torch.uint8)


def quantize(x: torch.Tensor, fmt: PlaneFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., width] -> (bytes [..., value_bytes] uint8, scales [..., width / group]: fp16
    for int8, e5m3 codes (uint8) for int4)."""
    width = x.shape[-1]
    g = fmt.group_for(width)
    xs = x.float().unflatten(-1, (width // g, g))
    if fmt.bits == 4:
        if g & (g - 1):
            raise ValueError(f"int4 groups need a power-of-two size, got {g} (width {width})")
        q, codes = _int4_groups(xs)
        u = (q.flatten(-2) + 8).to(torch.uint8).unflatten(-1, (width // 2, 2))
        return u[..., 0] | (u[..., 1] << 4), codes
    scale = (xs.abs().amax(-1) / fmt.qmax).clamp(max=SCALE_MAX).to(SCALE_DTYPE)
    s = scale.float()[..., None]
    # A zero scale (an all-zero group, or one that underflows fp16) stores zeros.
    q = torch.where(s > 0, xs / s, torch.zeros_like(xs)).round().clamp(-fmt.qmax, fmt.qmax).to(torch.int8)
    return q.flatten(-2).view(torch.uint8), scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, fmt: PlaneFormat, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize``: (bytes, scales) -> [..., width] in ``dtype``."""
    if fmt.bits == 8:
        q = data.view(torch.int8).float()
        sf = scale.float()
    else:
        lo, hi = (data & 15).float() - 8, (data >> 4).float() - 8
        q = torch.stack([lo, hi], dim=-1).flatten(-2)
        sf = e5m3_decode(scale)
    width = q.shape[-1]
    g = width // scale.shape[-1]
    return (q.unflatten(-1, (width // g, g)) * sf[..., None]).flatten(-2).to(dtype)


def as_stored(x: torch.Tensor, fmt: PlaneFormat) -> torch.Tensor:
    """``x`` as it reads back from a plane of format ``fmt``, in ``x``'s dtype."""
    if fmt.is_int:
        return dequantize(*quantize(x, fmt), fmt, x.dtype)
    from qkv.kvcache.kv_quant import as_stored as float_as_stored

    return float_as_stored(x, fmt.float_dtype)


def check_arg(value: str) -> str:
    """argparse ``type`` of ``--kv-cache-dtype``: "auto", one format or "K,V"; refused by name."""
    import argparse

    if value != "auto":
        parts = value.split(",")
        if len(parts) > 2:
            raise argparse.ArgumentTypeError(f"{value!r}: give one format, or two ('K,V')")
        for part in parts:
            try:
                plane_format(part, "--kv-cache-dtype")
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return value
