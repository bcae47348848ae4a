"""bitsandbytes + PEFT baseline for benches/quant.rs, same shapes, same method.

* `qlora_fwd_bwd/512x4096x4096r16`: PEFT LoRA (r=16, alpha=32) on a bitsandbytes
  Linear4bit (NF4, double quantization, f32 compute) against PEFT LoRA on the f32
  nn.Linear, timed alternately in one loop (f32 first), forward+backward with dx.
* `dequantize_nf4/4096x4096`: bitsandbytes' dequantize_4bit against a copy of the same f32
  output (torch `copy_`).

Writes {"<op>/<shape>": {"ratio", "frozen_s", "lora_s"}} (medians; "frozen" is the
baseline) to argv[1]. Run by `cargo xtask bench` with the cached venv.
"""

import json
import logging
import os
import statistics
import sys
import time

import bitsandbytes as bnb
import bitsandbytes.functional as F
import peft
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class One(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def paired(base, measured, seconds):
    for _ in range(2):
        base()
        measured()
    ratios, bs, ms = [], [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(ratios) < 5:
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        measured()
        t2 = time.perf_counter()
        bs.append(t1 - t0)
        ms.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return {"ratio": statistics.median(ratios), "frozen_s": statistics.median(bs), "lora_s": statistics.median(ms)}


def main():
    out_path = sys.argv[1]
    seconds = float(os.environ.get("LORA_BENCH_SECONDS", "5"))
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    results = {"torch": torch.__version__, "bitsandbytes": bnb.__version__, "peft": peft.__version__}

    t, inp, out, r = 512, 4096, 4096, 16
    dense = torch.nn.Linear(inp, out)
    q = bnb.nn.Linear4bit(inp, out, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")
    if not getattr(q.weight, "bnb_quantized", False):
        q.weight = q.weight._quantize("cpu")
    cfg = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
    f32_lora = peft.get_peft_model(One(dense), peft.LoraConfig(**cfg))
    q_lora = peft.get_peft_model(One(q), peft.LoraConfig(**cfg))
    x = torch.randn(t, inp, requires_grad=True)
    dy = torch.randn(t, out)

    def fb(m):
        def run():
            x.grad = None
            m(x).backward(dy)
        return run

    results[f"qlora_fwd_bwd/{t}x{inp}x{out}r{r}"] = paired(fb(f32_lora), fb(q_lora), seconds)

    w = torch.randn(out, inp)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    dst = torch.empty(out, inp)
    src = torch.ones(out, inp)
    results[f"dequantize_nf4/{out}x{inp}"] = paired(
        lambda: dst.copy_(src), lambda: F.dequantize_4bit(packed, state), seconds
    )
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
