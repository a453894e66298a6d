"""Tests for coati.data.formats and coati.data.sources (fixtures are built in tmp_path; real data is read only)."""
from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from coati.data.formats import (FORMATS, DataFormatError, PreferencePair, detect_format, detect_language,
                                parse_row)
from coati.data.sources import NAMED_DATASETS, default_data_dir, load_pairs, split_eval

DATA_DIR = os.environ.get("COATI_DATA_DIR") or str(Path(__file__).resolve().parents[2].parent / "shared" / "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"real data dir {DATA_DIR} not found")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats

HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour."
HH = {"chosen": HH_PROMPT + "\n\nAssistant: Blue. ", "rejected": HH_PROMPT + "\n\nAssistant: No."}
HH_CN = {"context": [{"role": "human", "text": "你好"}, {"role": "assistant", "text": "你好！有什么可以帮你？"},
                     {"role": "human", "text": "推荐一本书。"}],
         "chosen": {"role": "assistant", "text": "《红楼梦》。"}, "rejected": {"role": "assistant", "text": "不知道。"}}
FLAT = {"prompt": "how to cook t-bone", "chosen": "Oven at 200C.", "rejected": "Boil it.", "margin": 2,
        "metadata": {"score_chosen": 9.0}, "source_index": 7}
UF_HUB = {"source": "evol_instruct", "prompt": "What is 2+2?",
          "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
          "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
          "chosen-rating": 5.0, "rejected-rating": 1.0}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "22"}}
MEDICAL = {"conversations": [{"from": "human", "value": "头痛怎么办？"}], "chosen": "多休息，必要时就医。",
           "rejected": "忍着。", "system": "你是医生。"}
RANKED = {"instruction": "翻译成英文", "input": "你好", "output": ["Hello", "Hi there", "Yo"],
          "history": [["你是谁？", "我是助手。"]]}


def test_hh_rlhf_multi_turn():
    pair = parse_row(HH)
    assert detect_format(HH) == "hh-rlhf"
    assert pair.prompt == [user("Hi there"), assistant("Hello! How can I help?"), user("Name a colour.")]
    assert (pair.chosen, pair.rejected, pair.margin, pair.lang) == ("Blue.", "No.", None, "en")


def test_hh_rlhf_prefixes_differ_uses_chosen_prefix():
    row = {"chosen": "\n\nHuman: A\n\nAssistant: x",
           "rejected": "\n\nHuman: A\n\nAssistant: y\n\nHuman: B\n\nAssistant: z"}
    pair = parse_row(row)
    assert pair.prompt == [user("A")] and (pair.chosen, pair.rejected) == ("x", "z")


def test_hh_rlhf_cn():
    pair = parse_row(dict(HH_CN, margin=1.5))
    assert detect_format(HH_CN) == "hh_rlhf_cn"
    assert pair.prompt == [user("你好"), assistant("你好！有什么可以帮你？"), user("推荐一本书。")]
    assert (pair.chosen, pair.rejected, pair.margin, pair.lang) == ("《红楼梦》。", "不知道。", 1.5, "zh")


def test_flat_strings_extra_keys_and_margin():
    pair = parse_row(FLAT)
    assert detect_format(FLAT) == "prompt_chosen_rejected"
    assert pair == PreferencePair([user("how to cook t-bone")], "Oven at 200C.", "Boil it.", 2.0)
    assert isinstance(pair.margin, float)


def test_flat_ultrafeedback_hub_messages():
    pair = parse_row(UF_HUB)
    assert detect_format(UF_HUB) == "prompt_chosen_rejected"
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ([user("What is 2+2?")], "4", "5", None)


def test_flat_messages_without_prompt_and_with_other_prompt():
    conv = [{"role": "system", "content": "S"}, user("Q1"), assistant("A1"), user("Q2")]
    row = {"chosen": conv + [assistant("good")], "rejected": conv + [assistant("bad")]}
    pair = parse_row(row)
    assert pair.prompt == [{"role": "system", "content": "S"}, user("Q1"), assistant("A1"), user("Q2")]
    assert (pair.chosen, pair.rejected) == ("good", "bad")
    other = parse_row({"prompt": "Context first", "chosen": [user("Q"), assistant("a")],
                       "rejected": [user("Q"), assistant("b")]})
    assert other.prompt == [user("Context first"), user("Q")]
    msgs = parse_row({"prompt": [user("Q")], "chosen": "a", "rejected": "b"})
    assert msgs.prompt == [user("Q")]


