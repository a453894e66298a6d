"""coati.data.sources: files (JSONL, gzip, JSON, Parquet) with bad rows skipped at file:line, sampling, named
datasets in the data dir, the Hub fallback, the content-based eval split, the real data, bounded input (fixtures
are built in tmp_path; real data is read only)."""
from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from coati.data.formats import DataFormatError, PreferencePair
from coati.data.sources import NAMED_DATASETS, default_data_dir, load_pairs, split_eval
from helpers import FLAT, HH, HH_CN, RANKED, SHAREGPT, UF_HUB, user
from helpers import DATA_DIR as SHARED_DATA

DATA_DIR = str(SHARED_DATA)
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"real data dir {DATA_DIR} not found")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- files

def test_jsonl_bad_rows_are_skipped_with_file_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(FLAT).encode(), b"", b"{not json", b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}',
             json.dumps({"prompt": "p", "chosen": "a"}).encode(),
             json.dumps(dict(FLAT, rejected=FLAT["chosen"])).encode(),
             b"   ", json.dumps(UF_HUB).encode(), json.dumps([1, 2]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    pairs, report = load_pairs([str(path)], seed=None)
    src = report.sources[str(path)]
    assert [p.origin for p in pairs] == [f"{path}:1", f"{path}:8"]
    assert all(p.source == str(path) for p in pairs)
    assert (src.rows_read, src.pairs_kept, src.rows_skipped) == (7, 2, 5)
    assert src.skipped[0].startswith(f"{path}:3: invalid JSON")
    assert src.skipped[1].startswith(f"{path}:4: invalid UTF-8")
    assert src.skipped[2].startswith(f"{path}:5: unrecognised row format")
    assert src.skipped[3] == f"{path}:6: chosen == rejected"
    assert src.skipped[4] == f"{path}:9: row must be a JSON object, got list"
    assert report.to_dict()["rows_skipped"] == 5 and "2 pairs kept" in report.summary()
    json.dumps(report.to_dict())
    with pytest.raises(DataFormatError, match=rf"^{path}:3: invalid JSON"):
        load_pairs([str(path)], strict=True)


def test_truncated_gzip_keeps_rows_read(tmp_path):
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i} " + "x" * (i * 37 % 500),
             "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"} for i in range(400)]
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    pairs, report = load_pairs([str(path)], seed=None)
    src = report.sources[str(path)]
    assert 0 < len(pairs) < 400 and src.rows_read == len(pairs) == src.pairs_kept
    assert [p.chosen.split()[1] for p in pairs] == [str(i) for i in range(len(pairs))]
    assert len(src.errors) == 1 and src.errors[0].startswith(f"{path}: truncated gzip after line ")
    assert "error" in report.summary()
    with pytest.raises(DataFormatError, match="truncated gzip"):
        load_pairs([str(path)], strict=True)


def test_json_list_origins_and_bad_items(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([SHAREGPT, "oops", RANKED, dict(RANKED, output=["x"])], indent=2, ensure_ascii=False),
                    encoding="utf-8")
    text_lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i + 1 for i, line in enumerate(text_lines) if line.startswith("  {") or line.startswith('  "oops"')]
    pairs, report = load_pairs([str(path)], seed=None)
    src = report.sources[str(path)]
    assert [p.origin for p in pairs] == [f"{path}:{starts[0]}", f"{path}:{starts[2]}"]
    assert src.formats == {"sharegpt_pairs": 1, "ranked_outputs": 2}
    assert src.skipped == [f"{path}:{starts[1]}: row must be a JSON object, got str",
                           f"{path}:{starts[3]}: 'output' needs at least 2 string answers, got 1 item(s)"]


def test_json_lines_in_a_json_file_and_json_not_a_list(tmp_path):
    lines = write_jsonl(tmp_path / "lines.json", [HH_CN, HH])
    pairs, _ = load_pairs([str(lines)], seed=None)
    assert [p.origin for p in pairs] == [f"{lines}:1", f"{lines}:2"]
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": [FLAT]}, indent=2))
    with pytest.raises(DataFormatError, match=f"{obj}: expected a JSON list"):
        load_pairs([str(obj)])
    num = tmp_path / "num.json"
    num.write_text("42")
    with pytest.raises(DataFormatError, match=f"{num}: expected a JSON list"):
        load_pairs([str(num)])
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": oops}\n]')
    pairs, report = load_pairs([str(broken)])
    assert len(pairs) == 1 and report.sources[str(broken)].errors[0].startswith(f"{broken}:3: invalid JSON")


