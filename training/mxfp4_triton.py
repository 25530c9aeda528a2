"""The Triton kernel behind ``quant_experts.mxfp4_dequant_triton`` (imported on first use: Triton
comes with CUDA builds of torch).  Under TRITON_INTERPRET=1 it runs on CPU tensors (the tests)."""
import triton
import triton.language as tl


@triton.jit
def _e2m1(n):
    """A nibble as fp32: sign, 2 exponent bits, 1 mantissa bit (magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6)."""
    e = (n >> 1) & 3
    m = n & 1
    mag = tl.where(e == 0, m, m + 2).to(tl.float32) * tl.where(e == 3, 2.0, tl.where(e == 2, 1.0, 0.5))
    return tl.where(n >= 8, -mag, mag)


@triton.jit
def dequant_kernel(blocks_ptr, scales_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr, OUT: tl.constexpr):
    """BLOCK bytes a program: byte i holds values 2i (low nibble) and 2i+1, scaled by
    2**(scales[i // 16] - 127).  OUT 0: fp32, written side by side; 1 (bf16) or 2 (fp16): out_ptr
    is the output seen as int32, each byte's two 16-bit values one word (little-endian: low first),
    so every store is one coalesced 32-bit write and no register shuffle."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    b = tl.load(blocks_ptr + offs, mask=mask, other=0).to(tl.int32)
    e8 = tl.load(scales_ptr + offs // 16, mask=mask, other=127).to(tl.int32)
    # 2**(e8 - 127) from its fp32 bits (e8 = 0: 2**-127, subnormal; 255: inf, as exp2 gives)
    scale = tl.where(e8 == 0, 5.877471754111438e-39, (e8 << 23).to(tl.float32, bitcast=True))
    lo = _e2m1(b & 15) * scale
    hi = _e2m1(b >> 4) * scale
    if OUT == 0:
        o = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + o, tl.interleave(lo, hi), mask=o < 2 * n_bytes)
    else:
        half = tl.bfloat16 if OUT == 1 else tl.float16
        lo16 = lo.to(half).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(half).to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(out_ptr + offs, lo16 | (hi16 << 16), mask=mask)