def test_sharegpt_pairs_dict_answers():
    pair = parse_row(SHAREGPT)
    assert detect_format(SHAREGPT) == "sharegpt_pairs"
    assert pair.prompt == [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("2+2?")]
    assert (pair.chosen, pair.rejected, pair.margin) == ("4", "22", None)


def test_sharegpt_pairs_string_answers_and_system_key():
    pair = parse_row(MEDICAL)
    assert detect_format(MEDICAL) == "sharegpt_pairs"
    assert pair.prompt == [{"role": "system", "content": "你是医生。"}, user("头痛怎么办？")]
    assert (pair.chosen, pair.rejected, pair.lang) == ("多休息，必要时就医。", "忍着。", "zh")


def test_ranked_outputs():
    pair = parse_row(RANKED)
    assert detect_format(RANKED) == "ranked_outputs"
    assert pair.prompt == [user("你是谁？"), assistant("我是助手。"), user("翻译成英文\n你好")]
    assert (pair.chosen, pair.rejected, pair.margin) == ("Hello", "Hi there", None)
    no_input = parse_row({"instruction": "Say hi", "input": "", "output": ["hi", "no"], "history": []})
    assert no_input.prompt == [user("Say hi")]


def test_registry_and_detection_errors():
    assert list(FORMATS) == ["hh-rlhf", "hh_rlhf_cn", "chosen_rejected_lists", "prompt_chosen_rejected",
                            "sharegpt_pairs", "ranked_outputs", "ranked_list", "completions"]
    assert all(f.name == k and f.description for k, f in FORMATS.items())
    with pytest.raises(DataFormatError, match=r"keys: \['answer', 'question'\].*ranked_outputs"):
        detect_format({"question": "q", "answer": "a"})
    with pytest.raises(DataFormatError, match="JSON object"):
        parse_row(["not", "a", "dict"])
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        parse_row(FLAT, "nope")


@pytest.mark.parametrize("row, fmt, match", [
    ({"prompt": "p", "chosen": "a"}, "prompt_chosen_rejected", "missing key 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, None, "'chosen' must be"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, None, "'prompt' must be a string or a list"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, None, "empty chosen"),
    ({"prompt": "p", "chosen": "a", "rejected": "\n"}, None, "empty rejected"),
    ({"prompt": "p", "chosen": " same", "rejected": "same "}, None, "chosen == rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "high"}, None, "margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, None, "margin"),
    ({"prompt": "p", "chosen": [user("q")], "rejected": "b"}, None, "must end with an assistant message"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "no turns"}, "hh-rlhf", "no '.*Assistant:' turn"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": "\n\nHuman: hi\n\nAssistant: b"}, None, "empty chosen"),
    ({"context": "hi", "chosen": {"role": "assistant", "text": "a"}, "rejected": {"role": "assistant", "text": "b"}},
     None, "'context' must be a list"),
    ({"context": [{"role": "alien", "text": "x"}], "chosen": {"text": "a", "role": "assistant"},
      "rejected": {"text": "b", "role": "assistant"}}, None, "context\\[0\\] has role 'alien'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": 1}, "rejected": "b"},
     None, "string 'content'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
      "rejected": "b"}, None, "must end with an assistant message"),
    ({"instruction": "q", "input": "", "output": ["only one"]}, None, "at least 2"),
    ({"instruction": "q", "output": ["a", "b"], "history": [["only user"]]}, None, "history"),
])
def test_bad_rows(row, fmt, match):
    with pytest.raises(DataFormatError, match=match):
        parse_row(row, fmt)


def test_detect_language():
    assert detect_language("你好，世界") == "zh"
    assert detect_language("The quick brown fox") == "en"
    assert detect_language("") == detect_language("  \n ") == "en"
    assert detect_language("中" + "a" * 9) == "zh"  # exactly 10% of the non-space characters
    assert detect_language("中" + "a" * 10) == "en"
    assert detect_language("中 " + "a " * 9) == "zh"  # spaces do not count


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


@pytest.mark.parametrize("blank", ["", "   ", "\u200b", "\u200b\u200d\ufeff", " \u2060\n"])
def test_an_answer_of_only_invisible_characters_is_empty(blank):
    from coati.data.formats import DataFormatError, is_blank, parse_row

    assert is_blank(blank)
    assert not is_blank("\u200bok")
    with pytest.raises(DataFormatError, match="empty chosen answer"):
        parse_row({"prompt": "Hi", "chosen": blank, "rejected": "Hello."})
    with pytest.raises(DataFormatError, match="empty rejected answer"):
        parse_row({"prompt": "Hi", "chosen": "Hello.", "rejected": blank})


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
