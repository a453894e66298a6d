"""Evaluate an exported reward model on preference pairs: metrics, calibration, a report and plots.

Usage::

    python -m coati.evaluate --model_path out/rm --dataset hh-rlhf dpo-zh-demo --max_samples 500 \\
        --output_dir out/rm/eval --metrics out/rm/metrics.jsonl

``--dataset`` accepts every spec the trainer accepts (named datasets, local files, Hub ids; see
:func:`coati.data.sources.load_pairs`). Instead, ``--heldout`` evaluates exactly the pairs the training run held out
(its ``--eval_split`` or ``--eval_dataset``), re-selected from ``<model_path>/train_config.json`` by
:func:`heldout_pairs`; give exactly one of the two. Pairs are scored with :class:`coati.scoring.RewardScorer`, i.e.
in exactly the training layout. Metrics are given overall, per subset (the dataset spec a pair came from,
``pair.source``, or with ``--subset_by file`` its file) and per language (``pair.lang``: ``en`` / ``zh``); see
:func:`pair_metrics`.

Outputs in ``--output_dir`` (default ``<model_path>/eval``):

* ``report.json`` (strict JSON: a value that is not a finite number is null): ``model_path``, ``datasets``,
  ``heldout`` (whether the pairs are the training run's held-out pairs), ``pairs``, ``accuracy``, ``margin``,
  ``margin_std``, ``chosen_reward``, ``rejected_reward``, ``reward_mean``, ``reward_std``, ``ece``, ``bins``,
  ``calibration`` (per bin: ``lo``, ``hi``, ``count``, ``accuracy``, ``confidence``), ``subsets``
  ``{name: {same metric keys}}``, ``languages`` ``{lang: {...}}``, ``truncation``, ``data`` (rows read / skipped
  per source), ``max_len``, ``chat_template``, ``seconds``;
* ``report.md``: the same as a table;
* ``pair_scores.jsonl``: one row per pair (``origin``, ``source``, ``lang``, ``chosen_reward``, ``rejected_reward``,
  ``margin``), e.g. for data filtering;
* PNG plots: ``margin_hist.png``, ``accuracy_by_subset.png``, ``reward_distributions.png``, ``calibration.png``, and
  ``training_curves.png`` when ``--metrics`` (a training ``metrics.jsonl``) is given.

User errors (missing model folder or dataset, bad flags or metrics file, an ``--output_dir`` that cannot be created
or written or an unusable ``--device``, both checked before the model loads, a model with NaN/inf weights, a
non-finite score, ``--heldout`` without held-out pairs) print one ``error: ...`` line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import torch

from coati.config import COUNT, DefaultsOnceHelpFormatter, Range, checked

from coati.data.sources import json_object_lines
from coati.io import dumps, write_json
from coati.score import check_output_target

PLOTS = ("margin_hist.png", "accuracy_by_subset.png", "reward_distributions.png", "calibration.png")
TRAINING_CURVES = "training_curves.png"
_CURVE_KEYS = ("loss", "acc", "dist")


# ---------------------------------------------------------------------------------------------- metrics

def calibration_bins(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> list[dict]:
    """Reliability table of the Bradley-Terry preference probability, in the binary form of Guo et al. (2017).

    For pair i, ``p_i = sigmoid(r_c,i - r_r,i)`` is the model's probability that the chosen answer is preferred.
    The model predicts "chosen" when ``p_i > 0.5`` and "rejected" otherwise; the label is always "chosen", so the
    prediction is correct iff ``r_c,i > r_r,i`` (ties are wrong, as the trainer's ``acc``). Its confidence is
    ``conf_i = max(p_i, 1 - p_i)`` in [0.5, 1]. Bins are the ``bins`` equal-width intervals of [0, 1],
    ``I_b = ((b-1)/M, b/M]`` for b = 1..M (the first also holds 0), and pair i falls in the bin holding ``conf_i``
    (so with M = 10 only the bins above 0.5, plus ``(0.4, 0.5]`` for ties, can be filled).

    Args:
        chosen, rejected: ``[N]`` rewards (any float dtype, computed in float64).
        bins: number of bins M >= 1.
    Returns:
        M dicts ``{"lo", "hi", "count", "accuracy", "confidence"}`` (accuracy / confidence are the bin means, None for
        an empty bin).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    c, r = chosen.detach().double().cpu().flatten(), rejected.detach().double().cpu().flatten()
    p = torch.sigmoid(c - r)
    conf = torch.maximum(p, 1 - p)
    correct = (c > r).double()
    # bin b (0-based) holds conf in (b/M, (b+1)/M]; ceil(conf*M)-1, with 0 -> bin 0
    idx = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                    "accuracy": correct[sel].mean().item() if n else None,
                    "confidence": conf[sel].mean().item() if n else None})
    return out


