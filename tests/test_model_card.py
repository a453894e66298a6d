"""The export's README.md model card: Hub front matter, the summary's figures in its tables, hostile names, and one
tiny training run that writes it."""

import json
import os
import stat

import pytest
import yaml

from coati.config import TrainConfig
from coati.model_card import md_text, render_model_card

RECIPE = dict(TrainConfig().to_dict(), model="llama", pretrain="smollm2-135m", dataset=["hh-rlhf", "oaast-rm-zh"],
              eval_split=0.1, lr=1e-5, lora_rank=16, max_len=512, mixed_precision="bf16", save_path="/scratch/me/rm")


def _metrics(pairs, acc, dist):
    return {"pairs": pairs, "acc": acc, "dist": dist, "loss": 0.6, "reward_mean": 0.1, "reward_std": 1.0}


SUMMARY = {
    "steps": 120, "total_steps": 120, "stopped_by_time": False, "train_pairs": 900, "eval_pairs": 100,
    "world_size": 2,
    "eval": dict(_metrics(100, 0.61234, 0.123456), step=120, split="eval",
                 languages={"en": _metrics(40, 0.575, 0.05), "zh": _metrics(60, 0.63333333, -0.01236)},
                 subsets={"hh-rlhf": _metrics(40, 0.575, 0.05), "oaast-rm-zh": _metrics(60, 0.63333333, -0.01236)}),
    "data": {"rows_read": 1010, "pairs_kept": 1000, "rows_skipped": 10,
             "sources": {"hh-rlhf": {"rows_read": 500, "pairs_kept": 493, "rows_skipped": 7, "errors": []},
                         "oaast-rm-zh": {"rows_read": 510, "pairs_kept": 507, "rows_skipped": 3, "errors": []}}},
}


def _split(card: str) -> tuple[dict, str]:
    """(front matter as loaded by yaml.safe_load, Markdown body)."""
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end]), card[end + 5:]


def _cells(line: str) -> list[str]:
    """Cells of a Markdown table row, split at pipes not escaped by a backslash, escapes kept."""
    cells, cell, i = [], "", 0
    while i < len(line):
        if line[i] == "\\":
            cell, i = cell + line[i:i + 2], i + 2
            continue
        if line[i] == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += line[i]
        i += 1
    cells.append(cell.strip())
    assert cells[0] == "" and cells[-1] == "", line  # a row starts and ends with a pipe
    return cells[1:-1]


def _tables(body: str) -> dict[str, list[list[str]]]:
    """Every table of the body by its first header cell: rows of cells (header and alignment row left out), each
    row checked to have as many cells as the header."""
    tables, block = {}, []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            block.append(_cells(line))
            continue
        if block:
            header, align, *rows = block
            assert all(set(a) <= set("-:") for a in align) and len(align) == len(header)
            assert all(len(r) == len(header) for r in rows), block
            tables[header[0]] = rows
            block = []
    return tables


