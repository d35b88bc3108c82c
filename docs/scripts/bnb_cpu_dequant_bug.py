"""Show bitsandbytes' CPU ``dequantize_4bit`` against a hand decoding of the same bytes.

Quantizes random weights with ``bitsandbytes.functional.quantize_4bit`` (whose bytes are
right), then decodes those bytes twice: with ``bitsandbytes.functional.dequantize_4bit`` and
by hand from the format's definition (code table lookup, times the block's absmax, in
float64). Prints the largest difference per case. On an AVX-512 CPU with bitsandbytes 0.50.2
the 33x96 and 32x96 weights at blocksize 64 come back wrong; see docs/bitsandbytes-cpu.md.

Run: ``python docs/scripts/bnb_cpu_dequant_bug.py`` (needs torch and bitsandbytes only).
"""

from __future__ import annotations

import bitsandbytes
import bitsandbytes.functional as bnbf
import torch


def by_hand(packed: torch.Tensor, state) -> torch.Tensor:
    """float64 values of the packed weight: element i is code[nibble i] * absmax[i // blocksize],
    the first element of each byte in its high nibble."""
    raw = packed.view(-1).view(torch.uint8).long()
    n = state.shape.numel()
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).view(-1)[:n]
    scale = state.absmax.double()[torch.arange(n) // state.blocksize]
    return (state.code.double()[codes] * scale).view(state.shape)


def main() -> None:
    print(
        f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    torch.manual_seed(0)
    print("type  weight   blocksize  dtype     max |bitsandbytes - by hand|")
    for quant_type in ("nf4", "fp4"):
        for shape in ((33, 96), (32, 96), (32, 128), (40, 136)):
            run(quant_type, shape, 64)


def run(quant_type: str, shape: tuple[int, int], blocksize: int) -> None:
    weight = torch.randn(shape)
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    exact = by_hand(packed, state)
    for dtype in (torch.float32, torch.bfloat16):
        state.dtype = dtype
        want = exact.float().to(dtype).double()  # the right answer in dtype: fp32, then cast
        got = bnbf.dequantize_4bit(packed, state).double()
        err = (got - want).abs().max().item()
        name = f"{shape[0]}x{shape[1]}"
        print(f"{quant_type:<5} {name:<8} {blocksize:<10} {str(dtype)[6:]:<9} {err:.3g}")


if __name__ == "__main__":
    main()
