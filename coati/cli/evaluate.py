"""Evaluate an exported reward model on preference pairs: metrics, calibration, a report and plots.

Usage::

    python -m coati.evaluate --model_path out/rm --dataset hh-rlhf dpo-zh-demo --max_samples 500 \\
        --output_dir out/rm/eval --metrics out/rm/metrics.jsonl

``--dataset`` accepts every spec the trainer accepts (named datasets, local files, Hub ids; see
:func:`coati.data.sources.load_pairs`). Instead, ``--heldout`` evaluates exactly the pairs the training run held out
(its ``--eval_split`` or ``--eval_dataset``), re-selected from ``<model_path>/train_config.json`` by
:func:`heldout_pairs`; give exactly one of the two. Pairs are scored with :class:`coati.scoring.RewardScorer`, i.e.
in exactly the training layout. Metrics (:func:`coati.metrics.pair_metrics`, as in the trainer's metrics.jsonl)
are given overall, per subset (``pair.source``, the dataset spec, with ``--subset_by file`` its file, with
``--subset_by subset`` the rows' own ``subset`` field) and per language (``pair.lang``: ``en`` / ``zh``).

``--format rewardbench`` / ``rewardbench2`` reads local files in the RewardBench v1 / RewardBench 2 layout and adds
their leaderboard scores (per subset, per section, overall; ties at the top shared) from
:mod:`coati.rewardbench`, printed and in ``report.json`` ``benchmark`` and ``report.md``, beside the pairwise figures
above over every chosen-rejected comparison. Each response is scored once.

Outputs in ``--output_dir`` (default ``<model_path>/eval``):

* ``report.json`` (strict JSON: a value that is not a finite number is null): ``model_path``, ``datasets``,
  ``heldout`` (whether the pairs are the training run's held-out pairs), ``pairs``, ``acc`` (share of pairs with
  r_chosen > r_rejected), ``dist`` (mean r_chosen - r_rejected), ``dist_std``, ``chosen_reward``, ``rejected_reward``,
  ``reward_mean``, ``reward_std``, ``ece``, ``bins``, ``calibration`` (per bin: ``lo``, ``hi``, ``count``, ``acc``,
  ``confidence``), ``length_bias`` (:func:`coati.metrics.length_bias`: Pearson and Spearman correlation of the reward
  with the answer's length in tokens, acc on the pairs whose chosen answer is longer / shorter, and the acc of the
  length-only rule "the longer answer wins"), ``subsets`` ``{name: {same metric keys}}``, ``languages``
  ``{lang: {...}}``, ``truncation``,
  ``data`` (rows read / skipped per source), ``max_len``, ``chat_template``, ``seconds``, ``pairs_per_s``;
* ``report.md``: the same as a table (``acc`` labelled "accuracy", ``dist`` "margin");
* ``pair_scores.jsonl``: one row per pair (``origin``, ``source``, ``lang``, ``chosen_reward``, ``rejected_reward``,
  ``margin`` = r_chosen - r_rejected of that pair, ``chosen_tokens``, ``rejected_tokens``: the answers' lengths),
  e.g. for data filtering;
* PNG plots: ``margin_hist.png``, ``accuracy_by_subset.png``, ``reward_distributions.png``, ``calibration.png``,
  ``reward_vs_length.png`` (every answer's reward against its length in tokens, chosen and rejected apart), and
  ``training_curves.png`` when ``--metrics`` (a training ``metrics.jsonl``) is given.

User errors (missing model folder or dataset, bad flags or metrics file, an ``--output_dir`` that cannot be created
or written or an unusable ``--device``, both checked before the model loads, a model with NaN/inf weights, a
non-finite score, ``--heldout`` without held-out pairs) print one ``error: ...`` line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from coati.cli.options import (DefaultsOnceHelpFormatter, add_model_options, check_output_target, checked,
                               user_errors_exit)
from coati.config import COUNT
from coati.evaluation import evaluate, format_number as fmt, heldout_pairs, heldout_settings
from coati.rewardbench import VERSIONS, check_rows, leaderboard_table


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m coati.evaluate`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m coati.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--model_path", required=True,
                   help="exported reward model folder (train_reward_model.py --save_path)")
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
                   help="at most N pairs per dataset (first N in file order; not with --heldout)")
    p.add_argument("--strict_data", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--output_dir", default=None, help="where the report and plots go (default: <model_path>/eval)")
    p.add_argument("--metrics", default=None, help="a training metrics.jsonl: also plot training_curves.png")
    p.add_argument("--bins", type=checked(int, COUNT), default=10, help="equal-width confidence bins for the ECE")
    p.add_argument("--format", choices=("pairs",) + VERSIONS, default="pairs",
                   help="pairs: any training data format; rewardbench / rewardbench2: local files in the layout of "
                        "RewardBench v1 / RewardBench 2, scored per subset and section as their leaderboards do")
    p.add_argument("--subset_by", choices=("source", "file", "subset"), default=None,
                   help="subsets: the dataset spec of each pair, the file it came from, or the rows' own 'subset' "
                        "field (default: subset with a RewardBench --format, else source)")
    return add_model_options(p)


def run(args) -> dict:
    """Check the options, load model and data, evaluate, print a short summary; returns the report.

    Raises:
        ValueError / OSError: user errors (see the module docstring); option, ``--output_dir``, ``--device`` and
        ``--heldout`` settings errors come before the model loads.
    """
    from coati.data.sources import default_data_dir, load_pairs
    from coati.scoring import RewardScorer, resolve_device

    if bool(args.dataset) == bool(args.heldout):
        raise ValueError("give --dataset (the pairs to evaluate) or --heldout (the pairs the training run held out)"
                         + (", not both" if args.heldout else ""))
    benchmark = None if args.format == "pairs" else args.format
    if benchmark and args.heldout:
        raise ValueError(f"--format {benchmark} reads the benchmark's files given with --dataset, not --heldout")
    if args.heldout and args.max_samples is not None:
        raise ValueError("--max_samples applies to --dataset; --heldout takes the training run's own settings")
    if args.metrics and not os.path.isfile(args.metrics):
        raise FileNotFoundError(f"--metrics {args.metrics}: no such file")
    output_dir = args.output_dir or os.path.join(args.model_path, "eval")
    check_output_target("--output_dir", output_dir, folder=True)
    device = resolve_device(args.device)
    settings = heldout_settings(args.model_path) if args.heldout else None
    if settings is not None:
        pairs, datasets, data_report = heldout_pairs(args.model_path, settings, args.data_dir, args.strict_data)
    else:
        datasets = args.dataset
        pairs, data_report = load_pairs(args.dataset, args.data_dir or default_data_dir(), args.max_samples,
                                        args.strict_data, seed=None)
    if benchmark:
        check_rows(benchmark, pairs)  # before the model loads
    scorer = RewardScorer.from_pretrained(args.model_path, device=device, dtype=getattr(torch, args.dtype),
                                          max_len=args.max_len, batch_size=args.batch_size,
                                          load_in_4bit=args.load_in_4bit, layout=args.layout)
    if data_report.rows_skipped:
        print(data_report.summary(), file=sys.stderr)
    report = evaluate(scorer, pairs, datasets, output_dir, bins=args.bins, metrics_path=args.metrics,
                      subset_by=args.subset_by or ("subset" if benchmark else "source"),
                      progress=not args.disable_tqdm, data_report=data_report.to_dict(), heldout=bool(args.heldout),
                      benchmark=benchmark)
    if benchmark:
        bench = report["benchmark"]
        print(leaderboard_table(bench, args.model_path))
        for name, m in bench["subsets"].items():
            print(f"  {name}: {m['prompts']} prompts, {100 * m['score']:.1f}")
        if bench["unmapped"]:
            print(f"  not in the Score (outside the official mapping): {', '.join(bench['unmapped'])}")
        print(f"  ties at the top (shared): {bench['ties_at_top']} prompts")
    print(f"{report['pairs']} {'held-out ' if args.heldout else ''}pairs: acc {report['acc']:.4f}, "
          f"dist {report['dist']:.4f}, reward mean {report['reward_mean']:.4f} std {report['reward_std']:.4f}, "
          f"ECE {report['ece']:.4f}")
    for title, groups in (("subset", report["subsets"]), ("lang", report["languages"])):
        for name, m in groups.items():
            print(f"  {title} {name}: {m['pairs']} pairs, acc {m['acc']:.4f}, dist {m['dist']:.4f}, "
                  f"ECE {m['ece']:.4f}")
    bias = report["length_bias"]
    print(f"  length bias: reward-length Pearson {fmt(bias['pearson'], 3)}, Spearman {fmt(bias['spearman'], 3)}; "
          f"acc {fmt(bias['acc_chosen_longer'], 3)} when the chosen answer is longer "
          f"({bias['pairs_chosen_longer']} pairs), {fmt(bias['acc_chosen_shorter'], 3)} when it is shorter "
          f"({bias['pairs_chosen_shorter']}); 'the longer wins' alone: {fmt(bias['longer_wins_acc'], 3)}")
    print(f"report and plots in {output_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry; user errors become one ``error: ...`` line on stderr and exit code 2."""
    return user_errors_exit(run, build_parser().parse_args(argv))  # DataFormatError is a ValueError


if __name__ == "__main__":
    sys.exit(main())
