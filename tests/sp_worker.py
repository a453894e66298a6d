"""Run under torchrun by tests/strategies/test_sequence_parallel.py: sequence-parallel training == one process, case
by case.

Every rank trains a copy with ``--sequence_parallel_size S`` under the real DDP or FSDP strategy (W / S data-parallel groups,
each on its share of the global batch) and, alongside, a reference copy on the whole global batch without any
splitting. Rank 0 prints one JSON line ``RESULT {case: {"loss": max |diff|, "weights": max |diff|, ...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from coati.config import LoraArgs, ModelArgs, StrategyArgs  # noqa: E402
from coati.data.batch import collate_pairs  # noqa: E402
from coati.data.packing import collate_packed  # noqa: E402
from coati.losses import log_sig_loss  # noqa: E402
from coati.models.backbones import get_backbone  # noqa: E402
from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain  # noqa: E402
from coati.models.loading import build_reward_model, load_tokenizer
from coati.models.reward_model import RewardModel  # noqa: E402
from coati.strategies import STRATEGIES  # noqa: E402
from coati.strategies.distributed import end_process  # noqa: E402
from helpers import make_pairs  # noqa: E402


def model_for(name: str, tokenizer, lora: int, checkpointing: bool = False) -> RewardModel:
    """A tiny reward model: the ``tiny`` preset, or ``llama3kv`` (6 query and 3 key/value heads, for S = 3);
    ``checkpointing``: activation recomputation on every block (the all-to-alls run again in backward)."""
    torch.manual_seed(0)
    if name != "llama3kv":
        return build_reward_model(ModelArgs(model=name, gradient_checkpointing=checkpointing),
                                  LoraArgs(lora_rank=lora, lora_alpha=2.0 * lora), tokenizer)
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    return RewardModel(LlamaForSequenceClassification(config), get_backbone("llama"))


def run_case(strategy, tokenizer, name: str, layout: str, lora: int, checkpointing: bool = False,
             steps: int = 3) -> dict:
    """Train ``steps`` steps both ways; max differences of the global loss and of every trainable weight."""
    model = model_for(name, tokenizer, lora, checkpointing)
    reference = model_for(name, tokenizer, lora)  # same seed, same weights
    model.sequence_parallel = strategy.sequence_parallel
    # SGD: the weights move by the gradients themselves (Adam would blow rounding-level gradients up to +-lr).
    # Gemma 3 scales its embeddings by sqrt(hidden): 3-4x larger gradients, and at lr 0.5 each step multiplied the
    # rounding-level gap 10-1000x (3e-7, 5e-6, 9e-3 over 3 LoRA steps, S = 2); a step of the same size needs 0.1
    lr = 0.1 if name == "gemma3" else 0.5
    wrapped, opt = strategy.prepare(model, lambda ps: torch.optim.SGD(ps, lr=lr))
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=lr)
    if layout == "padded":
        collate = lambda items: collate_pairs(items, tokenizer.pad_token_id)  # noqa: E731
    else:
        collate = lambda items: collate_packed(items, tokenizer.pad_token_id, 0, layout == "shared")  # noqa: E731
    per_group, worst_loss, odd_rows = 3, 0.0, 0
    for step in range(steps):
        pairs = make_pairs(seed=10 + step, n=per_group * strategy.data_world_size, prompt=True)
        mine = pairs[strategy.data_rank * per_group:(strategy.data_rank + 1) * per_group]
        batch = collate(mine)
        odd_rows += int(batch.inputs["input_ids"].shape[1] % strategy.sp_size != 0)
        rewards = wrapped(**batch.inputs)
        loss = log_sig_loss(rewards[:per_group], rewards[per_group:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_rewards = reference(**collate(pairs).inputs)
        n = len(pairs)
        ref_loss = log_sig_loss(ref_rewards[:n], ref_rewards[n:])
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        total = strategy.reduce_data(loss.detach().reshape(1).clone())
        worst_loss = max(worst_loss, abs(total.item() / strategy.data_world_size - ref_loss.item()))
    trained = {n: t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: DTensor shards
               for n, t in strategy.unwrap(wrapped).named_parameters()}
    worst_weight = max((trained[n] - p).abs().max().item() for n, p in reference.named_parameters() if p.requires_grad)
    return {"loss": worst_loss, "weights": worst_weight, "odd_rows": odd_rows}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sp", type=int, required=True)
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--cases", nargs="+", required=True,
                   help="name:layout:lora[:gc], layout = shared|unshared|padded, gc = activation recomputation")
    args = p.parse_args()
    strategy = STRATEGIES[args.strategy](StrategyArgs(strategy=args.strategy, sequence_parallel_size=args.sp))
    strategy.setup()
    tokenizer = load_tokenizer(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
    results = {}
    for case in args.cases:
        name, layout, lora, *gc = case.split(":")
        results[case] = run_case(strategy, tokenizer, name, layout, int(lora), gc == ["gc"])
    if strategy.is_main:
        print("RESULT " + json.dumps(results), flush=True)
    strategy.teardown(keep_process_group=True)  # and end_process skips the teardown that can deadlock on gloo
    return end_process(0)


if __name__ == "__main__":
    sys.exit(main())
