"""coati.data.formats: each row layout parsed into a PreferencePair, format detection and its errors, bad rows, the
language of a text, blank answers."""

import pytest

from coati.data.formats import (FORMATS, DataFormatError, PreferencePair, detect_format, detect_language,
                                parse_row)
from helpers import FLAT, HH, HH_CN, MEDICAL, RANKED, SHAREGPT, UF_HUB, assistant, user


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


@pytest.mark.parametrize("blank", ["", "   ", "\u200b", "\u200b\u200d\ufeff", " \u2060\n"])
def test_an_answer_of_only_invisible_characters_is_empty(blank):
    from coati.data.formats import DataFormatError, is_blank, parse_row

    assert is_blank(blank)
    assert not is_blank("\u200bok")
    with pytest.raises(DataFormatError, match="empty chosen answer"):
        parse_row({"prompt": "Hi", "chosen": blank, "rejected": "Hello."})
    with pytest.raises(DataFormatError, match="empty rejected answer"):
        parse_row({"prompt": "Hi", "chosen": "Hello.", "rejected": blank})
