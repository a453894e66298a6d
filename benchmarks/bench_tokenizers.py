"""Tokens per character and sequence lengths of the main job's pairs under each backbone's tokenizer.

For each ``--pretrain`` (aliases or folders) the main job's pairs (``examples/rm_bilingual.yaml``: its datasets,
``max_samples`` per dataset and held-out split; training and held-out pairs together) are rendered exactly as the
trainer renders them (the tokenizer's chat template when it has one, else the hh-rlhf layout) and tokenized without
truncation. Reported per language:

- tokens per character of the answers (answer tokens / answer characters), and of prompt + answer;
- the full length of each scored sequence (BOS if the tokenizer adds one, prompt, answer, reward token) as the
  median and 90th percentile of each pair's longer sequence;
- the share of pairs whose longer sequence exceeds each ``--max_len`` (those the trainer cuts: it keeps the end of
  the prompt and, when the answer alone does not fit, the start of the answer).

Only the tokenizers load (a GGUF alias is converted once into the model cache; Gemma 3's takes about half a minute).

    COATI_DATA_DIR=../shared/data python benchmarks/bench_tokenizers.py --json tokens.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrain", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--config", default=os.path.join(REPO, "examples", "rm_bilingual.yaml"),
                   help="recipe whose dataset, max_samples, eval_split and max_responses select the pairs")
    p.add_argument("--max_len", nargs="+", type=int, default=[256, 512, 1024])
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(pretrain: str, pairs: list, max_lens: list[int]) -> dict:
    """Token counts of ``pairs`` (:class:`~coati.data.formats.PreferencePair`) under ``pretrain``'s tokenizer."""
    from coati.data.template import render_prompt, use_chat_template
    from coati.models.cache import resolve_pretrain
    from coati.models.loading import load_tokenizer

    tok = load_tokenizer(resolve_pretrain(pretrain, with_model=False))
    chat = use_chat_template(tok, "auto")
    bos = 1 if tok.bos_token_id is not None and tok("").input_ids[:1] == [tok.bos_token_id] else 0
    per_lang: dict[str, dict] = {}
    for pair in pairs:
        prompt = render_prompt(pair.prompt, tok, chat)
        p_ids = len(tok(prompt, add_special_tokens=False).input_ids) if prompt else 0
        a_ids = [len(tok(a, add_special_tokens=False).input_ids) for a in pair.responses]
        s = per_lang.setdefault(pair.lang, {"pairs": 0, "answer_tokens": 0, "answer_chars": 0, "text_tokens": 0,
                                            "text_chars": 0, "longest": []})
        s["pairs"] += 1
        s["answer_tokens"] += sum(a_ids)
        s["answer_chars"] += sum(len(a) for a in pair.responses)
        prompt_chars = sum(len(m["content"]) for m in pair.prompt)
        s["text_tokens"] += p_ids * len(a_ids) + sum(a_ids)
        s["text_chars"] += prompt_chars * len(a_ids) + sum(len(a) for a in pair.responses)
        s["longest"].append(bos + p_ids + max(a_ids) + 1)
    out = {"chat_template": chat}
    for lang, s in sorted(per_lang.items()):
        longest = s.pop("longest")
        out[lang] = {**s, "answer_tokens_per_char": s["answer_tokens"] / s["answer_chars"],
                     "tokens_per_char": s["text_tokens"] / s["text_chars"],
                     "longest_median": int(statistics.median(longest)), "longest_p90": _percentile(longest, 0.9),
                     "share_over": {str(n): sum(x > n for x in longest) / len(longest) for n in max_lens}}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from coati.data.sources import default_data_dir, select_pairs
    from coati.cli.recipe import read_recipe

    cfg = read_recipe(args.config)
    sel = select_pairs(cfg["dataset"], default_data_dir(), cfg.get("max_samples"), False, 0, None, None,
                       cfg.get("eval_split", 0.0), cfg.get("max_responses"))
    pairs = sel.train + sel.eval
    results = {"config": os.path.relpath(args.config, REPO), "pairs": len(pairs), "tokenizers": {}}
    for pretrain in args.pretrain:
        r = results["tokenizers"][pretrain] = measure(pretrain, pairs, args.max_len)
        for lang in ("en", "zh"):
            if lang in r:
                x = r[lang]
                over = ", ".join(f">{n}: {v:.0%}" for n, v in x["share_over"].items())
                print(f"{pretrain} {lang} ({x['pairs']} pairs): {x['answer_tokens_per_char']:.2f} answer tokens/char, "
                      f"{x['tokens_per_char']:.2f} with prompt; longer sequence median {x['longest_median']}, "
                      f"p90 {x['longest_p90']}; {over}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
