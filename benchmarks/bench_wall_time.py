"""Equal wall time: coati and TRL's RewardTrainer, each with its own defaults, train SmolLM2-135M for the same number
of minutes on the same stream of real English and Chinese pairs; both exports are then scored by ``coati.evaluate``
on the same held-out pairs.

The pairs are the main job's (``examples/rm_bilingual.yaml``: hh-rlhf, dpo-en-demo, oaast-rm-zh, dpo-zh-demo,
medical-dpo-zh, at most ``--max_samples`` per dataset, ``--eval_split`` held out by content hash, oaast's lists cut
to their top 2 answers so both tools see pairs). They are written once as JSONL (``prompt`` messages, ``chosen``,
``rejected``); coati reads the file, TRL gets the same rows as conversational ``prompt`` / ``chosen`` / ``rejected``
messages. Each tool runs in its own process with its defaults, except the epoch count (3, TRL's default, for both,
so that neither runs out of data before the budget) and the budget itself:

- coati: ``train_reward_model.py --pretrain smollm2-135m --dataset train.jsonl --max_epochs 3 --max_train_minutes
  M`` with coati's defaults (see docs/defaults.md, "Defaults and why": precision and learning rate resolved for the
  run, batch 4, cosine schedule with a capped warm-up, max_len 512 with truncation, packing with prefix sharing);
- coati-gemma3: the same with ``--pretrain gemma3-270m --model auto`` (Gemma 3 270M, multilingual tokenizer);
- ``--variant NAME="flags"``: another coati run, its defaults plus those flags (e.g. another ``--lr``);
- TRL 1.16: ``RewardTrainer`` with ``RewardConfig`` defaults (bf16, batch 8, lr 1e-4, linear schedule, gradient
  checkpointing, max_length 1024: longer pairs are dropped) and a callback that ends training once ``M`` minutes of
  training have passed; then ``save_model``. ``--trl_fp32`` turns its bf16 off, for a CPU that emulates bf16 (AVX2
  only: a bf16 matrix product runs about 100x slower than fp32 there, so TRL's default would hardly train).

Reported per tool: optimizer steps, pairs trained, training seconds, and ``coati.evaluate``'s held-out acc overall
and per language (the TRL export is read with ``--layout auto``, i.e. its chat template, as TRL trained it), with
the length-bias figures (reward-length Pearson and Spearman, acc on the pairs whose chosen answer is the shorter
one); ``--also_eval SPEC`` scores every export on more data the same way (e.g. ``ultrafeedback-eval``, never
trained on).

    python benchmarks/bench_wall_time.py --minutes 10 --json benchmarks/results_wall_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DATASETS = ["hh-rlhf", "dpo-en-demo", "oaast-rm-zh", "dpo-zh-demo", "medical-dpo-zh"]
#: coati runs: tool name -> the backbone flags (everything else coati's defaults)
COATI_TOOLS = {"coati": ["--pretrain", "smollm2-135m"],
               "coati-gemma3": ["--pretrain", "gemma3-270m", "--model", "auto"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training-time budget of each tool")
    p.add_argument("--max_samples", type=int, default=700, help="pairs per dataset (the main job's)")
    p.add_argument("--eval_split", type=float, default=0.18, help="share held out (the main job's)")
    p.add_argument("--epochs", type=int, default=3, help="epochs planned by both (TRL's default)")
    p.add_argument("--tools", nargs="+", default=["coati", "trl"],
                   help=f"tools run in this order: {', '.join(COATI_TOOLS)}, trl, or a --variant's name")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="another coati run: NAME=\"flags\" (e.g. coati-lr1e-4=\"--pretrain smollm2-135m --lr 1e-4\")")
    p.add_argument("--trl_fp32", action="store_true",
                   help="TRL in fp32 instead of its bf16 default (for CPUs that emulate bf16; reported as such)")
    p.add_argument("--also_eval", action="append", default=[], metavar="SPEC",
                   help="also evaluate every export on this dataset spec (named dataset or file), e.g. a held-out "
                        "UltraFeedback file")
    p.add_argument("--workdir", default=None, help="where data and exports go (default: a temporary folder)")
    p.add_argument("--json", default=None)
    p.add_argument("--trl_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.coati_tools = dict(COATI_TOOLS)
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name or name == "trl" or name in COATI_TOOLS:
            p.error(f"--variant {v!r}: expected NAME=FLAGS with a new NAME")
        args.coati_tools[name] = flags.split()
    unknown = [t for t in args.tools if t != "trl" and t not in args.coati_tools]
    if unknown:
        p.error(f"--tools: unknown {', '.join(unknown)} (known: {', '.join(args.coati_tools)}, trl)")
    return args


def write_data(args, folder: str) -> tuple[str, str, dict]:
    """train.jsonl and heldout.jsonl from the main job's selection; returns their paths and counts."""
    from coati.data.sources import default_data_dir, select_pairs
    from coati.io import dumps

    sel = select_pairs(DATASETS, default_data_dir(), args.max_samples, False, 0, None, None, args.eval_split, 2)
    paths = {}
    for name, pairs in (("train", sel.train), ("heldout", sel.eval)):
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    langs = {}
    for p in sel.eval:
        langs[p.lang] = langs.get(p.lang, 0) + 1
    return paths["train"], paths["heldout"], {"train_pairs": len(sel.train), "heldout_pairs": len(sel.eval),
                                              "heldout_languages": langs}