def expected_calibration_error(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> float:
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over the bins of :func:`calibration_bins`.

    Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599), section 2,
    applied to the binary prediction "chosen is preferred" with probability sigmoid(r_c - r_r). 0 is perfectly
    calibrated; the maximum is 1. Rewards are logits, so the scale of r matters: a model with the right ranking but
    margins that are too large (over-confident) or too small (under-confident) has a high ECE.

    Returns:
        a float in [0, 1]; NaN for N = 0.
    """
    table = calibration_bins(chosen, rejected, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        return float("nan")
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> dict:
    """Metrics of N scored preference pairs.

    Args:
        chosen, rejected: ``[N]`` rewards of the chosen and rejected answers (computed in float64).
        bins: calibration bins for the ECE.
    Returns:
        ``pairs`` N; ``accuracy`` share of pairs with r_c > r_r (ties count as wrong; the trainer's ``acc``);
        ``margin`` mean of r_c - r_r (the trainer's ``dist``) and ``margin_std`` its population std;
        ``chosen_reward`` / ``rejected_reward`` mean rewards; ``reward_mean`` / ``reward_std`` mean and population
        standard deviation (divide by 2N) over all 2N rewards (the statistics ``config.json`` stores for
        normalisation); ``ece`` :func:`expected_calibration_error`; ``calibration`` the table of
        :func:`calibration_bins`. Rewards are unitless logits. With N = 0 only ``{"pairs": 0}``.
    Raises:
        ValueError: shapes differ.
    """
    c, r = chosen.detach().double().cpu().flatten(), rejected.detach().double().cpu().flatten()
    if c.shape != r.shape:
        raise ValueError(f"chosen has {c.numel()} rewards but rejected has {r.numel()}")
    n = c.numel()
    if n == 0:
        return {"pairs": 0}
    d = c - r
    both = torch.cat([c, r])
    table = calibration_bins(c, r, bins)
    return {"pairs": n, "accuracy": (c > r).double().mean().item(), "margin": d.mean().item(),
            "margin_std": d.std(unbiased=False).item(), "chosen_reward": c.mean().item(),
            "rejected_reward": r.mean().item(), "reward_mean": both.mean().item(),
            "reward_std": both.std(unbiased=False).item(),
            "ece": sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]),
            "calibration": table}


def grouped_metrics(chosen: torch.Tensor, rejected: torch.Tensor, groups: Sequence[str], bins: int = 10) -> dict:
    """``{group: pair_metrics(...)}`` for each distinct label in ``groups`` (``[N]`` strings), sorted by name."""
    out = {}
    for name in sorted(set(groups)):
        sel = torch.tensor([g == name for g in groups], dtype=torch.bool)
        out[name] = pair_metrics(chosen[sel], rejected[sel], bins)
    return out


def subset_name(pair, by: str = "source") -> str:
    """The subset a pair is reported under: its ``source`` (dataset spec), or with ``by="file"`` the file name of
    its ``origin`` (e.g. ``hh-rlhf_harmless-base_test.jsonl.gz``; Hub rows keep the Hub id)."""
    if by == "source" or not pair.origin:
        return pair.source
    where = pair.origin.rsplit(":", 1)[0]
    return os.path.basename(where) if os.path.isfile(where) else where


def read_metrics_jsonl(path: str) -> list[dict]:
    """Rows of a training ``metrics.jsonl`` (blank lines skipped).

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not a JSON object (``path:line``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--metrics {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for where, row, problem in json_object_lines(f, path):
            if problem:
                raise ValueError(f"{where}: {problem}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _hist_bins(values: torch.Tensor, n: int = 40):
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def plot_margin_hist(chosen: torch.Tensor, rejected: torch.Tensor, path: str) -> str:
    """Histogram of the margins r_c - r_r (``[N]``), with the line at 0 (right of it = correct)."""
    plt = _pyplot()
    d = (chosen.double() - rejected.double()).cpu()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(d.numpy(), bins=_hist_bins(d), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("margin r_chosen - r_rejected")
    ax.set_ylabel("pairs")
    ax.set_title(f"margin: mean {d.mean():.3f}, accuracy {(d > 0).double().mean():.3f} (N={d.numel()})")
    return _save(fig, path)


def plot_reward_distributions(chosen: torch.Tensor, rejected: torch.Tensor, path: str) -> str:
    """Overlaid histograms of chosen and rejected rewards on the same bins."""
    plt = _pyplot()
    c, r = chosen.double().cpu(), rejected.double().cpu()
    edges = _hist_bins(torch.cat([c, r]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(c.numpy(), bins=edges, alpha=0.55, label=f"chosen (mean {c.mean():.3f})", color="tab:green")
    ax.hist(r.numpy(), bins=edges, alpha=0.55, label=f"rejected (mean {r.mean():.3f})", color="tab:red")
    ax.set_xlabel("reward")
    ax.set_ylabel("answers")
    ax.set_title("reward distributions")
    ax.legend()
    return _save(fig, path)


def plot_accuracy_by_group(subsets: dict, languages: dict, path: str) -> str:
    """Bar chart of accuracy per subset and per language (pair counts on the bars), chance level at 0.5."""
    plt = _pyplot()
    names = [f"{k}" for k in subsets] + [f"lang: {k}" for k in languages]
    rows = list(subsets.values()) + list(languages.values())
    accs = [m.get("accuracy", 0.0) for m in rows]
    colors = ["tab:blue"] * len(subsets) + ["tab:orange"] * len(languages)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), accs, color=colors)
    for bar, m in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"n={m['pairs']}", ha="center",
                fontsize=8)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (r_chosen > r_rejected)")
    ax.set_title("accuracy by subset and language")
    return _save(fig, path)


def plot_calibration(table: list[dict], ece: float, path: str) -> str:
    """Reliability diagram: per bin, accuracy vs mean confidence, with the diagonal of perfect calibration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    full = [b for b in table if b["count"]]
    width = table[0]["hi"] - table[0]["lo"] if table else 0.1
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge", alpha=0.7,
           edgecolor="black", label="accuracy")
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="tab:red",
            label="(confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence max(p, 1-p), p = sigmoid(r_c - r_r)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_training_curves(rows: list[dict], path: str) -> str:
    """Loss, acc and dist against ``step``, one line per ``split`` (train, eval, ...), from metrics.jsonl rows.

    Raises:
        ValueError: no row has a numeric ``step`` and one of ``loss`` / ``acc`` / ``dist``.
    """
    plt = _pyplot()
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        step, split = row.get("step"), str(row.get("split", "train"))
        if not isinstance(step, (int, float)):
            continue
        for key in _CURVE_KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, {}).setdefault(split, []).append((step, value))
    if not series:
        raise ValueError("the metrics file has no rows with 'step' and 'loss'/'acc'/'dist'")
    fig, axes = plt.subplots(1, len(_CURVE_KEYS), figsize=(5 * len(_CURVE_KEYS), 4))
    for ax, key in zip(axes, _CURVE_KEYS):
        for split, points in sorted(series.get(key, {}).items()):
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o" if len(points) < 30 or split != "train" else None, markersize=3,
                    label=split)
        ax.set_xlabel("step")
        ax.set_title(key)
        if series.get(key):
            ax.legend()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- report

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_report(report: dict) -> str:
    """The human-readable ``report.md``: one table row overall, per subset and per language."""
    cols = ("pairs", "accuracy", "margin", "chosen_reward", "rejected_reward", "reward_mean", "reward_std", "ece")
    lines = [f"# Reward model evaluation: `{report['model_path']}`", "",
             f"Datasets: {', '.join(report['datasets'])}; max_len {report['max_len']}; chat template "
             f"{'on' if report['chat_template'] else 'off'}; ECE with {report['bins']} equal-width confidence bins.", "",
             "| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def row(name, m):
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in cols) + " |")

    row("**all**", report)
    for name, m in report["subsets"].items():
        row(f"subset `{name}`", m)
    for name, m in report["languages"].items():
        row(f"lang `{name}`", m)
    trunc = report.get("truncation") or {}
    lines += ["", "accuracy: share of pairs with r_chosen > r_rejected; margin: mean r_chosen - r_rejected; "
              "reward_mean/std over all chosen and rejected rewards; ECE (Guo et al. 2017) of p = sigmoid(margin).",
              "", f"Truncation: {trunc.get('prompt_truncated', 0)} pairs had the prompt cut, "
              f"{trunc.get('answer_truncated', 0)} an answer cut (max_len {report['max_len']}).", ""]
    return "\n".join(lines)


def evaluate(scorer, pairs: list, datasets: Sequence[str], output_dir: str, bins: int = 10,
             metrics_path: str | None = None, subset_by: str = "source", progress: bool = True,
             data_report: dict | None = None, heldout: bool = False) -> dict:
    """Score ``pairs`` with a :class:`~coati.scoring.RewardScorer` and write the report and plots.

    ``report.json`` and ``pair_scores.jsonl`` are strict JSON (:func:`coati.io.dumps`: no NaN/Infinity literals).

    Returns:
        the ``report.json`` dict (see the module docstring).
    Raises:
        ValueError: no pairs, a bad metrics file, or a non-finite score (from the scorer).
        FileNotFoundError: ``metrics_path`` missing.
    """
    if not pairs:
        raise ValueError("no preference pairs to evaluate")
    training_rows = read_metrics_jsonl(metrics_path) if metrics_path else None  # fail before scoring
    t0 = time.perf_counter()
    chosen, rejected = scorer.score_pairs(pairs, progress=progress)
    seconds = time.perf_counter() - t0
    report = {"model_path": scorer.path, "datasets": list(datasets), "heldout": heldout}
    report.update(pair_metrics(chosen, rejected, bins))
    report["bins"] = bins
    report["subsets"] = grouped_metrics(chosen, rejected, [subset_name(p, subset_by) for p in pairs], bins)
    report["languages"] = grouped_metrics(chosen, rejected, [p.lang for p in pairs], bins)
    report.update(truncation=vars(scorer.last_truncation), data=data_report or {},
                  max_len=scorer.encoder.max_len, chat_template=scorer.chat_template, seconds=seconds,
                  pairs_per_s=len(pairs) / seconds if seconds > 0 else None)

    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "report.json"), report)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(report))
    with open(os.path.join(output_dir, "pair_scores.jsonl"), "w", encoding="utf-8") as f:
        for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
            f.write(dumps({"origin": p.origin, "source": p.source, "lang": p.lang, "chosen_reward": c,
                           "rejected_reward": r, "margin": c - r}) + "\n")
    plot_margin_hist(chosen, rejected, os.path.join(output_dir, "margin_hist.png"))
    plot_accuracy_by_group(report["subsets"], report["languages"], os.path.join(output_dir, "accuracy_by_subset.png"))
    plot_reward_distributions(chosen, rejected, os.path.join(output_dir, "reward_distributions.png"))
    plot_calibration(report["calibration"], report["ece"], os.path.join(output_dir, "calibration.png"))
    if training_rows is not None:
        plot_training_curves(training_rows, os.path.join(output_dir, TRAINING_CURVES))
    return report


# ---------------------------------------------------------------------------------------------- CLI

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m coati.evaluate`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m coati.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--model_path", required=True, help="exported reward model folder (train_reward_model.py "
                   "--save_path)")
    p.add_argument("--dataset", nargs="+", default=None,
                   help="named datasets, local files (.jsonl/.jsonl.gz/.json/.parquet) or Hub ids, as --dataset of "
                        "the trainer (this or --heldout)")
    p.add_argument("--heldout", action="store_true",
                   help="evaluate the pairs the training run held out (its --eval_split / --eval_dataset), chosen "
                        "again from <model_path>/train_config.json (this or --dataset)")
    p.add_argument("--data_dir", default=None, help="where named datasets are looked up (default: $COATI_DATA_DIR); "
                   "with --heldout the training run's own data_dir comes first, this one is used when it is unset "
                   "or gone")
    p.add_argument("--max_samples", type=checked(int, COUNT), default=None,
                   help="at most N pairs per dataset (first N in file order; "
                   "not with --heldout)")
    p.add_argument("--strict_data", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--batch_size", type=checked(int, COUNT), default=16, help="sequences per forward pass")
    p.add_argument("--max_len", type=checked(int, Range(8, integer=True)), default=None,
                   help="max tokens per sequence (default: train_config.json)")
    p.add_argument("--output_dir", default=None, help="where the report and plots go (default: <model_path>/eval)")
    p.add_argument("--metrics", default=None, help="a training metrics.jsonl: also plot training_curves.png")
    p.add_argument("--bins", type=checked(int, COUNT), default=10, help="equal-width confidence bins for the ECE")
    p.add_argument("--subset_by", choices=("source", "file"), default="source",
                   help="subsets: the dataset spec of each pair, or the file it came from")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="backbone weights dtype")
    p.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    return p


def _check_args(args) -> None:
    if bool(args.dataset) == bool(args.heldout):
        raise ValueError("give --dataset (the pairs to evaluate) or --heldout (the pairs the training run held out)"
                         + (", not both" if args.heldout else ""))
    if args.heldout and args.max_samples is not None:
        raise ValueError("--max_samples applies to --dataset; --heldout takes the training run's own settings")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.bins < 1:
        raise ValueError(f"--bins must be >= 1, got {args.bins}")
    if args.max_len is not None and args.max_len < 8:
        raise ValueError(f"--max_len must be at least 8, got {args.max_len}")
    if args.metrics and not os.path.isfile(args.metrics):
        raise FileNotFoundError(f"--metrics {args.metrics}: no such file")


def heldout_settings(model_path: str) -> dict:
    """The data settings of the training run that wrote ``model_path``, from its ``train_config.json``.

    Keys missing from an older file take :class:`coati.config.TrainConfig`'s defaults.

    Returns:
        a dict with ``dataset``, ``data_dir`` (None in older exports), ``max_samples``, ``strict_data``, ``seed``,
        ``eval_dataset``, ``max_eval_samples``, ``eval_split``.
    Raises:
        FileNotFoundError: no ``train_config.json``. ValueError: it is not a JSON object, or the run held out no
            pairs (``eval_split`` 0 and no ``eval_dataset``).
    """
    from coati.config import TrainConfig

    path = os.path.join(model_path, "train_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--heldout: {path} is missing, so the pairs held out in training are unknown; "
                                "evaluate with --dataset instead")
    with open(path, encoding="utf-8") as f:
        try:
            stored = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--heldout: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(stored, dict):
        raise ValueError(f"--heldout: {path} is not a JSON object")
    keys = ("dataset", "data_dir", "max_samples", "strict_data", "seed", "eval_dataset", "max_eval_samples",
            "eval_split")
    defaults = TrainConfig().to_dict()
    settings = {k: stored.get(k, defaults[k]) for k in keys}
    for key in ("dataset", "eval_dataset"):  # one spec may be stored as a plain string
        if isinstance(settings[key], str):
            settings[key] = [settings[key]]
    if not settings["eval_dataset"] and not (settings["eval_split"] or 0) > 0:
        raise ValueError(f"--heldout: the training run held out no pairs (eval_split {settings['eval_split']} and no "
                         f"eval_dataset in {path}); evaluate with --dataset instead")
    return settings


def heldout_pairs(model_path: str, settings: dict, data_dir: str | None = None, strict: bool = False):
    """The pairs the training run held out, chosen again as the trainer did (:func:`coati.data.sources.select_pairs`).

    Args:
        model_path: the export folder; its ``summary.json`` ``eval_pairs``, when present, must match the count.
        settings: :func:`heldout_settings` of that folder.
        data_dir: where named datasets are looked up when ``settings["data_dir"]`` is unset or no longer exists
            (default ``$COATI_DATA_DIR``).
        strict: stop at the first bad row (also when the run itself was strict).
    Returns:
        (pairs, datasets, data_report): the held-out :class:`~coati.data.formats.PreferencePair` list in the
        trainer's order, the dataset specs they come from, and the :class:`~coati.data.sources.DataReport` of their
        load.
    Raises:
        ValueError: the stored ``data_dir`` is gone and no ``data_dir`` is given, or the data changed since training
            (another held-out count than ``summary.json``'s); as :func:`~coati.data.sources.select_pairs`.
    """
    from coati.data.sources import default_data_dir, select_pairs

    stored_dir = settings.get("data_dir")
    if stored_dir and not os.path.isdir(stored_dir):
        if not data_dir:
            raise ValueError(f"--heldout: the training run's data_dir {stored_dir} no longer exists; pass --data_dir")
        stored_dir = None
    selection = select_pairs(settings["dataset"], stored_dir or data_dir or default_data_dir(),
                             settings["max_samples"], bool(strict or settings["strict_data"]), settings["seed"],
                             settings["eval_dataset"], settings["max_eval_samples"], settings["eval_split"] or 0.0)
    pairs = selection.eval
    summary_path = os.path.join(model_path, "summary.json")
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                expected = json.load(f).get("eval_pairs")
        except (json.JSONDecodeError, AttributeError):
            expected = None
        if isinstance(expected, int) and expected != len(pairs):
            raise ValueError(f"--heldout: {summary_path} counts {expected} held-out pairs but the training settings "
                             f"now select {len(pairs)}: the data changed since training; evaluate with --dataset")
    if not pairs:
        raise ValueError("--heldout: the training settings select no held-out pairs from the data")
    datasets = settings["eval_dataset"] or settings["dataset"]
    return pairs, list(datasets), selection.eval_report or selection.report


def run(args) -> dict:
    """Check the options, load model and data, evaluate, print a short summary; returns the report.

    Raises:
        ValueError / OSError: user errors (see the module docstring); option, ``--output_dir``, ``--device`` and
        ``--heldout`` settings errors come before the model loads.
    """
    from coati.data.sources import default_data_dir, load_pairs
    from coati.scoring import RewardScorer, resolve_device

    _check_args(args)
    output_dir = args.output_dir or os.path.join(args.model_path, "eval")
    check_output_target("--output_dir", output_dir, folder=True)
    device = resolve_device(args.device)
    settings = heldout_settings(args.model_path) if args.heldout else None
    scorer = RewardScorer.from_pretrained(args.model_path, device=device, dtype=_DTYPES[args.dtype],
                                          max_len=args.max_len, batch_size=args.batch_size)
    if settings is not None:
        pairs, datasets, data_report = heldout_pairs(args.model_path, settings, args.data_dir, args.strict_data)
    else:
        datasets = args.dataset
        pairs, data_report = load_pairs(args.dataset, args.data_dir or default_data_dir(), args.max_samples,
                                        args.strict_data, seed=None)
    if data_report.rows_skipped:
        print(data_report.summary(), file=sys.stderr)
    report = evaluate(scorer, pairs, datasets, output_dir, bins=args.bins, metrics_path=args.metrics,
                      subset_by=args.subset_by, progress=not args.disable_tqdm, data_report=data_report.to_dict(),
                      heldout=bool(args.heldout))
    print(f"{report['pairs']} {'held-out ' if args.heldout else ''}pairs: accuracy {report['accuracy']:.4f}, "
          f"margin {report['margin']:.4f}, reward mean {report['reward_mean']:.4f} std {report['reward_std']:.4f}, "
          f"ECE {report['ece']:.4f}")
    for title, groups in (("subset", report["subsets"]), ("lang", report["languages"])):
        for name, m in groups.items():
            print(f"  {title} {name}: {m['pairs']} pairs, accuracy {m['accuracy']:.4f}, margin {m['margin']:.4f}, "
                  f"ECE {m['ece']:.4f}")
    print(f"report and plots in {output_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry; user errors become one ``error: ...`` line on stderr and exit code 2."""
    from coati.data.formats import DataFormatError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, DataFormatError, PermissionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
