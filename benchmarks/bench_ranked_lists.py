"""Ranked lists: one packed group per prompt against the same comparisons expanded into pairs (coati, TRL).

oaast-rm-zh ranks K answers per prompt (K = 2..), i.e. C(K, 2) comparisons. Three ways to train on exactly the
same comparisons, the same model (SmolLM2-135M, same init, bf16 autocast, AdamW, full fine-tuning):

- ``coati_lists``: coati's ranked-list path, one packed group ``[P | R1 | ... | RK]`` per prompt (the prompt and
  each answer computed once), the loss over all ordered pairs of the list weighted per pair
  (``list_weighting="pair"``: the plain mean over comparisons, the same number the expanded modes compute);
- ``coati_pairs``: the lists expanded into their C(K, 2) pairs, each packed with prefix sharing (the prompt computed
  once per pair, each answer once per pair it is in): what coati did before ranked lists;
- ``trl``: the same expanded pairs through TRL 1.16's ``RewardTrainer`` (padded, prompt once per sequence, its
  default gradient checkpointing).

Each mode runs in its own child process (clean peak RSS) for ``--warmup`` + ``--steps`` optimizer steps of
``--prompts`` prompts each (the expanded modes get those prompts' comparisons as one batch, in the same order).
Reported: tokens computed (over the lists that fit ``--max_len``, over all lists, and over the timed steps),
comparisons per second, peak RSS, and each mode's first-step loss (equal up to bf16 rounding: the same comparisons,
the same init). coati runs without gradient checkpointing (its default), TRL with it (its default).

    python benchmarks/bench_ranked_lists.py --json benchmarks/results_ranked_lists.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("coati_lists", "coati_pairs", "trl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrain", default="smollm2-135m")
    p.add_argument("--dataset", default="oaast-rm-zh")
    p.add_argument("--max_len", type=int, default=512,
                   help="lists with an answer sequence longer than this are left out")
    p.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before timing")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_setup(args):
    """Tokenizer, the tokenized ranked lists that fit ``max_len``, their expanded pairs per list, a model factory."""
    from coati.data.formats import PreferencePair, ordered_pairs
    from coati.data.sources import default_data_dir, load_pairs
    from coati.data.template import SequenceEncoder, tokenize_pairs, use_chat_template
    from coati.models.backbones import get_backbone
    from coati.models.cache import resolve_pretrain
    from coati.models.loading import build_model, load_tokenizer

    tokenizer = load_tokenizer(resolve_pretrain(args.pretrain, with_model=False))
    lists, _ = load_pairs([args.dataset], default_data_dir(), None, seed=args.seed)
    encoder = SequenceEncoder(tokenizer, max_len=10 ** 9)  # no truncation: keep only what fits below
    chat = use_chat_template(tokenizer, "auto")
    tokenized, _ = tokenize_pairs(lists, encoder, chat)
    keep = [i for i, t in enumerate(tokenized) if max(map(len, t.sequences)) <= args.max_len]
    lists, tokenized = [lists[i] for i in keep], [tokenized[i] for i in keep]
    expanded = []  # per list, its comparisons as pairs (winner, loser), tokenized the same way
    for pair in lists:
        answers = pair.responses
        rows = [PreferencePair(pair.prompt, answers[i], answers[j]) for i, j in
                ordered_pairs(len(answers), pair.scores)]
        expanded.append(tokenize_pairs(rows, encoder, chat)[0])
    backbone = get_backbone("llama")

    def make_model():
        torch.manual_seed(args.seed)
        return build_model(backbone, tokenizer, args.pretrain, "135m")

    return tokenizer, tokenized, expanded, backbone, make_model


def plan(args, n: int) -> list[list[int]]:
    """``warmup + steps`` batches of ``--prompts`` list indices in one fixed shuffled order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    need = args.prompts * (args.warmup + args.steps)
    if need > n:
        raise SystemExit(f"only {n} lists fit --max_len; lower --steps or --prompts")
    return [order[i * args.prompts:(i + 1) * args.prompts] for i in range(args.warmup + args.steps)]


def dataset_tokens(tokenizer, tokenized, expanded) -> dict:
    """Token positions each way computes for the whole dataset (one pass, no model)."""
    from coati.data.packing import collate_packed

    pad = tokenizer.pad_token_id
    lists = sum(collate_packed([t], pad).computed_tokens for t in tokenized)
    pairs = sum(collate_packed([p], pad).computed_tokens for e in expanded for p in e)
    padded = sum(len(p.chosen_ids) + len(p.rejected_ids) for e in expanded for p in e)
    return {"lists": len(tokenized), "comparisons": sum(map(len, expanded)),
            "answers": sum(len(t.sequences) for t in tokenized), "tokens_lists": lists,
            "tokens_pairs_shared_prompt": pairs, "tokens_pairs_unshared": padded,
            "ratio_pairs_over_lists": pairs / lists, "ratio_unshared_over_lists": padded / lists}


