"""Quality of training on all ranks: oaast-rm-zh with its top-2 answers only (what pair-only tools use) against all
its ranked answers, the same optimizer steps on the same prompts, held-out accuracy on Chinese comparisons.

The ranked lists are split by content hash (``coati.data.sources.split_eval`` on the full lists, so both runs hold
out the same prompts). Two training files are written: ``top2.jsonl`` (each list cut to its two best answers: one
pair per prompt) and ``all.jsonl`` (every answer, ``ranked_list`` rows); both runs use the same settings (the main
job's: SmolLM2-135M + LoRA rank 16, lr 2e-4, bf16, batch 4 prompts, max_len 256, one epoch = the same steps and the
same prompts per step; ``--max_steps`` shortens both alike). Both exports are evaluated by ``coati.evaluate`` on the
held-out lists with all their comparisons (acc over every ordered pair, and top-1), and on the first ``--zh_pairs``
pairs of dpo-zh-demo (Chinese pairs from another source).

    python benchmarks/bench_ranked_quality.py --json benchmarks/results_ranked_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heldout", type=float, default=0.15, help="share of the lists held out")
    p.add_argument("--zh_pairs", type=int, default=200, help="dpo-zh-demo pairs for the second evaluation")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps of both runs (default: one epoch)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _row(pair, k: int | None = None) -> dict:
    answers = pair.responses[:k] if k else pair.responses
    scores = pair.scores[:len(answers)] if pair.scores is not None else None
    return {"prompt": pair.prompt, "responses": answers,
            **({"scores": scores} if scores is not None else {"ranking": list(range(1, len(answers) + 1))})}


def main(argv=None) -> int:
    args = parse_args(argv)
    from coati.data.formats import ordered_pairs
    from coati.data.sources import default_data_dir, load_pairs, split_eval
    from coati.io import dumps

    folder = args.workdir or tempfile.mkdtemp(prefix="bench-ranked-quality-")
    os.makedirs(folder, exist_ok=True)
    lists, _ = load_pairs(["oaast-rm-zh"], default_data_dir(), None, seed=0)
    train, held = split_eval(lists, args.heldout)
    files = {}
    for name, rows in (("top2", [_row(p, 2) for p in train]), ("all", [_row(p) for p in train]),
                       ("heldout", [_row(p) for p in held])):
        files[name] = os.path.join(folder, f"{name}.jsonl")
        with open(files[name], "w", encoding="utf-8") as f:
            f.writelines(dumps(r) + "\n" for r in rows)
    counts = {"train_prompts": len(train), "heldout_prompts": len(held), "train_comparisons_top2": len(train),
              "train_comparisons_all": sum(len(ordered_pairs(len(p.responses), p.scores)) for p in train)}
    results = {"settings": vars(args), "data": counts, "cpu": next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")}
    print(json.dumps(counts), flush=True)
    env = dict(os.environ, PYTHONPATH=REPO)
    for name in ("top2", "all"):
        out = os.path.join(folder, f"rm-{name}")
        cmd = [sys.executable, os.path.join(REPO, "train_reward_model.py"), "--pretrain", "smollm2-135m",
               "--dataset", files[name], "--lora_rank", "16", "--lora_alpha", "32", "--lr", "2e-4",
               "--mixed_precision", "bf16", "--batch_size", "4", "--max_len", "256", "--max_epochs", "1",
               "--log_every", "20", "--disable_tqdm", "--save_path", out,
               *(["--max_steps", str(args.max_steps)] if args.max_steps else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode:
            raise RuntimeError(f"training {name} exited {proc.returncode}: {proc.stderr[-3000:]}")
        summary = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
        r = results[name] = {"steps": summary["steps"], "train_seconds": summary["train_seconds"]}
        for ev, spec in (("heldout_oaast", [files["heldout"]]),
                         ("dpo_zh_demo", ["dpo-zh-demo", "--max_samples", str(args.zh_pairs)])):
            eval_dir = os.path.join(folder, f"eval-{name}-{ev}")
            proc = subprocess.run([sys.executable, "-m", "coati.evaluate", "--model_path", out, "--dataset", *spec,
                                   "--output_dir", eval_dir, "--disable_tqdm", "--device", "cpu"],
                                  capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode:
                raise RuntimeError(f"evaluating {name} on {ev} exited {proc.returncode}: {proc.stderr[-3000:]}")
            rep = json.load(open(os.path.join(eval_dir, "report.json"), encoding="utf-8"))
            r[ev] = {"comparisons": rep["pairs"], "acc": rep["acc"], "dist": rep["dist"], "top1": rep.get("top1"),
                     "prompts": rep.get("prompts")}
        print(f"{name}: {r['steps']} steps in {r['train_seconds']:.0f} s; held-out oaast acc "
              f"{r['heldout_oaast']['acc']:.3f} over {r['heldout_oaast']['comparisons']} comparisons, top1 "
              f"{r['heldout_oaast']['top1']}; dpo-zh-demo acc {r['dpo_zh_demo']['acc']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
