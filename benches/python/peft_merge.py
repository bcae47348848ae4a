"""PyTorch + PEFT side of the merge benchmark (`cargo xtask bench`).

    peft_merge.py make-adapter MODEL_DIR ADAPTER_DIR   # a PEFT adapter for the model
    peft_merge.py merge MODEL_DIR ADAPTER_DIR OUT_DIR  # what a PEFT user runs to merge

`merge` is timed end to end by the caller (process start to exit, imports included, as
for `lora merge`): BertModel.from_pretrained, PeftModel.from_pretrained, merge_and_unload,
save_pretrained (safetensors).
"""

import sys


def make_adapter(model_dir, adapter_dir):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel.from_pretrained(model_dir)
    cfg = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["query", "key", "value", "dense"],
        init_lora_weights=False,
    )
    peft.get_peft_model(model, cfg).save_pretrained(adapter_dir)


def merge(model_dir, adapter_dir, out_dir):
    import peft
    import transformers

    model = transformers.BertModel.from_pretrained(model_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)


if __name__ == "__main__":
    if sys.argv[1] == "make-adapter":
        make_adapter(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "merge":
        merge(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