def run_coati(args, mode: str) -> dict:
    from coati.data.packing import collate_packed
    from coati.losses import get_loss
    from coati.models.reward_model import RewardModel

    tokenizer, tokenized, expanded, backbone, make_model = load_setup(args)
    model = RewardModel(make_model(), backbone).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    loss_fn = get_loss("log_sig")
    computed = comparisons = 0
    first_loss = None
    t0 = None
    for step, idx in enumerate(plan(args, len(tokenized))):
        if step == args.warmup:
            t0 = time.perf_counter()
        items = [tokenized[i] for i in idx] if mode == "coati_lists" else [p for i in idx for p in expanded[i]]
        batch = collate_packed(items, tokenizer.pad_token_id, 0, share_prefix=True, list_weighting="pair")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rewards = model(**batch.inputs)
        pairs = batch.pairs
        weight = None if batch.weight is None else batch.weight
        loss = loss_fn(rewards[pairs[:, 0]], rewards[pairs[:, 1]], None, weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        first_loss = loss.item() if first_loss is None else first_loss
        if step >= args.warmup:
            computed += batch.computed_tokens
            comparisons += len(pairs)
    return finish(time.perf_counter() - t0, computed, comparisons, first_loss)


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    tokenizer, tokenized, expanded, _, make_model = load_setup(args)
    steps = plan(args, len(tokenized))
    batches = [[p for i in idx for p in expanded[i]] for idx in steps]
    # TRL's batch size is fixed: the same comparisons, in the same order, in batches of the coati steps' mean size
    # (so the step boundaries differ a little); the counts reported are those of TRL's own timed batches.
    size = round(sum(map(len, batches)) / len(batches))
    rows = [p for b in batches for p in b]
    data = Dataset.from_dict({"chosen_ids": [p.chosen_ids for p in rows],
                              "rejected_ids": [p.rejected_ids for p in rows]})
    n_steps = len(rows) // size
    timed = [rows[i * size:(i + 1) * size] for i in range(args.warmup, n_steps)]
    computed = sum(2 * len(b) * max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in b) for b in timed)
    clock, losses = {}, []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                clock["t0"] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(output_dir=out, per_device_train_batch_size=size, max_steps=n_steps,
                              learning_rate=args.lr, lr_scheduler_type="constant", bf16=True, use_cpu=True,
                              logging_steps=1, report_to=[], save_strategy="no", max_length=None,
                              dataloader_num_workers=0, seed=args.seed, max_grad_norm=1.0, disable_dropout=True)
        # gradient checkpointing stays at TRL's default (on): without it TRL's padded batches of these lists
        # (~20 pairs of up to 512 tokens) passed 17 GB and were stopped before this 24 GB machine ran out
        trainer = RewardTrainer(model=make_model(), args=config, train_dataset=data, processing_class=tokenizer,
                                callbacks=[Clock()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
        trainer.train()
        elapsed = time.perf_counter() - clock["t0"]
    return finish(elapsed, computed, sum(map(len, timed)), losses[0] if losses else None, batch_size=size)


def finish(elapsed: float, computed: int, comparisons: int, first_loss, **extra) -> dict:
    return {"seconds": elapsed, "comparisons": comparisons, "comparisons_per_s": comparisons / elapsed,
            "computed_tokens": computed, "computed_tokens_per_comparison": computed / comparisons,
            "first_step_loss": first_loss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **extra}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_trl(args) if args.child == "trl" else run_coati(args, args.child)
        print("RESULT " + json.dumps(result))
        return 0
    tokenizer, tokenized, expanded, _, _ = load_setup(args)
    everything = argparse.Namespace(**{**vars(args), "max_len": 10 ** 9})
    results = {"settings": vars(args), "dataset_tokens": dataset_tokens(tokenizer, tokenized, expanded),
               "dataset_tokens_all_lists": dataset_tokens(*load_setup(everything)[:3]),
               "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                            if line.startswith("model name")), "?"), "modes": {}}
    print(json.dumps(results["dataset_tokens"]), json.dumps(results["dataset_tokens_all_lists"]))
    for mode in args.modes:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            results["modes"][mode] = {"error": f"exit {proc.returncode}"}
            continue
        results["modes"][mode] = r = json.loads(line[7:])
        print(f"{mode:12s} {r['comparisons_per_s']:6.2f} comparisons/s  {r['computed_tokens_per_comparison']:7.1f} "
              f"tokens/comparison  peak RSS {r['peak_rss_mb']:6.0f} MB  first-step loss {r['first_step_loss']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