def test_front_matter_loads_with_the_hub_fields():
    meta, body = _split(render_model_card(RECIPE, SUMMARY, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"))
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                    "library_name": "transformers", "pipeline_tag": "text-classification",
                    "tags": ["reward-model", "coati"], "datasets": ["hh-rlhf", "oaast-rm-zh"], "language": ["en", "zh"]}
    assert "AutoModelForSequenceClassification" in body and "logits[:, 0]" in body and "num_labels=1" in body


def test_tables_hold_the_summary_figures():
    _, body = _split(render_model_card(RECIPE, SUMMARY, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"))
    tables = _tables(body)
    final = SUMMARY["eval"]
    assert tables[""] == [["**all**", "100", f"{final['acc']:.4f}", f"{final['dist']:.4f}"]]
    assert tables[""] == [["**all**", "100", "0.6123", "0.1235"]]  # 4 decimals, rounded
    for key, title in (("languages", "language"), ("subsets", "subset")):
        assert tables[title] == [[md_text(name), str(m["pairs"]), f"{m['acc']:.4f}", f"{m['dist']:.4f}"]
                                 for name, m in final[key].items()]
    assert tables["language"][1] == ["zh", "60", "0.6333", "-0.0124"]
    data = SUMMARY["data"]
    assert tables["dataset"] == [[md_text(n), str(s["rows_read"]), str(s["pairs_kept"]), str(s["rows_skipped"])]
                                 for n, s in data["sources"].items()] + \
        [["**all**", str(data["rows_read"]), str(data["pairs_kept"]), str(data["rows_skipped"])]]
    recipe = dict(tables["setting"])
    assert recipe["learning rate"] == "1e-05" and recipe["max_len"] == "512" and recipe["precision"] == "bf16"
    assert recipe["LoRA"].startswith("rank 16,") and recipe["steps"] == "120" and "`log_sig`" == recipe["loss"]
    assert "`smollm2-135m`" in recipe["model"] and recipe["pairs"] == "900 train, 100 held out"
    # only flags away from their defaults, and never where the run was written
    assert dict(tables["flag"]) == {"`--eval_split`": "0.1"}


def test_no_evaluation_is_said_and_no_language_guessed():
    summary = dict(SUMMARY, eval={}, eval_pairs=0)
    meta, body = _split(render_model_card(dict(RECIPE, pretrain=None), summary))
    assert "There was no held-out evaluation" in body and "language" not in _tables(body)
    assert "base_model" not in meta and "license" not in meta and "language" not in meta
    assert "randomly initialised" in body


def test_gemma_names_its_terms_and_a_local_base_stays_out_of_the_metadata(tmp_path):
    meta, body = _split(render_model_card(dict(RECIPE, pretrain="gemma3-270m"), SUMMARY, "google/gemma-3-270m",
                                          "gemma"))
    assert meta["base_model"] == "google/gemma-3-270m" and meta["license"] == "gemma"
    assert "Gemma Terms of Use" in body
    folder = tmp_path / "my" / "model"  # exists here, so it is not a Hub id even though it looks like one
    folder.mkdir(parents=True)
    for base in (str(folder), "weights/model.gguf"):
        meta, body = _split(render_model_card(dict(RECIPE, pretrain=base), SUMMARY, base, None))
        assert "base_model" not in meta and "license" not in meta and "did not record the license" in body


def test_hostile_names_break_neither_yaml_nor_tables():
    evil = ["a|b\nc | d", "---", "x\u2028y\x85z", "`tick` *star* <b>html</b> [l](u) \\|", "yes", "1e-3"]
    recipe = dict(RECIPE, dataset=evil, pretrain="dir|with\npipe")
    summary = dict(SUMMARY, data={"rows_read": 6, "pairs_kept": 6, "rows_skipped": 0, "sources": {
        name: {"rows_read": 1, "pairs_kept": 1, "rows_skipped": 0} for name in evil}})
    summary["eval"] = dict(SUMMARY["eval"], subsets={name: _metrics(1, 1.0, 0.5) for name in evil})
    card = render_model_card(recipe, summary, "dir|with\npipe", None)
    meta, body = _split(card)
    assert meta["datasets"] == evil  # exactly, each one a string
    assert [i for i, line in enumerate(card.splitlines()) if line == "---"] == [0, card[:card.index("\n---\n") + 1]
                                                                               .count("\n")]  # the two delimiters
    tables = _tables(body)  # every row has as many cells as its header
    folded = ["a\\|b c \\| d", "---", "x y z", "\\`tick\\` \\*star\\* \\<b\\>html\\</b\\> \\[l\\](u) \\\\\\|", "yes",
              "1e-3"]
    assert [r[0] for r in tables["dataset"][:-1]] == [r[0] for r in tables["subset"]] == folded
    assert "<b>" not in body and not [line for line in body.splitlines() if line.startswith(("c ", "y", "z"))]


def test_export_hf_refuses_a_path_as_a_file_name(tokenizer, tmp_path):
    from coati.checkpoint.export import export_hf
    from helpers import tiny_model

    with pytest.raises(ValueError, match="not a plain file name"):
        export_hf(tiny_model("llama", tokenizer), tokenizer, str(tmp_path / "rm"), extra_text={"../README.md": "x"})
    assert not (tmp_path / "rm").exists() and not (tmp_path / "README.md").exists()


def test_training_writes_the_card_with_the_summary_figures(tmp_path):
    from coati.cli.train import main

    out = tmp_path / "rm"
    assert main(["--model", "llama", "--model_config", "tiny", "--strategy", "naive", "--dataset", "hh-rlhf",
                 "dpo-zh-demo", "--max_samples", "12", "--max_len", "64", "--batch_size", "4", "--max_steps", "1",
                 "--eval_split", "0.25", "--disable_tqdm", "--save_path", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    meta, body = _split((out / "README.md").read_text(encoding="utf-8"))
    assert meta["datasets"] == ["hh-rlhf", "dpo-zh-demo"] and meta["library_name"] == "transformers"
    assert "reward-model" in meta["tags"] and "base_model" not in meta  # random init: no base model
    assert meta["language"] == list(summary["eval"]["languages"])
    tables = _tables(body)
    final = summary["eval"]
    assert final["pairs"] > 0 and tables[""][0][1:] == [str(final["pairs"]), f"{final['acc']:.4f}",
                                                        f"{final['dist']:.4f}"]
    assert {r[0]: r[2] for r in tables["language"]} == {k: f"{m['acc']:.4f}" for k, m in final["languages"].items()}
    # training's evaluation reports each dataset apart, and the card shows it
    assert set(final["subsets"]) <= {"hh-rlhf", "dpo-zh-demo"} and sum(m["pairs"] for m in final["subsets"].values()) \
        == final["pairs"]
    assert {r[0]: r[1] for r in tables["subset"]} == {k: str(m["pairs"]) for k, m in final["subsets"].items()}
    assert [r[2] for r in tables["dataset"][:-1]] == [str(s["pairs_kept"]) for s in summary["data"]["sources"].values()]
    mode = stat.S_IMODE(os.stat(out / "README.md").st_mode)
    assert mode & 0o044 == 0o044 and not [n for n in os.listdir(out) if n.startswith(".export")]
