"""PyTorch + PEFT baseline for benches/bert.rs: all-MiniLM-L6-v2 at batch 32 x 128 tokens.

* `encoder_fwd/32x128`: BertModel forward under no_grad, eval mode.
* `lora_train_step/32x128`: PEFT LoRA (r=8, alpha=16, query+value), mean pooling, a linear
  head, cross-entropy, backward, AdamW step (eval mode: no dropout, as ours).

Writes {"<op>/<shape>": {"median_s": ...}} to argv[2]; argv[1] is the model directory.
With `train-memory` as argv[2] it runs three training steps and nothing else, for a
peak-RSS measurement (`cargo xtask bench` runs it under GNU time, as it runs
benches/bin/bert_memory.rs). Threads: torch.set_num_threads(os.cpu_count()).
"""

import json
import os
import statistics
import sys
import time

import peft
import torch
import transformers

transformers.logging.disable_progress_bar()


def timed(fn, seconds, min_runs=5):
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    model_dir, out_path = sys.argv[1], sys.argv[2]
    seconds = float(os.environ.get("LORA_BENCH_SECONDS", "5"))
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    b, t = 32, 128
    ids = torch.randint(2000, 22000, (b, t))
    ids[:, 0] = 101
    mask = torch.ones(b, t, dtype=torch.long)
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    results = {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads()}

    def fwd():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    if out_path != "train-memory":
        results[f"encoder_fwd/{b}x{t}"] = {"median_s": timed(fwd, seconds)}

    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])).eval()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    labels = torch.arange(b) % 2
    params = [p for p in lora.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad()
        h = lora(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        opt.step()

    if out_path == "train-memory":
        for _ in range(3):
            step()
        return

    results[f"lora_train_step/{b}x{t}"] = {"median_s": timed(step, seconds * 2)}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