def run_trl(train: str, out: str, minutes: float, epochs: int, fp32: bool = False) -> dict:
    """TRL's RewardTrainer with its defaults on the rows of ``train``, stopped after ``minutes`` of training
    (``fp32``: bf16 off, the only change)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from coati.models.backbones import get_backbone
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import build_model

    rows = []
    with open(train, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrain(SMOLLM2_ALIAS, with_model=False))
    torch.manual_seed(0)
    model = build_model(get_backbone("llama"), tokenizer if tokenizer.pad_token else _with_pad(tokenizer),
                        SMOLLM2_ALIAS, "135m")
    clock = {}

    class Budget(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if time.perf_counter() - clock["t0"] >= 60 * minutes:
                control.should_training_stop = True

    config = RewardConfig(output_dir=out, num_train_epochs=epochs, report_to=[], save_strategy="no",
                          use_cpu=True, logging_steps=50, dataloader_num_workers=0, seed=0,
                          **({"bf16": False} if fp32 else {}))
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[Budget()])
    trainer.train()
    seconds = time.perf_counter() - clock["t0"]
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    steps = trainer.state.global_step
    return {"steps": steps, "pairs_trained": steps * config.per_device_train_batch_size, "train_seconds": seconds,
            "planned_steps": trainer.state.max_steps, "dataset_rows": len(trainer.train_dataset),
            "bf16": config.bf16, "lr": config.learning_rate, "batch_size": config.per_device_train_batch_size}


def _with_pad(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_coati(train: str, out: str, minutes: float, epochs: int, backbone: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "train_reward_model.py"), *backbone, "--dataset",
           train, "--max_epochs", str(epochs), "--max_train_minutes", str(minutes), "--save_path", out,
           "--disable_tqdm", "--log_every", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"coati exited {proc.returncode}: {proc.stderr[-3000:]}")
    s = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
    cfg = json.load(open(os.path.join(out, "train_config.json"), encoding="utf-8"))
    return {"steps": s["steps"], "pairs_trained": s["steps"] * cfg["batch_size"], "train_seconds": s["train_seconds"],
            "planned_steps": s["total_steps"], "stopped_by_time": s["stopped_by_time"],
            "mixed_precision": cfg["mixed_precision"], "lr": cfg["lr"], "batch_size": cfg["batch_size"],
            "warmup_steps": cfg.get("warmup_steps"), "model": cfg["model"], "pretrain": cfg["pretrain"],
            "truncation": s["truncation"]}


def _bias(block: dict) -> dict:
    b = block.get("length_bias") or {}
    return {k: b.get(k) for k in ("pearson", "spearman", "acc_chosen_shorter", "pairs_chosen_shorter",
                                  "acc_chosen_longer", "longer_wins_acc")}


def evaluate(model: str, heldout: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "coati.evaluate", "--model_path", model, "--dataset", heldout, "--output_dir", out,
           "--disable_tqdm", "--device", "cpu", "--data_dir", os.environ.get("COATI_DATA_DIR", "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"coati.evaluate exited {proc.returncode}: {proc.stderr[-3000:]}")
    report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    return {"pairs": report["pairs"], "acc": report["acc"], "dist": report["dist"], "ece": report["ece"],
            "length_bias": _bias(report),
            "languages": {k: {"pairs": v["pairs"], "acc": v["acc"], "length_bias": _bias(v)}
                          for k, v in report["languages"].items()},
            "eval_seconds": report["seconds"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_child:
        train, out, minutes = args.trl_child
        print("RESULT " + json.dumps(run_trl(train, out, float(minutes), args.epochs, args.trl_fp32)), flush=True)
        return 0
    folder = args.workdir or tempfile.mkdtemp(prefix="bench-wall-")
    os.makedirs(folder, exist_ok=True)
    train, heldout, counts = write_data(args, folder)
    settings = {k: v for k, v in vars(args).items() if k not in ("trl_child", "coati_tools")}
    results = {"settings": settings, "data": counts,
               "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                            if line.startswith("model name")), "?")}
    print(json.dumps(counts), flush=True)
    for tool in args.tools:
        out = os.path.join(folder, tool)
        if tool != "trl":
            r = run_coati(train, out, args.minutes, args.epochs, args.coati_tools[tool])
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--epochs", str(args.epochs), "--trl_child", train, out,
                   str(args.minutes), *(["--trl_fp32"] if args.trl_fp32 else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"TRL exited {proc.returncode}: {proc.stderr[-3000:]}")
            r = json.loads(line[7:])
        r["heldout"] = evaluate(out, heldout, os.path.join(folder, f"eval-{tool}"))
        for k, spec in enumerate(args.also_eval):
            r.setdefault("also_eval", {})[spec] = evaluate(out, spec, os.path.join(folder, f"eval-{tool}-{k}"))
        results[tool] = r
        langs = ", ".join(f"{k} {v['acc']:.3f} ({v['pairs']})" for k, v in r["heldout"]["languages"].items())
        bias = r["heldout"]["length_bias"]
        print(f"{tool}: {r['steps']} steps, {r['pairs_trained']} pairs in {r['train_seconds']:.0f} s; held-out acc "
              f"{r['heldout']['acc']:.3f} ({langs}); reward-length Pearson {bias['pearson']}, acc when the chosen "
              f"answer is shorter {bias['acc_chosen_shorter']}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
