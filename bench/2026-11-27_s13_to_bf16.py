"""Copy a float32 head folder as bf16 (device returns files <16 MiB), recording the init head's training history."""

import json
import sys

import torch

sys.path.insert(0, ".")
import model as M  # noqa: E402
from draft import load_head, save_head  # noqa: E402

src, dst, init = sys.argv[1:4]
cfg = json.load(open(f"{src}/config.json"))
prev = json.load(open(f"{init}/config.json"))
head = load_head(src, M.ModelArgs.from_json("checkpoints/SmolLM2-135M-Instruct/config.json"), dtype=torch.bfloat16)
extra = {k: v for k, v in cfg.items() if k not in ("args", "fc_bias")}
extra["previous_training"] = [*prev.get("previous_training", []), prev["training"]]
save_head(head, dst, extra)
print("saved", dst)
