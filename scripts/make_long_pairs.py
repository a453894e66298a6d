"""Build long preference pairs from real ones: earlier dialogues joined as history before one pair's answers.

Each output pair keeps a real pair's final question and its real chosen and rejected answers; before them comes the
history of other real dialogues of the same data (their turns and chosen answers, in order) until the chosen
sequence reaches ``--tokens`` tokens under the tokenizer's chat template. The result is a JSONL file of
``{"prompt": [messages], "chosen": str, "rejected": str}`` rows, the generic pair format coati reads. Nothing is
invented: every message is a message of the source data.

    python scripts/make_long_pairs.py --dataset hh-rlhf --tokens 8192 --pairs 4 --out /tmp/long_8k.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(pairs, count_tokens, tokens: int, n: int) -> list[dict]:
    """``n`` rows whose chosen sequence is at least ``tokens`` long (``count_tokens(messages) -> int``), or fewer when
    the source runs out; the pairs are used in order, each at most once as a final pair or as history."""
    out, i = [], 0
    while len(out) < n and i < len(pairs):
        final, i = pairs[i], i + 1
        history: list[dict] = []
        while i < len(pairs):
            full = history + list(final.prompt) + [{"role": "assistant", "content": final.chosen}]
            if count_tokens(full) >= tokens:
                break
            donor, i = pairs[i], i + 1
            history += list(donor.prompt) + [{"role": "assistant", "content": donor.chosen}]
        else:
            break
        out.append({"prompt": history + [dict(m) for m in final.prompt], "chosen": final.chosen,
                    "rejected": final.rejected})
    return out


def main(argv=None) -> int:
    from coati.data.sources import default_data_dir, load_pairs
    from coati.models.cache import SMOLLM2_ALIAS, resolve_pretrain
    from coati.models.loading import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", nargs="+", default=["hh-rlhf"])
    p.add_argument("--tokens", type=int, required=True, help="minimum tokens of each chosen sequence")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--tokenizer", default=SMOLLM2_ALIAS)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(resolve_pretrain(args.tokenizer, with_model=False))
    raw, _ = load_pairs(args.dataset, default_data_dir(), None, seed=0)

    def count_tokens(messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = build(raw, count_tokens, args.tokens, args.pairs)
    if len(rows) < args.pairs:
        print(f"error: the data gave only {len(rows)} pairs of {args.tokens} tokens", file=sys.stderr)
        return 1
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} pairs of >= {args.tokens} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