def test_parquet_with_message_lists(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist([UF_HUB, dict(UF_HUB, rejected=UF_HUB["chosen"])]), path)
    pairs, report = load_pairs([str(path)])
    assert [(p.prompt, p.chosen, p.rejected, p.origin) for p in pairs] == [([user("What is 2+2?")], "4", "5",
                                                                            f"{path}:row 0")]
    assert report.sources[str(path)].skipped == [f"{path}:row 1: chosen == rejected"]


def test_max_samples_seed_and_multiple_specs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(FLAT, chosen=f"good {i}") for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(HH_CN, margin=i) for i in range(5)])
    ordered, report = load_pairs([str(a), str(b)], max_samples=10, seed=None)
    assert [p.origin for p in ordered] == [f"{a}:{i}" for i in range(1, 11)] + [f"{b}:{i}" for i in range(1, 6)]
    assert report.sources[str(a)].rows_read == 10 and report.pairs_kept == 15
    shuffled, _ = load_pairs([str(a), str(b)], max_samples=10, seed=3)
    again, _ = load_pairs([str(a), str(b)], max_samples=10, seed=3)
    assert [p.origin for p in shuffled] == [p.origin for p in again] != [p.origin for p in ordered]
    assert sorted(p.origin for p in shuffled) == sorted(p.origin for p in ordered)
    with pytest.raises(ValueError, match="max_samples"):
        load_pairs([str(a)], max_samples=0)


def test_relative_paths_and_named_datasets_in_data_dir(tmp_path, monkeypatch):
    (tmp_path / "zh").mkdir()
    write_jsonl(tmp_path / "zh" / "hh_rlhf_cn_test.jsonl", [HH_CN])
    write_jsonl(tmp_path / "rel.jsonl", [FLAT])
    pairs, report = load_pairs(["hh-rlhf-cn", "rel.jsonl"], data_dir=str(tmp_path), seed=None)
    assert [(p.source, p.lang) for p in pairs] == [("hh-rlhf-cn", "zh"), (str(tmp_path / "rel.jsonl"), "en")]
    assert report.sources["hh-rlhf-cn"].formats == {"hh_rlhf_cn": 1}
    monkeypatch.setenv("COATI_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    assert load_pairs(["hh-rlhf-cn"])[0][0].chosen == "《红楼梦》。"
    monkeypatch.delenv("COATI_DATA_DIR")
    assert default_data_dir() is None


def test_missing_and_unusable_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"unknown data spec 'nope\.jsonl'.*hh-rlhf.*medical-dpo-zh.*nope"):
        load_pairs(["nope.jsonl"], data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"dpo-en-demo: not found in data dir .*dpo_en_demo\.json.*no Hub id"):
        load_pairs(["dpo-en-demo"], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="is a directory"):
        load_pairs([str(tmp_path)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "a", "rejected": "a", "prompt": "p"}])
    with pytest.raises(ValueError, match=rf"{bad}: no usable preference pairs\n.*1 skipped"):
        load_pairs([str(bad)])


def test_hub_fallback_offline_gives_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # the libraries read these variables at import time; make sure offline mode is on even if already imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # no cached copy
    with pytest.raises(FileNotFoundError) as info:
        load_pairs(["hh-rlhf-cn"], data_dir=str(tmp_path))
    msg = str(info.value)
    assert "hh-rlhf-cn: not found in data dir" in msg and "hh_rlhf_cn*.jsonl" in msg
    assert "could not load 'dikw/hh_rlhf_cn'" in msg and "\n" not in msg


# ---------------------------------------------------------------- split_eval

def _pair(i: int) -> PreferencePair:
    return PreferencePair([user(f"question {i}")], f"good {i}", f"bad {i}")


def test_split_eval_is_content_based():
    pairs = [_pair(i) for i in range(2000)]
    train, held = split_eval(pairs, 0.2)
    assert len(train) + len(held) == 2000 and 340 < len(held) < 460
    shuffled = pairs[::-1]
    random.Random(1).shuffle(shuffled)
    assert {p.chosen for p in split_eval(shuffled, 0.2)[1]} == {p.chosen for p in held}
    moved = [PreferencePair(p.prompt, p.chosen, p.rejected, source="other", origin="x:1") for p in pairs]
    assert [p.chosen for p in split_eval(moved, 0.2)[1]] == [p.chosen for p in held]
    # pinned: the split must not change between processes or versions (sha256, not hash())
    assert [p.chosen for p in split_eval([_pair(i) for i in range(12)], 0.5)[1]] == PINNED
    assert split_eval(pairs, 0.0) == (pairs, []) and split_eval(pairs, 1.0) == ([], pairs)
    with pytest.raises(ValueError):
        split_eval(pairs, 1.5)


