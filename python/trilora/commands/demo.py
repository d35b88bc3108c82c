"""``trilora demo``: one QLoRA layer through trilora and through bitsandbytes + PEFT.

Quantizes a random linear layer to NF4, attaches the same LoRA adapter to both stacks
(trilora's fused ``QLoraLinear``; PEFT's LoRA over ``bitsandbytes.nn.Linear4bit`` with the
very same packed bytes), runs forward and backward on the same input, and prints the error
of each against a float64 reference next to their times. Needs no downloads; bitsandbytes
and PEFT are optional (without them only trilora's column is printed).

torch is imported when the command runs, not with this module (``--help`` stays instant).
"""

from __future__ import annotations

import argparse
import statistics
import time

_DESCRIPTION = (
    "Quantize a random linear layer to NF4, put the same LoRA adapter on it in trilora "
    "(fused QLoraLinear) and in PEFT over bitsandbytes Linear4bit (the very same packed "
    "bytes), run forward and backward on the same input, and print each stack's error "
    "against a float64 reference next to its time. No downloads; without bitsandbytes and "
    "PEFT only trilora's row is printed."
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="quantize a layer and compare trilora with bitsandbytes + PEFT (no downloads)",
        description=_DESCRIPTION,
    )
    p.add_argument(
        "--in-features", type=_positive_int, default=2048, help="input features of the layer (K)"
    )
    p.add_argument(
        "--out-features", type=_positive_int, default=2048, help="output features of the layer (N)"
    )
    p.add_argument(
        "--tokens", type=_positive_int, default=256, help="rows of x (batch x sequence, M)"
    )
    p.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=_positive_float, default=32.0, help="LoRA alpha")
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="timed repetitions per stack (the median is printed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the weight, adapter and input")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="activation dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")


def _time(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _errors(y, grads, ref_y, ref_grads) -> dict[str, float]:
    def rel(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))

    out = {"y": rel(y, ref_y)}
    out.update({name: rel(grads[name], ref_grads[name]) for name in ref_grads})
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from trilora import __version__
    from trilora.io import UsageError
    from trilora.nn import QLoraLinear

    try:
        torch.device(args.device or "cpu")
    except RuntimeError as exc:
        raise UsageError(
            f"--device expects a torch device like cpu or cuda:0, got {args.device!r}"
        ) from exc
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {args.device}: torch.cuda.is_available() is False on this machine"
        )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(args.seed)
    k, n, m, r = args.in_features, args.out_features, args.tokens, args.rank
    linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    layer = QLoraLinear.from_linear(linear, r=r, lora_alpha=args.alpha, compute_dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)  # a trained-looking adapter, so the LoRA path matters
    x = torch.randn(m, k, device=device, dtype=dtype)
    dy = torch.randn(m, n, device=device, dtype=dtype)

    # float64 reference on the dequantized weight: measures kernel error, not 4-bit error.
    w64 = layer.dequantized_weight(torch.float32).double()
    a64 = layer.lora_A.detach().double().requires_grad_()
    b64 = layer.lora_B.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    y64 = x64 @ w64.t() + layer.scaling * (x64 @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    ref_grads = {"dx": x64.grad, "dA": a64.grad, "dB": b64.grad}

    def step_trilora():
        xi = x.detach().requires_grad_()
        layer.lora_A.grad = layer.lora_B.grad = None
        y = layer(xi)
        y.backward(dy)
        return y, {"dx": xi.grad, "dA": layer.lora_A.grad, "dB": layer.lora_B.grad}

    rows = [("trilora", step_trilora)]
    baseline_note = None
    try:
        rows.append(("bitsandbytes + PEFT", _bnb_peft_step(layer, x, dy, dtype)))
    except ImportError as exc:
        from trilora.io.extras import missing_message

        baseline_note = "bitsandbytes + PEFT not run: " + missing_message(
            "bitsandbytes", "the comparison", exc
        )

    print(
        f"trilora {__version__} | device {device} | {dtype_name} | "
        f"x [{m}, {k}] -> y [{m}, {n}], NF4 blocksize 64 + double quant, LoRA r={r}"
    )
    header = f"{'stack':<22}{'fwd+bwd ms':>12}{'rel err y':>12}{'dx':>11}{'dA':>11}{'dB':>11}"
    print(header)
    print("-" * len(header))
    times = {}
    for name, step in rows:
        y, grads = step()
        err = _errors(y, grads, y64, ref_grads)
        times[name] = _time(step, args.repeats, device)
        print(
            f"{name:<22}{times[name] * 1e3:>12.2f}{err['y']:>12.2e}{err['dx']:>11.2e}"
            f"{err['dA']:>11.2e}{err['dB']:>11.2e}"
        )
    if len(times) == 2:
        ratio = times["trilora"] / times["bitsandbytes + PEFT"]
        print(f"trilora / (bitsandbytes + PEFT) time ratio, same run: {ratio:.2f}")
    if baseline_note:
        print(baseline_note)
    print("errors are relative (Frobenius) against a float64 computation on the same 4-bit weight")
    return 0


def _bnb_peft_step(layer, x, dy, dtype):
    """One forward + backward of PEFT's LoRA over bitsandbytes on ``layer``'s exact bytes."""
    from trilora.bench.baselines import peft_lora_over_bnb

    peft_model, lora = peft_lora_over_bnb(layer, dtype)
    lora_a, lora_b = lora.lora_A["default"].weight, lora.lora_B["default"].weight

    def step():
        xi = x.detach().requires_grad_()
        lora_a.grad = lora_b.grad = None
        y = peft_model(xi)
        y.backward(dy)
        return y, {"dx": xi.grad, "dA": lora_a.grad, "dB": lora_b.grad}

    return step
