"""PyTorch + PEFT baseline for benches/decoder.rs: the same random Llama shapes, the same
workloads. A LoRA training step (r=16 on every linear layer but lm_head, forward with
labels, backward, AdamW) at batch 4 x 256 tokens, and greedy generation of 32 tokens after
a 16-token prompt (transformers' `generate`, KV cache). Medians over timed repetitions
after a warm-up.

Writes {"train_step/<shape>": {"median_s"}, "generate/<shape>": {"median_s"}} to argv[1].
`LORA_BENCH_QUICK` selects the smaller model, as in the Rust bench. With `train-memory`
as argv[1] it runs three training steps and nothing else, for a peak-RSS measurement
(`cargo xtask bench` runs it under GNU time, as it runs benches/bin/decoder_memory.rs).
"""

import json
import os
import statistics
import sys
import time

import peft
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

transformers.logging.set_verbosity_error()
BATCH, SEQ = 4, 256


def dims():
    if os.environ.get("LORA_BENCH_QUICK"):
        return 512, 8, 8, 4, 1408, 8000
    return 1024, 8, 16, 4, 2816, 32000


def timed(fn, seconds):
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup():
    """The random Llama with LoRA on every projection, its optimizer, a batch and a step."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    h, layers, heads, kv, inter, vocab = dims()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
    model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(4, vocab, (BATCH, SEQ))

    def step():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    return model, ids, step


def main(out_path):
    if out_path == "train-memory":
        step = setup()[2]
        for _ in range(3):
            step()
        return
    seconds = float(os.environ.get("LORA_BENCH_SECONDS", "5"))
    h, layers, _, _, _, vocab = dims()
    shape = f"h{h}-l{layers}-v{vocab}-{BATCH}x{SEQ}"
    model, ids, step = setup()
    results = {"torch": torch.__version__, "peft": peft.__version__}
    results[f"train_step/{shape}"] = {"median_s": timed(step, seconds)}
    model.eval()
    prompt = ids[:1, :16]

    def gen():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    results[f"generate/{shape}"] = {"median_s": timed(gen, seconds)}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
