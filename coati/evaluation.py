"""Evaluate a reward model on preference pairs: metrics overall, per subset and per language, calibration, length
bias, RewardBench leaderboard scores, a report (``report.json``, ``report.md``, ``pair_scores.jsonl``) and plots
(:func:`evaluate`); and the pairs a training run held out, chosen again from its export (:func:`heldout_pairs`).
The command line is ``python -m coati.evaluate`` (:mod:`coati.cli.evaluate`), whose help lists the outputs."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from coati.config import TrainConfig
from coati.data.sources import default_data_dir, json_object_lines, pairs_digest, select_pairs
from coati.io import dumps, write_json
from coati.metrics import grouped_metrics, pair_metrics
from coati.rewardbench import NO_SUBSET, benchmark_scores, check_rows, leaderboard_table

PLOTS = ("margin_hist.png", "accuracy_by_subset.png", "reward_distributions.png", "calibration.png",
         "reward_vs_length.png")
TRAINING_CURVES = "training_curves.png"
_CURVE_KEYS = ("loss", "acc", "dist")


def subset_name(pair, by: str = "source") -> str:
    """The subset a pair is reported under: its ``source`` (dataset spec), with ``by="subset"`` the row's own
    ``subset`` field (RewardBench's; ``"(no subset)"`` when it has none), or with ``by="file"`` the file name of its
    ``origin`` (e.g. ``hh-rlhf_harmless-base_test.jsonl.gz``; Hub rows keep the Hub id)."""
    if by == "subset":
        return pair.subset or NO_SUBSET
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
    with open(path, encoding="utf-8") as f:
        return [row for _, row in json_object_lines(f, path)]


# ---------------------------------------------------------------------------------------------- plots

def _subplots(*args, figsize: tuple[float, float]):
    """``(fig, axes)`` as ``pyplot.subplots``, but a figure outside pyplot: no GUI backend, nothing to close."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_plots(chosen: torch.Tensor, rejected: torch.Tensor, report: dict, output_dir: str,
                lengths: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The :data:`PLOTS` of ``[N]`` rewards, their answers' ``[N]`` lengths in tokens (chosen, rejected) and their
    ``report`` (:func:`evaluate`) in ``output_dir``: histogram of the margins r_c - r_r (line at 0: right of it is
    correct), bars of ``acc`` per subset and language (chance at 0.5), chosen vs rejected reward histograms on shared
    bins, the reliability diagram of the calibration table, and reward against length (log-scaled length axis).
    """
    c, r = chosen.double().cpu().numpy(), rejected.double().cpu().numpy()
    fig, ax = _subplots(figsize=(6, 4))
    ax.hist(c - r, bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set(xlabel="margin r_chosen - r_rejected", ylabel="pairs",
           title=f"dist (mean margin) {report['dist']:.3f}, acc {report['acc']:.3f} (N={report['pairs']})")
    _save(fig, os.path.join(output_dir, "margin_hist.png"))

    subsets, languages = report["subsets"], report["languages"]
    names = list(subsets) + [f"lang: {k}" for k in languages]
    rows = list(subsets.values()) + list(languages.values())
    fig, ax = _subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), [m.get("acc", 0.0) for m in rows],
                  color=["tab:blue"] * len(subsets) + ["tab:orange"] * len(languages))
    ax.bar_label(bars, labels=[f"n={m['pairs']}" for m in rows], padding=2, fontsize=8)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.08), ylabel="acc (share of r_chosen > r_rejected)", title="acc by subset and language")
    _save(fig, os.path.join(output_dir, "accuracy_by_subset.png"))

    fig, ax = _subplots(figsize=(6, 4))
    edges = np.histogram_bin_edges(np.concatenate([c, r]), bins=40)
    for x, name, color in ((c, "chosen", "tab:green"), (r, "rejected", "tab:red")):
        ax.hist(x, bins=edges, alpha=0.55, label=f"{name} (mean {report[name + '_reward']:.3f})", color=color)
    ax.set(xlabel="reward", ylabel="answers", title="reward distributions")
    ax.legend()
    _save(fig, os.path.join(output_dir, "reward_distributions.png"))

    table = report["calibration"]
    full = [b for b in table if b["count"]]
    fig, ax = _subplots(figsize=(5, 5))
    ax.bar([b["lo"] for b in full], [b["acc"] for b in full], width=table[0]["hi"] - table[0]["lo"], align="edge",
           alpha=0.7, edgecolor="black", label="acc")
    ax.plot([b["confidence"] for b in full], [b["acc"] for b in full], "o", color="tab:red",
            label="(confidence, acc)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence max(p, 1-p), p = sigmoid(r_c - r_r)",
           ylabel="acc (share of pairs with r_c > r_r)", title=f"reliability diagram (ECE {report['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, os.path.join(output_dir, "calibration.png"))

    bias = report["length_bias"]
    fig, ax = _subplots(figsize=(6, 4))
    for x, n, name, color in ((c, lengths[0], "chosen", "tab:green"), (r, lengths[1], "rejected", "tab:red")):
        ax.scatter(n.double().clamp(min=1).numpy(), x, s=8, alpha=0.5, label=name, color=color)
    ax.set_xscale("log")
    ax.set(xlabel="answer length (tokens)", ylabel="reward",
           title=f"reward vs length: Pearson {format_number(bias['pearson'], 3)}, Spearman {format_number(bias['spearman'], 3)}")
    ax.legend()
    _save(fig, os.path.join(output_dir, "reward_vs_length.png"))


def plot_training_curves(rows: list[dict], path: str) -> str:
    """Loss, acc and dist against ``step``, one line per ``split`` (train, eval, ...), from metrics.jsonl rows.

    Raises:
        ValueError: no row has a numeric ``step`` and one of ``loss`` / ``acc`` / ``dist``.
    """
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        step, split = row.get("step"), str(row.get("split", "train"))
        for key in _CURVE_KEYS:
            value = row.get(key)
            if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, {}).setdefault(split, []).append((step, value))
    if not series:
        raise ValueError("the metrics file has no rows with 'step' and 'loss'/'acc'/'dist'")
    fig, axes = _subplots(1, len(_CURVE_KEYS), figsize=(5 * len(_CURVE_KEYS), 4))
    for ax, key in zip(axes, _CURVE_KEYS):
        for split, points in sorted(series.get(key, {}).items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o" if len(points) < 30 or split != "train" else None, markersize=3, label=split)
        ax.set(xlabel="step", title=key)
        if key in series:
            ax.legend()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- report

def format_number(value, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals for the report tables, ``-`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_report(report: dict) -> str:
    """The human-readable ``report.md``: one table row overall, per subset and per language (``acc`` titled
    "accuracy", ``dist`` "margin")."""
    keys = ("pairs", "acc", "dist", "chosen_reward", "rejected_reward", "reward_mean", "reward_std", "ece")
    cols = [{"acc": "accuracy", "dist": "margin"}.get(k, k) for k in keys]
    groups = [("**all**", report)] + [(f"subset `{k}`", m) for k, m in report["subsets"].items()] + \
        [(f"lang `{k}`", m) for k, m in report["languages"].items()]
    trunc = report.get("truncation") or {}
    bench = report.get("benchmark")
    board = [] if bench is None else [leaderboard_table(bench, f"`{report['model_path']}`"), "",
                                      "| subset | prompts | score |", "|---|---:|---:|"] + [
        f"| {name} | {m['prompts']} | {100 * m['score']:.1f} |" for name, m in bench["subsets"].items()] + [
        "", f"Ties at the top shared: {bench['ties_at_top']} prompts." + (f" Ties subset: {bench['ties_rule']}."
                                                                         if "ties_rule" in bench else ""),
        "", "Pairwise figures over every chosen-rejected comparison:", ""]
    return "\n".join(
        [f"# Reward model evaluation: `{report['model_path']}`", ""] + board + [
         f"Datasets: {', '.join(report['datasets'])}; max_len {report['max_len']}; chat template "
         f"{'on' if report['chat_template'] else 'off'}; ECE with {report['bins']} equal-width confidence bins.", "",
         "| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        + [f"| {name} | " + " | ".join(format_number(m.get(k)) for k in keys) + " |" for name, m in groups]
        + ["", "accuracy (`acc` in report.json): share of pairs with r_chosen > r_rejected; margin (`dist`): "
           "mean r_chosen - r_rejected; reward_mean/std over all chosen and rejected rewards; ECE (Guo et al. "
           "2017) of p = sigmoid(margin).",
           "", f"Truncation: {trunc.get('prompt_truncated', 0)} pairs had the prompt cut, "
           f"{trunc.get('answer_truncated', 0)} an answer cut (max_len {report['max_len']}).", "",
         "## Length bias", "", _length_table(groups), ""])


def _length_table(groups: list[tuple[str, dict]]) -> str:
    """The length-bias rows of report.md, one per group that has them."""
    keys = ("pearson", "spearman", "acc_chosen_longer", "pairs_chosen_longer", "acc_chosen_shorter",
            "pairs_chosen_shorter", "longer_wins_acc")
    cols = ("Pearson r", "Spearman rho", "acc, chosen longer", "pairs", "acc, chosen shorter", "pairs",
            "acc of 'longer wins'")
    rows = [f"| {name} | " + " | ".join(format_number(m["length_bias"].get(k)) for k in keys) + " |"
            for name, m in groups if m.get("length_bias")]
    return "\n".join(["| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols), *rows, "",
                      "Correlation of the reward with the answer's length in tokens over every chosen and rejected "
                      "answer; acc on the pairs whose chosen answer is longer / shorter than the rejected one; the "
                      "acc of the rule 'the longer answer wins' on all pairs (equal lengths count as wrong). A reward "
                      "that follows length has a high acc on the first and a low one on the second."])


def evaluate(scorer, pairs: list, datasets: Sequence[str], output_dir: str, bins: int = 10,
             metrics_path: str | None = None, subset_by: str = "source", progress: bool = True,
             data_report: dict | None = None, heldout: bool = False, benchmark: str | None = None) -> dict:
    """Score ``pairs`` with a :class:`~coati.scoring.RewardScorer` and write the report and plots.

    ``benchmark`` (``"rewardbench"`` or ``"rewardbench2"``) adds the benchmark's subset, section and overall scores
    (:func:`coati.rewardbench.benchmark_scores`) as ``report["benchmark"]`` and its leaderboard row to report.md.

    ``report.json`` and ``pair_scores.jsonl`` are strict JSON (:func:`coati.io.dumps`: no NaN/Infinity literals).

    Returns:
        the ``report.json`` dict (see the module docstring).
    Raises:
        ValueError: no pairs, a bad metrics file, or a non-finite score. FileNotFoundError: ``metrics_path`` missing.
    """
    if not pairs:
        raise ValueError("no preference pairs to evaluate")
    training_rows = read_metrics_jsonl(metrics_path) if metrics_path else None  # fail before scoring
    if benchmark is not None:
        check_rows(benchmark, pairs)
    t0 = time.perf_counter()
    scores = scorer.score_pairs(pairs, progress=progress)
    seconds = time.perf_counter() - t0
    chosen, rejected, lengths = scores.chosen, scores.rejected, scores.lengths
    owners = [pairs[i] for i in scores.owner]  # the row of each comparison
    top1 = {}
    if any(p.more for p in pairs):  # ranked lists: the share of prompts whose best answer scores highest
        top1 = {"prompts": len(pairs), "top1": scores.top1.double().mean().item()}
    bench = None if benchmark is None else benchmark_scores(benchmark, pairs, scores.answer_rewards)
    report = {"model_path": scorer.path, "datasets": list(datasets), "heldout": heldout,
              **({} if bench is None else {"benchmark": bench}),
              **pair_metrics(chosen, rejected, bins, lengths), **top1, "bins": bins,
              "subsets": grouped_metrics(chosen, rejected, [subset_name(p, subset_by) for p in owners], bins,
                                         lengths),
              "languages": grouped_metrics(chosen, rejected, [p.lang for p in owners], bins, lengths),
              "truncation": vars(scores.truncation), "data": data_report or {}, "max_len": scorer.encoder.max_len,
              "chat_template": scorer.chat_template, "seconds": seconds,
              "pairs_per_s": len(pairs) / seconds if seconds > 0 else None}

    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "report.json"), report)
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(report))
    with open(os.path.join(output_dir, "pair_scores.jsonl"), "w", encoding="utf-8") as f:
        for p, c, r, lc, lr in zip(owners, chosen.tolist(), rejected.tolist(), *(x.tolist() for x in lengths)):
            f.write(dumps({"origin": p.origin, "source": p.source, "lang": p.lang, "chosen_reward": c,
                           "rejected_reward": r, "margin": c - r, "chosen_tokens": lc, "rejected_tokens": lr}) + "\n")
    write_plots(chosen, rejected, report, output_dir, lengths)
    if training_rows is not None:
        plot_training_curves(training_rows, os.path.join(output_dir, TRAINING_CURVES))
    return report


def heldout_settings(model_path: str) -> dict:
    """The data settings of the training run that wrote ``model_path``, from its ``train_config.json``: a dict with
    ``dataset``, ``data_dir`` (None in older exports), ``max_samples``, ``strict_data``, ``seed``, ``eval_dataset``,
    ``max_eval_samples``, ``eval_split`` (missing keys take :class:`coati.config.TrainConfig`'s defaults).

    Raises:
        FileNotFoundError: no ``train_config.json``. ValueError: it is not a JSON object, or the run held out no
            pairs (``eval_split`` 0 and no ``eval_dataset``).
    """
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
    defaults = TrainConfig().to_dict()
    settings = {k: stored.get(k, defaults[k]) for k in ("dataset", "data_dir", "max_samples", "strict_data", "seed",
                                                          "eval_dataset", "max_eval_samples", "eval_split",
                                                          "max_responses", "max_text_chars", "max_line_bytes",
                                                          "ties")}
    for key in ("dataset", "eval_dataset"):  # one spec may be stored as a plain string
        if isinstance(settings[key], str):
            settings[key] = [settings[key]]
    if not settings["eval_dataset"] and not (settings["eval_split"] or 0) > 0:
        raise ValueError(f"--heldout: the training run held out no pairs (eval_split {settings['eval_split']} and no "
                         f"eval_dataset in {path}); evaluate with --dataset instead")
    return settings


def heldout_pairs(model_path: str, settings: dict, data_dir: str | None = None, strict: bool = False):
    """The pairs the training run held out, chosen again as the trainer did (:func:`coati.data.sources.select_pairs`)
    from :func:`heldout_settings` ``settings`` of ``model_path``, whose ``summary.json`` ``eval_pairs``, when present,
    must match their count. ``data_dir`` (default ``$COATI_DATA_DIR``) is used when ``settings["data_dir"]`` is unset
    or gone; ``strict``: stop at the first bad row (also when the run itself was strict).

    Returns:
        (pairs, datasets, data_report): the held-out :class:`~coati.data.formats.PreferencePair` list in the
        trainer's order, the dataset specs they come from, and the :class:`~coati.data.sources.DataReport` of the load.
    Raises:
        ValueError: the stored ``data_dir`` is gone and no ``data_dir`` is given, or the data changed since training
            (another held-out count than ``summary.json``'s); as :func:`~coati.data.sources.select_pairs`.
    """
    stored_dir = settings.get("data_dir")
    if stored_dir and not os.path.isdir(stored_dir):
        if not data_dir:
            raise ValueError(f"--heldout: the training run's data_dir {stored_dir} no longer exists; pass --data_dir")
        stored_dir = None
    selection = select_pairs(settings["dataset"], stored_dir or data_dir or default_data_dir(),
                             settings["max_samples"], bool(strict or settings["strict_data"]), settings["seed"],
                             settings["eval_dataset"], settings["max_eval_samples"], settings["eval_split"] or 0.0,
                             settings.get("max_responses"), settings["max_text_chars"], settings["max_line_bytes"],
                             settings["ties"])
    pairs = selection.eval
    summary_path = os.path.join(model_path, "summary.json")
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError):
            summary = None
        summary = summary if isinstance(summary, dict) else {}
        expected, digest = summary.get("eval_pairs"), summary.get("eval_pairs_sha256")
        if isinstance(expected, int) and expected != len(pairs):
            raise ValueError(f"--heldout: {summary_path} counts {expected} held-out pairs but the training settings "
                             f"now select {len(pairs)}: the data changed since training; evaluate with --dataset")
        if isinstance(digest, str) and digest != pairs_digest(pairs):
            raise ValueError(f"--heldout: the {len(pairs)} pairs the training settings now select are not those the "
                             f"run held out (their content differs from the digest in {summary_path}): the data "
                             "changed since training; evaluate with --dataset")
    if not pairs:
        raise ValueError("--heldout: the training settings select no held-out pairs from the data")
    return pairs, list(settings["eval_dataset"] or settings["dataset"]), selection.eval_report or selection.report
