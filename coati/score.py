"""Score JSONL rows with an exported reward model (Best-of-N ranking, data filtering, spot checks).

Usage::

    python -m coati.score --model_path out/rm --input candidates.jsonl --output scored.jsonl [--normalize]

Input rows (one JSON object per line; blank lines are ignored), each kept with all its keys in the output, plus:

* ``{"prompt": P, "responses": [str, ...]}`` -> ``"scores"`` (floats, in the order of ``responses``) and ``"best"``
  (index of the highest score, the first one on ties);
* ``{"prompt": P, "response": str}`` -> ``"score"``;
* ``{"text": str}`` -> ``"score"`` (the text is scored as an answer to an empty prompt);
* ``{"messages": [{"role", "content"}, ..., {"role": "assistant", ...}]}`` -> ``"score"`` of the last (assistant)
  message given the earlier ones.

``P`` is a string (one user message), a list of ``{"role", "content"}`` messages, or absent / null (empty prompt).
Texts are laid out exactly as in training (see :mod:`coati.scoring`). Scores are raw rewards (value-head logits), or
with ``--normalize`` ``(r - reward_mean) / reward_std`` using the statistics stored in the export's ``config.json``
(or ``--reward_mean`` / ``--reward_std``). All texts of all rows are scored together in length-sorted batches.

A bad row stops the run before any scoring with ``error: FILE:LINE: reason`` on stderr and exit code 2; so do other
user errors (missing model folder or input file, ``--normalize`` without statistics).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from coati.data.sources import json_object_lines


class RowError(ValueError):
    """An unusable input row; the message starts with ``file:line``."""


@dataclass
class _Row:
    data: dict
    kind: str  # "responses" or "single"
    first: int  # index of its first text in the flat list
    count: int


def _prompt_of(row: dict, where: str):
    from coati.scoring import normalize_prompt

    prompt = row.get("prompt")
    try:
        normalize_prompt(prompt)
    except ValueError as e:
        raise RowError(f"{where}: bad 'prompt': {e}") from None
    return prompt


def parse_rows(lines, name: str) -> tuple[list[_Row], list, list[str]]:
    """Parse JSONL lines into rows and the flat list of (prompt, response) texts to score.

    Args:
        lines: an iterable of text lines; name: the file name used in error messages.
    Returns:
        (rows, prompts, responses): rows in input order, and the flat prompt / response lists.
    Raises:
        RowError: ``name:line: reason`` for the first unusable row.
    """
    rows: list[_Row] = []
    prompts: list = []
    responses: list[str] = []
    for where, row, problem in json_object_lines(lines, name):
        if problem:
            raise RowError(f"{where}: {problem}")
        if "responses" in row:
            cands = row["responses"]
            if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
                raise RowError(f"{where}: 'responses' must be a non-empty list of strings")
            prompt = _prompt_of(row, where)
            rows.append(_Row(row, "responses", len(responses), len(cands)))
            prompts += [prompt] * len(cands)
            responses += cands
        elif "response" in row:
            if not isinstance(row["response"], str):
                raise RowError(f"{where}: 'response' must be a string, got {type(row['response']).__name__}")
            prompts.append(_prompt_of(row, where))
            rows.append(_Row(row, "single", len(responses), 1))
            responses.append(row["response"])
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise RowError(f"{where}: 'text' must be a string, got {type(row['text']).__name__}")
            prompts.append(None)
            rows.append(_Row(row, "single", len(responses), 1))
            responses.append(row["text"])
        elif "messages" in row:
            msgs = row["messages"]
            last = msgs[-1] if isinstance(msgs, list) and msgs else None
            if not isinstance(last, dict) or last.get("role") not in ("assistant", "gpt", "bot") \
                    or not isinstance(last.get("content"), str):
                raise RowError(f"{where}: 'messages' must be a list of messages ending with an assistant message "
                               "with a string 'content'")
            prompts.append(_prompt_of({"prompt": msgs[:-1]}, where))
            rows.append(_Row(row, "single", len(responses), 1))
            responses.append(last["content"])
        else:
            raise RowError(f"{where}: a row needs 'responses' (list of strings, with 'prompt'), 'response' (string, "
                           f"with 'prompt'), 'text' (string) or 'messages'; got keys {sorted(row)}")
    return rows, prompts, responses


def attach_scores(rows: list[_Row], scores: list[float]) -> list[dict]:
    """Output rows: each input row with ``scores`` + ``best`` or ``score`` added (other keys kept)."""
    out = []
    for row in rows:
        data = dict(row.data)
        mine = scores[row.first:row.first + row.count]
        if row.kind == "responses":
            data["scores"] = mine
            data["best"] = max(range(len(mine)), key=lambda i: (mine[i], -i))
        else:
            data["score"] = mine[0]
        out.append(data)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m coati.score`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m coati.score", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True, help="exported reward model folder")
    p.add_argument("--input", required=True, help="JSONL file of rows to score ('-' = stdin)")
    p.add_argument("--output", default=None, help="JSONL output file (default: stdout)")
    p.add_argument("--normalize", action="store_true",
                   help="(r - reward_mean) / reward_std with the statistics stored in config.json")
    p.add_argument("--reward_mean", type=float, default=None, help="override the stored reward_mean")
    p.add_argument("--reward_std", type=float, default=None, help="override the stored reward_std")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max_len", type=int, default=None, help="max tokens per sequence (default: train_config.json)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="backbone weights dtype")
    p.add_argument("--disable_tqdm", action="store_true", help="no progress bar (it goes to stderr)")
    return p


def run(args) -> int:
    """Parse the input, score every text in one batched pass, write the output; returns the number of rows."""
    from coati.scoring import RewardScorer

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.input == "-":
        rows, prompts, responses = parse_rows(sys.stdin.read().splitlines(), "<stdin>")
    else:
        try:
            with open(args.input, encoding="utf-8") as f:
                rows, prompts, responses = parse_rows(f, args.input)
        except FileNotFoundError:
            raise FileNotFoundError(f"--input {args.input}: no such file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{args.input}: not UTF-8 text ({e.reason})") from None
    scorer = RewardScorer.from_pretrained(args.model_path, device=args.device, dtype=getattr(torch, args.dtype),
                                          max_len=args.max_len, batch_size=args.batch_size,
                                          reward_mean=args.reward_mean, reward_std=args.reward_std)
    scores = scorer.score_texts(prompts, responses, normalize=args.normalize, progress=not args.disable_tqdm)
    out_rows = attach_scores(rows, scores)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"scored {len(responses)} texts in {len(out_rows)} rows -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return len(out_rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; user errors become one ``error: ...`` line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