PINNED = ["good 0", "good 1", "good 2", "good 3", "good 4", "good 10"]


# ---------------------------------------------------------------- real data

EXPECTED_LANG = {"hh-rlhf": "en", "ultrafeedback": "en", "dpo-en-demo": "en", "dpo-zh-demo": "zh",
                 "oaast-rm-zh": "zh", "medical-dpo-zh": "zh"}


def test_named_registry():
    assert set(NAMED_DATASETS) == set(EXPECTED_LANG) | {"hh-rlhf-cn"}
    assert all(d.name == k and d.local_files and d.description for k, d in NAMED_DATASETS.items())


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_LANG))
def test_real_named_datasets(name):
    pairs, report = load_pairs([name], data_dir=DATA_DIR, max_samples=50, seed=None)
    src = report.sources[name]
    assert len(pairs) == src.pairs_kept == 50 and src.pairs_kept + src.rows_skipped == src.rows_read
    langs = Counter(p.lang for p in pairs)
    assert langs[EXPECTED_LANG[name]] >= 45, langs
    assert all(p.source == name and p.chosen and p.rejected and p.chosen != p.rejected for p in pairs)
    assert pairs[0].origin.startswith(os.path.join(DATA_DIR, ""))


@pytest.fixture(scope="module")
def hh_full():
    if not os.path.isdir(DATA_DIR):
        pytest.skip(f"real data dir {DATA_DIR} not found")
    return load_pairs(["hh-rlhf"], data_dir=DATA_DIR, seed=None)


def test_real_hh_rlhf_full(hh_full):
    pairs, report = hh_full
    src = report.sources["hh-rlhf"]
    assert len(src.files) == 4 and src.rows_read == 8552
    assert src.pairs_kept + src.rows_skipped == src.rows_read and len(pairs) == src.pairs_kept
    assert src.rows_skipped < 100 and src.formats == {"hh-rlhf": 8552}
    print(f"\nhh-rlhf: {src.rows_read} read, {src.pairs_kept} kept, {src.rows_skipped} skipped")
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in pairs[:500])


def test_real_hh_rlhf_split_eval(hh_full):
    pairs, _ = hh_full
    train, held = split_eval(pairs, 0.1)
    assert len(train) + len(held) == len(pairs) and abs(len(held) / len(pairs) - 0.1) < 0.015
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    assert sorted(p.origin for p in split_eval(shuffled, 0.1)[1]) == sorted(p.origin for p in held)


# ------------------------------------------------------------------------------------------- bounded input

def test_a_line_past_max_line_bytes_is_skipped_without_being_held(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.jsonl.gz"
    good = json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}).encode()
    with gzip.open(path, "wb", compresslevel=1) as f:  # one 24 MB line between two good rows
        f.write(good + b"\n" + b'{"prompt": "q", "chosen": "' + b"a" * (24 << 20) + b'", "rejected": "b"}\n'
                + good + b"\n")
    tracemalloc.start()
    try:
        pairs, report = load_pairs([str(path)], max_line_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(pairs) == 2 and peak < 8 << 20, peak
    src = report.sources[str(path)]
    assert (src.rows_read, src.rows_skipped) == (3, 1)
    assert src.skipped == [f"{path}:2: line longer than --max_line_bytes 1048576"]


def test_a_text_past_max_text_chars_is_skipped_and_counted(tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "q", "chosen": "x" * 101, "rejected": "no"},
            {"prompt": [{"role": "user", "content": "y" * 101}], "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "fine", "rejected": "x" * 100}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = load_pairs([str(path)], max_text_chars=100)
    assert len(pairs) == 1 and pairs[0].chosen == "fine"
    assert report.sources[str(path)].skipped == [
        f"{path}:1: answer 0 has 101 characters, more than --max_text_chars 100",
        f"{path}:2: prompt message 0 has 101 characters, more than --max_text_chars 100"]


def test_an_eval_split_that_holds_out_nothing_is_refused(tmp_path):
    from coati.data.sources import select_pairs

    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n"
                            for i in range(5)))
    with pytest.raises(ValueError, match=r"--eval_split 0.001 held out none of the 5 pairs: raise it, or set 0"):
        select_pairs([str(path)], None, eval_split=0.001)
    assert len(select_pairs([str(path)], None, eval_split=0.0).train) == 5
