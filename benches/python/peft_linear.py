"""PyTorch + PEFT baseline for benches/lora_linear.rs, same shapes, same method.

For each (tokens, in, out, r): a frozen nn.Linear and the same layer wrapped by PEFT's
LoRA (r, lora_alpha = 2r, dropout 0), timed *alternately* in one loop (frozen, then LoRA),
forward+backward with the input requiring grad (so dx is computed, as in ours) and
forward alone under no_grad. Writes {"<op>/<shape>": {"ratio", "frozen_s", "lora_s"}}
(medians) to the path given as argv[1], and under "matmul" the median time of
torch.mm on each product of benches/gemm.rs ({"<m>x<n>x<k>[_xWt]": {"median_s"}}, CPU
runs only): PyTorch's own BLAS on this machine, next to our kernels in the GEMM table. Threads: torch.set_num_threads(os.cpu_count()).
With LORA_BENCH_DEVICE=cuda (the GPU bundle's run.sh) it runs the GPU shapes on the GPU,
synchronizing before each clock read.

Run by `cargo xtask bench` with the cached venv (torch 2.13.0 + peft).
"""

import json
import os
import statistics
import sys
import time

import peft
import torch

SHAPES = [(512, 4096, 4096, 16), (2048, 384, 384, 8), (2048, 384, 1536, 8)]
# Only without --quick (LORA_BENCH_QUICK unset): 4096 tokens through a 4096 -> 11008 MLP
# projection, as in 7B-class models.
LARGE = (4096, 4096, 11008, 16)


class One(torch.nn.Module):
    def __init__(self, inp, out):
        super().__init__()
        self.proj = torch.nn.Linear(inp, out)

    def forward(self, x):
        return self.proj(x)


# benches/gemm.rs's products (m, n, k, second operand stored [n, k] and read transposed, as
# a linear layer's forward reads its weight); the n = 32000 ones are skipped in --quick runs,
# as there.
GEMM_SHAPES = [
    (2048, 2048, 2048, False),
    (512, 4096, 4096, False),
    (2048, 384, 384, False),
    (2048, 16, 4096, False),
    (2048, 4096, 16, False),
    (16, 4096, 2048, False),
    (1024, 2816, 1024, True),
    (1024, 1024, 2816, False),
    (1024, 32000, 1024, True),
    (1024, 1024, 32000, False),
]

DEVICE = os.environ.get("LORA_BENCH_DEVICE", "cpu")
GPU_SHAPES = [(4096, 4096, 4096, 16), (4096, 4096, 11008, 16)]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def paired(frozen, lora, seconds):
    for _ in range(2):
        frozen()
        lora()
    ratios, fs, ls = [], [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(ratios) < 5:
        sync()
        t0 = time.perf_counter()
        frozen()
        sync()
        t1 = time.perf_counter()
        lora()
        sync()
        t2 = time.perf_counter()
        fs.append(t1 - t0)
        ls.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return {
        "ratio": statistics.median(ratios),
        "frozen_s": statistics.median(fs),
        "lora_s": statistics.median(ls),
    }


def matmul_medians(seconds, quick):
    """Median seconds of torch.mm into a preallocated output (as ours writes into one)."""
    out = {}
    for m, n, k, transposed in GEMM_SHAPES:
        if quick and n == 32000:
            continue
        a = torch.randn(m, k)
        b = torch.randn(n, k).t() if transposed else torch.randn(k, n)
        c = torch.empty(m, n)
        for _ in range(2):
            torch.mm(a, b, out=c)
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
        key = f"{m}x{n}x{k}" + ("_xWt" if transposed else "")
        out[key] = {"median_s": statistics.median(times)}
        print("torch.mm", key, out[key], flush=True)
    return out


def main():
    out_path = sys.argv[1]
    seconds = float(os.environ.get("LORA_BENCH_SECONDS", "5"))
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    results = {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads()}
    shapes = SHAPES + ([] if os.environ.get("LORA_BENCH_QUICK") else [LARGE])
    if DEVICE == "cuda":
        shapes = GPU_SHAPES
    for t, inp, out, r in shapes:
        shape = f"{t}x{inp}x{out}r{r}"
        frozen = One(inp, out).to(DEVICE)
        for p in frozen.parameters():
            p.requires_grad_(False)
        lora = peft.get_peft_model(
            One(inp, out), peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
        ).to(DEVICE)
        x = torch.randn(t, inp, device=DEVICE, requires_grad=True)
        dy = torch.randn(t, out, device=DEVICE)

        def fb(m):
            def run():
                x.grad = None
                m(x).backward(dy)
            return run

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        results[f"fwd_bwd/{shape}"] = paired(fb(frozen), fb(lora), seconds)
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

        def fb_step():
            opt.zero_grad()
            x.grad = None
            lora(x).backward(dy)
            opt.step()

        results[f"fwd_bwd_step/{shape}"] = paired(fb(frozen), fb_step, seconds)
        results[f"fwd/{shape}"] = paired(fwd(frozen), fwd(lora), seconds)
        print(shape, results[f"fwd_bwd/{shape}"], flush=True)
    if DEVICE == "cpu":
        quick = bool(os.environ.get("LORA_BENCH_QUICK"))
        results["matmul"] = matmul_medians(seconds / 3, quick)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
