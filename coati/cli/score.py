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

Every output row also gets ``"truncated"``: true when the prompt or the response lost tokens to ``max_len`` (the
prompt is cut from the left first; the answer's end only when it alone does not fit); for ``responses`` rows a list
of booleans, one per response. When any text was truncated, one summary line goes to stderr. Output lines are strict
JSON (a non-finite number in an input row is written as null).

``P`` is a string (one user message), a list of ``{"role", "content"}`` messages, or absent / null (empty prompt).
Texts are laid out exactly as in training (see :mod:`coati.scoring`). Scores are raw rewards (value-head logits), or
with ``--normalize`` ``(r - reward_mean) / reward_std`` using the statistics stored in the export's ``config.json``
(or ``--reward_mean`` / ``--reward_std``). All texts of all rows are scored together in length-sorted batches.

A bad row stops the run before the model is loaded with ``error: FILE:LINE: reason`` on stderr and exit code 2:
besides malformed rows, a response (or ``text``, or the last ``messages`` content) that is empty, whitespace or only
invisible format characters such as U+200B (the reward of an empty answer is meaningless, and training data refuses
such answers too), and text with a lone surrogate (a JSON escape such as ``"\ud800"``). Other user errors are one
``error: ...`` line with exit code 2 as well: a missing model folder or input file, an ``--output`` that is a folder
or whose folder is missing or not writable and an unusable ``--device`` (both checked before any work), a model
with NaN/inf weights, a non-finite score, ``--normalize`` without statistics.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from coati.cli.options import (DefaultsOnceHelpFormatter, add_model_options, check_output_target, checked,
                               user_errors_exit)
from coati.config import POSITIVE, Range
from coati.data.formats import DataFormatError, check_answer
from coati.data.sources import json_object_lines
from coati.io import dumps


class RowError(ValueError):
    """An unusable input row; the message starts with ``file:line``."""


@dataclass
class _Row:
    data: dict
    kind: str  # "responses" or "single"
    first: int  # index of its first text in the flat list
    count: int


def _prompt_of(prompt, where: str, key: str = "prompt"):
    """``prompt`` when :func:`~coati.scoring.normalize_prompt` accepts it; RowError ``where: bad 'key': ...``."""
    from coati.scoring import normalize_prompt

    try:
        normalize_prompt(prompt)
    except ValueError as e:
        raise RowError(f"{where}: bad {key!r}: {e}") from None
    return prompt


def parse_rows(lines, name: str) -> tuple[list[_Row], list, list[str]]:
    """Parse JSONL lines into rows and the flat list of (prompt, response) texts to score.

    Args:
        lines: an iterable of text lines; name: the file name used in error messages.
    Returns:
        (rows, prompts, responses): rows in input order, and the flat prompt / response lists.
    Raises:
        RowError: ``name:line: reason`` for the first unusable row: not a JSON object, no usable keys, a response
            that is empty by :func:`~coati.data.formats.check_answer` (e.g. ``""`` or ``"\u200b"``: ``response 2 is
            empty``), text with a lone surrogate, or a bad prompt.
    """
    rows, prompts, responses = [], [], []
    for where, row in json_object_lines(lines, name, RowError):
        if "responses" in row:
            cands = row["responses"]
            if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
                raise RowError(f"{where}: 'responses' must be a non-empty list of strings")
            prompt, texts = _prompt_of(row.get("prompt"), where), [(c, f"response {i}") for i, c in enumerate(cands)]
        elif "response" in row or "text" in row:
            key = "response" if "response" in row else "text"
            if not isinstance(row[key], str):
                raise RowError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
            prompt = _prompt_of(row.get("prompt"), where) if key == "response" else None
            texts = [(row[key], repr(key))]
        elif "messages" in row:
            msgs = row["messages"]
            last = msgs[-1] if isinstance(msgs, list) and msgs else None
            if not isinstance(last, dict) or last.get("role") not in ("assistant", "gpt", "bot") \
                    or not isinstance(last.get("content"), str):
                raise RowError(f"{where}: 'messages' must be a list of messages ending with an assistant message "
                               "with a string 'content'")
            prompt = _prompt_of(msgs[:-1], where, "messages")
            texts = [(last["content"], "the last message's 'content'")]
        else:
            raise RowError(f"{where}: a row needs 'responses' (list of strings, with 'prompt'), 'response' (string, "
                           f"with 'prompt'), 'text' (string) or 'messages'; got keys {sorted(row)}")
        try:  # RowError ``where: <what> is empty`` / ``... is not valid Unicode``
            for text, what in texts:
                check_answer(what, text)
        except DataFormatError as e:
            raise RowError(f"{where}: {e}") from None
        rows.append(_Row(row, "responses" if "responses" in row else "single", len(responses), len(texts)))
        prompts += [prompt] * len(texts)
        responses += [text for text, _ in texts]
        try:  # other keys are copied to the output, which must be UTF-8
            dumps(row).encode("utf-8")
        except UnicodeEncodeError:
            raise RowError(f"{where}: the row is not valid Unicode (a lone surrogate such as \"\\ud800\" in one of "
                           "its strings)") from None
        except RecursionError:
            raise RowError(f"{where}: the row is nested too deeply to be written back") from None
    return rows, prompts, responses


def attach_scores(rows: list[_Row], scores: list[float], truncated: list[bool] | None = None) -> list[dict]:
    """Output rows: each input row with ``scores`` + ``best`` or ``score`` added (other keys kept).

    Args:
        rows: from :func:`parse_rows`; scores: one float per text (the flat list).
        truncated: one bool per text (it lost tokens to ``max_len``), added as ``"truncated"`` (a list for
            ``responses`` rows); None adds nothing.
    """
    out = []
    for row in rows:
        span = slice(row.first, row.first + row.count)
        mine, cut = scores[span], None if truncated is None else truncated[span]
        if row.kind == "responses":
            data = {**row.data, "scores": mine, "best": mine.index(max(mine))}  # the first one on ties
        else:
            data, cut = {**row.data, "score": mine[0]}, cut and cut[0]
        if cut is not None:
            data["truncated"] = cut
        out.append(data)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m coati.score`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m coati.score", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--model_path", required=True, help="exported reward model folder")
    p.add_argument("--input", required=True, help="JSONL file of rows to score ('-' = stdin)")
    p.add_argument("--output", default=None, help="JSONL output file (default: stdout)")
    p.add_argument("--normalize", action="store_true",
                   help="(r - reward_mean) / reward_std with the statistics stored in config.json")
    p.add_argument("--reward_mean", type=checked(float, Range()), default=None, help="override the stored reward_mean")
    p.add_argument("--reward_std", type=checked(float, POSITIVE), default=None, help="override the stored reward_std")
    return add_model_options(p)


def run(args) -> int:
    """Check the options, parse the input, score every text in one batched pass, write the output.

    Returns:
        the number of rows.
    Raises:
        ValueError / OSError: user errors (see the module docstring), all before the model loads except a model with
        non-finite weights, missing statistics for ``--normalize`` and a non-finite score.
    """
    from coati.scoring import RewardScorer, resolve_device

    device = resolve_device(args.device)
    if args.output:
        check_output_target("--output", args.output)
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
    scorer = RewardScorer.from_pretrained(args.model_path, device=device, dtype=getattr(torch, args.dtype),
                                          max_len=args.max_len, batch_size=args.batch_size,
                                          reward_mean=args.reward_mean, reward_std=args.reward_std,
                                          load_in_4bit=args.load_in_4bit, layout=args.layout)
    encoded = scorer.encode_texts(prompts, responses)
    scores = scorer.score_encoded(encoded, normalize=args.normalize, progress=not args.disable_tqdm)
    truncated = [e.prompt_truncated or e.answer_truncated for e in encoded]
    out_rows = attach_scores(rows, scores, truncated)
    text = "".join(dumps(r) + "\n" for r in out_rows)
    if any(truncated):
        print(f"{sum(truncated)} of {len(truncated)} texts were truncated to max_len {scorer.encoder.max_len} tokens "
              "(prompt cut from the left, or the answer's end cut)", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"scored {len(responses)} texts in {len(out_rows)} rows -> {args.output}", file=sys.stderr)
    else:
        print(text, end="", flush=True)
    return len(out_rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; user errors become one ``error: ...`` line on stderr and exit code 2."""
    return user_errors_exit(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
