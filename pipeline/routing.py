"""Which expert each skill's tokens go to: measured after every MoE build and training run.

The shares land in metrics/routing/<kind>/<name>.json and the report plots them.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPERT_NAMES = "moe_experts.json"  # in a MoE folder: which source each expert index came from


def routing_fractions(model_dir: Path, eval_dir: Path, limit: int = 64) -> dict[str, list[list[float]]]:
    """Skill -> [layer][expert]: share of the skill's question tokens (routed k times each) per expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    k = model.config.num_experts_per_tok
    fractions: dict[str, list[list[float]]] = {}
    for path in sorted(eval_dir.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()[:limit]]
        questions = [row["question"] for row in rows if "question" in row]
        if not questions:
            continue
        counts = None
        for question in questions:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)  # fmt: skip
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                logits = model(**ids, output_router_logits=True).router_logits  # per layer: (tokens, experts)
            chosen = torch.stack([layer.topk(k, dim=-1).indices for layer in logits])  # (layers, tokens, k)
            hits = torch.nn.functional.one_hot(chosen, logits[0].shape[-1]).sum(dim=(1, 2)).float()
            counts = hits if counts is None else counts + hits
        shares = counts / counts.sum(dim=-1, keepdim=True)
        fractions[path.stem] = [[round(share, 4) for share in row] for row in shares.tolist()]
    return fractions


def routing_metrics(model_dir: Path, eval_dir: Path, built: Path | None = None) -> dict:
    """The routing JSON of a MoE folder: its experts' names and each skill's shares.

    built: the mergekit-moe folder that names the experts, when model_dir is a trained copy of it.
    """
    names = json.loads(((built or model_dir) / EXPERT_NAMES).read_text())
    return {"experts": names, "skills": routing_fractions(model_dir, eval_dir)}
