"""coati.evaluate: scoring in the training layout, per-subset / per-language report, plots, CLI.

The metric formulas themselves are checked against hand-computed values in test_metrics.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_model

from coati.checkpoint.export import export_hf
from coati.data.sources import load_pairs
from coati.data.template import tokenize_pairs
from coati.cli.evaluate import main
from coati.evaluation import PLOTS, TRAINING_CURVES
from coati.metrics import length_bias, pair_metrics
from coati.models.loading import load_tokenizer
from coati.models.backbones import get_backbone
from coati.models.reward_model import RewardModel
from coati.scoring import RewardScorer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EN_ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London, I think."},
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Purple is primary."},
    {"prompt": "How many legs does a spider have?", "chosen": "Eight.", "rejected": "Six."},
]
ZH_ROWS = [
    {"prompt": "中国的首都是哪里？", "chosen": "北京。", "rejected": "上海。"},
    {"prompt": "一年有几个月？", "chosen": "十二个月。", "rejected": "十个月。"},
]
MIXED_ROWS = [  # one English, one Chinese row in a second file
    {"prompt": "Is water wet?", "chosen": "It makes things wet.", "rejected": "No."},
    {"prompt": "你好吗？", "chosen": "我很好，谢谢。", "rejected": "不知道。"},
]
METRICS_ROWS = [
    {"step": 1, "split": "train", "loss": 0.70, "acc": 0.40, "dist": -0.01},
    {"step": 2, "split": "train", "loss": 0.65, "acc": 0.55, "dist": 0.05},
    {"step": 2, "split": "eval", "loss": 0.68, "acc": 0.50, "dist": 0.02, "languages": {}},
    {"step": 3, "split": "train", "loss": 0.60, "acc": 0.70, "dist": 0.12},
    {"step": 4, "split": "train", "loss": 0.52, "acc": 0.80, "dist": 0.20},
    {"step": 4, "split": "eval", "loss": 0.61, "acc": 0.65, "dist": 0.10},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def export(tokenizer, tmp_path_factory):
    """(folder, in-memory model) of a perturbed tiny LLaMA exported like the trainer does."""
    hf = tiny_model("llama", tokenizer)
    _perturb(hf)
    path = tmp_path_factory.mktemp("rm_eval")
    export_hf(hf, tokenizer, str(path), {"model": "llama", "max_len": 64, "chat_template": "auto"},
              extra_config={"reward_token_id": tokenizer.eos_token_id})
    return path, hf


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    a = _write_jsonl(root / "a.jsonl", EN_ROWS + ZH_ROWS)
    b = _write_jsonl(root / "b.jsonl", MIXED_ROWS)
    m = _write_jsonl(root / "metrics.jsonl", METRICS_ROWS)
    return a, b, m


def _check_png(path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg

    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))  # a real plot, not an empty canvas
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank image


# --------------------------------------------------------------------------- scoring = training evaluation

def test_score_pairs_equal_trainer_layout(export, tokenizer, data_files):
    path, hf = export
    scorer = RewardScorer.from_pretrained(str(path), device="cpu", batch_size=3)
    pairs, _ = load_pairs([str(data_files[0])], seed=None)
    scores = scorer.score_pairs(pairs)
    chosen, rejected = scores.chosen, scores.rejected
    assert chosen.shape == rejected.shape == (len(pairs),) and chosen.dtype == torch.float32
    # the trainer's evaluation: tokenize_pairs with the train config's max_len / chat template, collate, RewardModel
    from coati.data.template import SequenceEncoder, use_chat_template

    items, _ = tokenize_pairs(pairs, SequenceEncoder(tokenizer, 64, tokenizer.eos_token_id),
                              use_chat_template(tokenizer, "auto"))
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]  # one batch, chosen then rejected
    ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        rewards = RewardModel(hf, get_backbone("llama")).eval()(ids, mask)
    n = len(pairs)
    assert torch.allclose(chosen, rewards[:n], atol=1e-5) and torch.allclose(rejected, rewards[n:], atol=1e-5)


# --------------------------------------------------------------------------- report, languages, plots

def test_report_languages_subsets_and_plots(export, data_files, tmp_path, capsys):
    path, _ = export
    a, b, metrics = data_files
    out = tmp_path / "report"
    rc = main(["--model_path", str(path), "--dataset", str(a), str(b), "--output_dir", str(out), "--metrics",
               str(metrics), "--batch_size", "4", "--bins", "5", "--disable_tqdm"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key in ("acc", "dist", "ece", "reward_mean", "reward_std", "pairs", "subsets", "languages",
                "calibration", "truncation"):
        assert key in report, key
    assert report["pairs"] == 7 and report["bins"] == 5 and len(report["calibration"]) == 5
    assert {k: v["pairs"] for k, v in report["languages"].items()} == {"en": 4, "zh": 3}
    assert {k: v["pairs"] for k, v in report["subsets"].items()} == {str(a): 5, str(b): 2}
    # overall metrics are the pair-weighted combination of the language groups
    langs = report["languages"]
    acc = sum(v["acc"] * v["pairs"] for v in langs.values()) / 7
    dist = sum(v["dist"] * v["pairs"] for v in langs.values()) / 7
    assert report["acc"] == pytest.approx(acc) and report["dist"] == pytest.approx(dist)
    scores = [json.loads(line) for line in (out / "pair_scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(scores) == 7 and sum(s["lang"] == "zh" for s in scores) == 3
    assert report["acc"] == pytest.approx(sum(s["chosen_reward"] > s["rejected_reward"] for s in scores) / 7)
    # report.json holds coati.metrics.pair_metrics of the scores it wrote to pair_scores.jsonl, per language too
    chosen = torch.tensor([s["chosen_reward"] for s in scores], dtype=torch.float64)
    rejected = torch.tensor([s["rejected_reward"] for s in scores], dtype=torch.float64)
    assert [s["margin"] for s in scores] == (chosen - rejected).tolist()
    expected = pair_metrics(chosen, rejected, bins=5)
    for key in ("acc", "dist", "dist_std", "chosen_reward", "rejected_reward", "reward_mean", "reward_std", "ece"):
        assert report[key] == pytest.approx(expected[key], abs=1e-12), key
    zh = torch.tensor([s["lang"] == "zh" for s in scores])
    assert langs["zh"]["dist"] == pytest.approx(pair_metrics(chosen[zh], rejected[zh])["dist"], abs=1e-12)
    # the length-bias block: the answers' own token counts (the tokenizer's, no special tokens), overall and per group
    pairs, _ = load_pairs([str(a), str(b)], seed=None)
    tok = load_tokenizer(str(path))
    count = [[len(tok(t, add_special_tokens=False).input_ids) for t in (p.chosen, p.rejected)]
             for p in pairs]
    assert [[s["chosen_tokens"], s["rejected_tokens"]] for s in scores] == count
    lc, lr = (torch.tensor([c[k] for c in count]) for k in (0, 1))
    assert report["length_bias"] == pytest.approx(length_bias(chosen, rejected, lc, lr), abs=1e-12)
    assert langs["zh"]["length_bias"] == pytest.approx(length_bias(chosen[zh], rejected[zh], lc[zh], lr[zh]),
                                                       abs=1e-12)
    assert report["length_bias"]["longer_wins_acc"] == sum(x > y for x, y in count) / 7
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "lang `zh`" in md and "lang `en`" in md and "**all**" in md
    assert "| group | pairs | accuracy | margin | chosen_reward |" in md  # human labels of acc / dist
    assert f"| **all** | 7 | {report['acc']:.4f} | {report['dist']:.4f} |" in md
    bias = report["length_bias"]
    assert "## Length bias" in md and f"| **all** | {bias['pearson']:.4f} | {bias['spearman']:.4f} |" in md
    for name in PLOTS + (TRAINING_CURVES,):
        _check_png(out / name)
    summary = capsys.readouterr().out
    assert "7 pairs: acc" in summary and "lang zh: 3 pairs" in summary
    assert f"'the longer wins' alone: {bias['longer_wins_acc']:.3f}" in summary

    # --subset_by file names subsets after the files; no --metrics -> no training curves
    out2 = tmp_path / "by_file"
    assert main(["--model_path", str(path), "--dataset", str(a), "--output_dir", str(out2), "--subset_by", "file",
                 "--disable_tqdm"]) == 0
    report2 = json.loads((out2 / "report.json").read_text(encoding="utf-8"))
    assert list(report2["subsets"]) == ["a.jsonl"]
    assert not (out2 / TRAINING_CURVES).exists()


def test_training_curves_from_metrics_fixture(data_files, tmp_path):
    from coati.evaluation import plot_training_curves, read_metrics_jsonl

    rows = read_metrics_jsonl(str(data_files[2]))
    assert len(rows) == 6
    _check_png(plot_training_curves(rows, str(tmp_path / "curves.png")))
    with pytest.raises(ValueError):
        plot_training_curves([{"split": "train"}], str(tmp_path / "none.png"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_metrics_jsonl(str(bad))


# --------------------------------------------------------------------------- CLI errors and smoke

def test_cli_user_errors_exit_2(export, data_files, tmp_path, capsys):
    path, _ = export
    a = str(data_files[0])
    cases = [
        ["--model_path", str(tmp_path / "nope"), "--dataset", a],
        ["--model_path", str(path), "--dataset", str(tmp_path / "missing.jsonl")],
        ["--model_path", str(path), "--dataset", a, "--metrics", str(tmp_path / "missing_metrics.jsonl")],
    ]
    for argv in cases:
        assert main(argv + ["--output_dir", str(tmp_path / "o"), "--disable_tqdm"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    # a bad number stops at parse time (argparse: usage line + one error line, exit code 2)
    with pytest.raises(SystemExit) as info:
        main(["--model_path", str(path), "--dataset", a, "--bins", "0", "--output_dir", str(tmp_path / "o")])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("argument --bins: must be an integer >= 1, got '0'")
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_smoke_subprocess(export, data_files, tmp_path):
    path, _ = export
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "coati.evaluate", "--model_path", str(path), "--dataset",
                           str(data_files[0]), str(data_files[1]), "--output_dir", str(out), "--metrics",
                           str(data_files[2]), "--max_samples", "4"],
                          check=False, capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 6  # 4 from the first file, 2 from the second
    for name in ("report.md",) + PLOTS + (TRAINING_CURVES,):
        assert (out / name).stat().st_size > 0, name
    assert "pairs: acc " in proc.stdout
