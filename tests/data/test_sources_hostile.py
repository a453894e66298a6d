"""Property-based tests over hostile rows and files: :func:`load_pairs` never crashes with an unexplained exception,
accounts for every non-blank line, keeps only well-formed pairs, and points at ``file:line`` in strict mode.

Every file is written under a :mod:`tempfile` folder (hypothesis and function-scoped ``tmp_path`` do not mix). The
number of hostile rows tried is printed at the end of the module as ``HOSTILE_ROWS_TRIED=N``.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from coati.config import MAX_LINE_BYTES, MAX_TEXT_CHARS
from coati.data.formats import MAX_DATA_NUMBER, DataFormatError, PreferencePair, parse_row
from coati.data.sources import _MAX_SKIP_MESSAGES, load_pairs, split_eval

TRIED = {"rows": 0, "files": 0}
MAX_MESSAGE = 600  # a skip message stays short whatever the row holds (path + reason + shortened values)


SCALE = float(os.environ.get("COATI_HOSTILE_SCALE", "1"))  # e.g. 20 for a longer bug hunt


def _settings(n: int):
    # database=None: no example database in the checkout
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _report_rows_tried(request):
    yield
    line = f"HOSTILE_ROWS_TRIED={TRIED['rows']} (in {TRIED['files']} files)"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capman is not None and reporter is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)
    else:
        print(line)


# ---------------------------------------------------------------- strategies

# strings: ordinary, empty / whitespace-only, format markers, CJK, NUL, lone surrogates (JSON "\ud800" escapes)
SPECIAL_TEXT = ["", " ", "\n\t ", "\u3000", "\xa0", "a", "b", "Assistant:", "\n\nAssistant: hi", "Human: q",
                "\n\nHuman: q\n\nAssistant: a", "你好", "\x00", "\ud800", "x\udfffy", "\ufeff", "null", "{}", "[]"]
texts = st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_TEXT),
                  st.text(st.characters(blacklist_categories=()), max_size=8))  # surrogates included
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**400), st.floats(), texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=10)
# where a string is expected: a string most of the time, else a number / list / None / nested dict / ...
maybe_text = st.one_of(texts, texts, texts, json_values)
ROLES = ["user", "human", "Human", "gpt", "assistant", "ASSISTANT", "bot", "system", "alien", "", " user"]
roles = st.one_of(st.sampled_from(ROLES), st.sampled_from(ROLES), json_values)
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": maybe_text}),
    st.fixed_dictionaries({"from": roles, "value": maybe_text}),
    st.fixed_dictionaries({}, optional={"role": roles, "from": roles, "content": maybe_text, "value": maybe_text,
                                        "text": maybe_text}),
    json_values)
messages = st.one_of(st.lists(message, max_size=4), json_values)
answer = st.one_of(texts, texts, message, messages)
margins = st.one_of(st.none(), st.integers(-5, 5), st.floats(), st.integers(10**300, 10**400), maybe_text)


@st.composite
def hh_transcripts(draw):
    turns = draw(st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "human", "System"]), texts), max_size=4))
    head = draw(st.sampled_from(["", "", "\n\n", "junk "]))
    return head + "".join(f"\n\n{role}: {text}" for role, text in turns)


ROW_SHAPES = {
    "hh-rlhf": lambda: {"chosen": st.one_of(hh_transcripts(), maybe_text),
                        "rejected": st.one_of(hh_transcripts(), maybe_text)},
    "hh_rlhf_cn": lambda: {"context": messages, "chosen": answer, "rejected": answer},
    "prompt_chosen_rejected": lambda: {"prompt": st.one_of(texts, messages), "chosen": answer, "rejected": answer},
    "sharegpt_pairs": lambda: {"conversations": messages, "chosen": answer, "rejected": answer, "system": maybe_text},
    "ranked_outputs": lambda: {"instruction": maybe_text, "input": maybe_text,
                               "output": st.one_of(st.lists(maybe_text, max_size=4), json_values),
                               "history": st.one_of(st.lists(st.lists(maybe_text, max_size=3), max_size=3),
                                                    json_values)},
}


@st.composite
def hostile_rows(draw):
    """A row shaped like one of the formats, with hostile values, dropped keys, equal answers, extra keys."""
    shape = ROW_SHAPES[draw(st.sampled_from(sorted(ROW_SHAPES)))]()
    row = {key: draw(value) for key, value in shape.items()}
    for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2, unique=True)):
        del row[key]  # missing keys
    if "chosen" in row and "rejected" in row and draw(st.integers(0, 5)) == 0:
        row["rejected"] = row["chosen"] if draw(st.booleans()) else (
            f" {row['chosen']}\n" if isinstance(row["chosen"], str) else row["chosen"])  # chosen == rejected
    if draw(st.booleans()):
        row["margin"] = draw(margins)
    row.update(draw(st.dictionaries(texts, json_values, max_size=2)))  # extra (or clobbering) keys
    return row


GOOD_ROWS = [
    {"prompt": "how to cook t-bone", "chosen": "Oven at 200C.", "rejected": "Boil it.", "margin": 2},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    {"context": [{"role": "human", "text": "你好"}], "chosen": {"role": "assistant", "text": "你好！"},
     "rejected": {"role": "assistant", "text": "走开。"}},
    {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
     "rejected": "5", "system": "Be brief."},
    {"instruction": "Say hi", "input": "", "output": ["hi", "no"], "history": [["a", "b"]]},
]
good_rows = st.sampled_from(GOOD_ROWS)


def dump(row, ascii_only: bool = True) -> bytes:
    # surrogatepass: a lone surrogate written raw (ensure_ascii=False) becomes invalid UTF-8 in the file
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def corrupted(draw, rows):
    """A row's JSON with invalid UTF-8 bytes spliced in, or cut short."""
    data = dump(draw(rows))
    at = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        return data[:at]
    return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe4\xbd", b"\x80\x80"])) + data[at:]


SPECIAL_LINES = [b"[" * 5000, b'{"a": ' * 3000, b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": '
                 + b"9" * 5000 + b"}", b"\xef\xbb\xbf" + dump(GOOD_ROWS[0]), b"\xef\xbb\xbf", b"NaN", b"Infinity",
                 b'"just a string"', b"[]", b"{}", b"null", b"\x00", b"\r", b"\x0c", b"\xa0", b"\x1c"]

lines = st.one_of(
    st.builds(dump, hostile_rows(), st.booleans()),
    st.builds(dump, hostile_rows(), st.booleans()),
    st.builds(dump, good_rows),
    st.builds(dump, json_values, st.booleans()),  # arbitrary JSON per line
    st.binary(max_size=40),  # random bytes (may hold newlines: they just make more lines)
    corrupted(st.one_of(good_rows, hostile_rows())),
    st.sampled_from([b"", b"   ", b"\t\r"]),  # blank lines
    st.sampled_from(SPECIAL_LINES),
)


# ---------------------------------------------------------------- the oracle and the checks

def classify(data: bytes) -> list[tuple[int, PreferencePair | None]]:
    """(line number, pair or None when the row is bad) for each non-blank line, judged by ``parse_row`` directly,
    plus the loader's two bounds: a line longer than ``MAX_LINE_BYTES`` and a prompt message or answer longer than
    ``MAX_TEXT_CHARS`` make a row bad.

    Only documented failures are caught, so an unexplained exception from ``parse_row`` fails the test too.
    """
    out = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if len(raw) > MAX_LINE_BYTES:
            out.append((number, None))
            continue
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            out.append((number, None))
            continue
        try:
            pair = parse_row(row)
        except DataFormatError:
            out.append((number, None))
            continue
        texts = [m["content"] for m in pair.prompt] + pair.responses
        out.append((number, None if any(len(t) > MAX_TEXT_CHARS for t in texts) else pair))
    return out


def check_pair(pair: PreferencePair) -> None:
    assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str)
    assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
    assert isinstance(pair.prompt, list)
    for m in pair.prompt:
        assert isinstance(m, dict) and set(m) == {"role", "content"}
        assert m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
    assert pair.margin is None or (type(pair.margin) is float and abs(pair.margin) <= MAX_DATA_NUMBER)
    for text in [pair.chosen, pair.rejected] + [m["content"] for m in pair.prompt]:
        text.encode("utf-8")  # tokenizable: no lone surrogates
    assert pair.lang in ("en", "zh")


def check_report(report, path: str) -> None:
    """Accounting and message rules that hold for any outcome."""
    src = report.sources[path]
    assert src.rows_read == src.pairs_kept + src.rows_skipped
    assert report.rows_read == report.pairs_kept + report.rows_skipped
    assert len(src.skipped) == min(src.rows_skipped, _MAX_SKIP_MESSAGES)
    for message in src.skipped + src.errors:
        assert message.startswith(f"{path}:") and "\n" not in message and len(message) < MAX_MESSAGE + len(path)
        message.encode("utf-8")
    json.dumps(report.to_dict())
    summary = report.summary()
    if src.rows_skipped > _MAX_SKIP_MESSAGES:
        assert f"... and {src.rows_skipped - _MAX_SKIP_MESSAGES} more skipped" in summary


def load_documented(paths, **kw):
    """load_pairs, letting only the documented errors through (anything else fails the test as it is)."""
    try:
        return load_pairs(paths, seed=None, **kw), None
    except (ValueError, FileNotFoundError) as e:  # DataFormatError is a ValueError
        return None, e


def check_lines_file(path: str, data: bytes) -> None:
    """The full contract for a JSON-lines file whose bytes are ``data``."""
    expected = classify(data)
    TRIED["rows"] += len(expected)
    TRIED["files"] += 1
    good = [(n, p) for n, p in expected if p is not None]
    bad = [n for n, p in expected if p is None]

    result, error = load_documented([path])
    if not good:
        assert isinstance(error, ValueError) and "no usable preference pairs" in str(error), error
    else:
        assert error is None, error
        pairs, report = result
        src = report.sources[path]
        check_report(report, path)
        assert (src.rows_read, src.pairs_kept, src.rows_skipped) == (len(expected), len(good), len(bad))
        assert src.errors == []
        assert [p.origin for p in pairs] == [f"{path}:{n}" for n, _ in good]
        assert [(p.prompt, p.chosen, p.rejected, p.margin) for p in pairs] == \
            [(p.prompt, p.chosen, p.rejected, p.margin) for _, p in good]
        assert all(p.source == path for p in pairs)
        for pair in pairs:
            check_pair(pair)
        for n, message in zip(bad, src.skipped):
            assert message.startswith(f"{path}:{n}: ")
        split_eval(pairs, 0.5)
        # overall counts are the sum over sources
        other = os.path.join(os.path.dirname(path), "other.jsonl")
        with open(other, "wb") as f:
            f.write(dump(GOOD_ROWS[1]) + b"\n\n")
        both, report2 = load_pairs([path, other])
        assert len(both) == len(good) + 1 and list(report2.sources) == [path, other]
        assert (report2.rows_read, report2.pairs_kept, report2.rows_skipped) == \
            (len(expected) + 1, len(good) + 1, len(bad))

    result, error = load_documented([path], strict=True)
    if bad:
        assert type(error) is DataFormatError and str(error).startswith(f"{path}:{bad[0]}: "), error
    elif good:
        assert error is None and len(result[0]) == len(good)
    else:
        assert isinstance(error, ValueError) and "no usable preference pairs" in str(error)


# ---------------------------------------------------------------- properties

@_settings(250)
@given(rows=st.lists(lines, min_size=1, max_size=12), trailing=st.booleans(), gz=st.booleans())
def test_hostile_json_lines(rows, trailing, gz):
    data = b"\n".join(rows) + (b"\n" if trailing else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.jsonl" + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(data, mtime=0) if gz else data)
        check_lines_file(path, data)


@_settings(60)
@given(before=st.lists(good_rows, max_size=4), bad=lines, after=st.lists(good_rows, max_size=3))
def test_strict_names_the_first_bad_line(before, bad, after):
    """Known-good rows, one hostile row at a known line, more good rows: strict mode points at that line."""
    assume(b"\n" not in bad and bad.strip())
    number = len(before) + 1
    assume(classify(b"\n" * (number - 1) + bad)[0][1] is None)  # the hostile row is bad
    data = b"\n".join([dump(r) for r in before] + [bad] + [dump(r) for r in after]) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mixed.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        TRIED["rows"] += len(before) + 1 + len(after)
        TRIED["files"] += 1
        with pytest.raises(DataFormatError) as info:
            load_pairs([path], strict=True)
        assert str(info.value).startswith(f"{path}:{number}: ")
        if before or after:
            pairs, report = load_pairs([path], seed=None)
            assert [p.origin for p in pairs] == [f"{path}:{i}" for i in range(1, len(before) + len(after) + 2)
                                                 if i != number]
            assert report.sources[path].skipped == [str(info.value)]  # same message, strict or not


@_settings(120)
@given(items=st.lists(st.one_of(hostile_rows(), good_rows, json_values), min_size=1, max_size=10),
       trailing_comma=st.sampled_from([False, False, False, True]))
def test_hostile_json_list(items, trailing_comma):
    """A ``.json`` list with one item per line: each item is read at its line, counted, kept or skipped."""
    data = ("[\n" + ",\n".join(json.dumps(item) for item in items) + (",\n]" if trailing_comma else "\n]")).encode()
    expected = []
    for i, item in enumerate(items):
        try:
            expected.append((i + 2, parse_row(json.loads(json.dumps(item)))))
        except DataFormatError:
            expected.append((i + 2, None))
    TRIED["rows"] += len(items)
    TRIED["files"] += 1
    good = [(n, p) for n, p in expected if p is not None]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        with open(path, "wb") as f:
            f.write(data)
        result, error = load_documented([path])
        if not good:
            assert isinstance(error, ValueError) and "no usable preference pairs" in str(error), error
            return
        assert error is None, error
        pairs, report = result
        src = report.sources[path]
        check_report(report, path)
        assert (src.rows_read, src.pairs_kept) == (len(items), len(good))
        assert [p.origin for p in pairs] == [f"{path}:{n}" for n, _ in good]
        for pair in pairs:
            check_pair(pair)
        assert src.errors == []  # a trailing ',' before ']' is tolerated (no row is lost either way)


@_settings(60)
@given(value=json_values.filter(lambda v: not isinstance(v, list)), indent=st.sampled_from([None, 2]))
def test_json_file_that_is_not_a_list(value, indent):
    """A ``.json`` file holding one non-list value: a clear DataFormatError (or, for a one-line object, JSON
    lines with one row)."""
    text = json.dumps(value, indent=indent)
    TRIED["rows"] += 1
    TRIED["files"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "value.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        result, error = load_documented([path])
        if not isinstance(value, dict):
            assert type(error) is DataFormatError and str(error).startswith(f"{path}: expected a JSON list"), error
        elif "\n" in text:
            assert type(error) is DataFormatError and "one JSON object spanning several lines" in str(error), error
        elif error is None:
            pairs, report = result
            check_report(report, path)
            assert len(pairs) == 1 and pairs[0].origin == f"{path}:1"
            check_pair(pairs[0])
        else:
            assert "no usable preference pairs" in str(error)


@_settings(120)
@given(data=st.one_of(st.binary(max_size=300), st.builds(lambda head, tail: head + tail,
                                                          st.sampled_from([b"\x1f\x8b\x08", b"\x1f\x8b\x08\x04",
                                                                           b"PAR1", b"[", b"{", b"\xef\xbb\xbf["]),
                                                          st.binary(max_size=300))),
       ext=st.sampled_from([".jsonl", ".json", ".gz", ".jsonl.gz", ".parquet"]))
def test_random_bytes_as_a_whole_file(data, ext):
    TRIED["rows"] += max(1, data.count(b"\n"))
    TRIED["files"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random" + ext)
        with open(path, "wb") as f:
            f.write(data)
        result, error = load_documented([path])
        if error is None:
            pairs, report = result
            check_report(report, path)
            for pair in pairs:
                check_pair(pair)
        else:
            assert isinstance(error, ValueError), error
        result, error = load_documented([path], strict=True)
        assert error is None or isinstance(error, ValueError)


@_settings(60)
@given(rows=st.lists(st.one_of(good_rows, good_rows, hostile_rows()), min_size=1, max_size=40),
       cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_gzip(rows, cut):
    """A ``.gz`` cut anywhere: the rows before the cut are read and counted, the cut is one file error."""
    data = b"".join(dump(r) + b"\n" for r in rows)
    whole = gzip.compress(data, mtime=0)
    size = max(1, int(len(whole) * cut))
    expected = classify(data)
    TRIED["rows"] += len(expected)
    TRIED["files"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cut.jsonl.gz")
        with open(path, "wb") as f:
            f.write(whole[:size])
        result, error = load_documented([path])
        if error is not None:
            assert isinstance(error, ValueError) and "no usable preference pairs" in str(error), error
            assert "truncated gzip" in str(error) or "corrupt or unreadable" in str(error)
        else:
            pairs, report = result
            src = report.sources[path]
            check_report(report, path)
            read = expected[:src.rows_read]  # a prefix of the rows
            assert src.rows_read <= len(expected)
            assert [p.origin for p in pairs] == [f"{path}:{n}" for n, p in read if p is not None]
            assert len(src.errors) == 1 and src.errors[0].startswith(f"{path}: ")
        result, error = load_documented([path], strict=True)
        assert type(error) is DataFormatError, error  # the first bad row or the cut


@_settings(3)
@given(size=st.integers(1_000_000, 5_000_000), unit=st.text(min_size=1, max_size=6),
       where=st.sampled_from(["chosen", "prompt", "margin", "role", "equal"]))
def test_huge_texts(size, unit, where):
    """Multi-megabyte strings load (or are skipped) without a huge message."""
    big = (unit * (size // len(unit) + 1))[:size]
    assume(big.strip())
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if where in ("chosen", "prompt"):
        row[where] = big
    elif where == "margin":
        row["margin"] = big
    elif where == "role":
        row = {"context": [{"role": big, "text": "q"}], "chosen": {"role": "assistant", "text": "a"},
               "rejected": {"role": "assistant", "text": "b"}}
    else:
        row["chosen"] = row["rejected"] = big
    data = b"\n".join([dump(GOOD_ROWS[0]), dump(row, ascii_only=False), dump({big[:1000]: big})]) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "huge.jsonl")
        with open(path, "wb") as f:
            f.write(data)
        check_lines_file(path, data)
        _, report = load_pairs([path])
        src = report.sources[path]
        assert src.rows_read == 3 and all(len(m) < MAX_MESSAGE + len(path) for m in src.skipped)


def test_missing_files_and_folders_are_the_documented_errors():
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gone.jsonl", "gone.jsonl.gz", "gone.json", "gone.parquet", "sub/gone.jsonl"):
            with pytest.raises(FileNotFoundError, match="no such file"):
                load_pairs([os.path.join(tmp, name)])
            with pytest.raises(FileNotFoundError, match="no such file"):
                load_pairs([name], data_dir=tmp)
        with pytest.raises(ValueError, match="is a directory"):
            load_pairs([tmp])
        path = os.path.join(tmp, "rows.txt")
        with open(path, "wb") as f:
            f.write(dump(GOOD_ROWS[0]))
        with pytest.raises(DataFormatError, match="unsupported file type"):
            load_pairs([path])


def test_skip_messages_are_capped_but_all_counted():
    bad = [{"prompt": "p", "chosen": f"same {i}", "rejected": f"same {i}"} for i in range(40)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "many_bad.jsonl")
        data = b"\n".join(dump(r) for r in bad + [GOOD_ROWS[0]] + bad) + b"\n"
        with open(path, "wb") as f:
            f.write(data)
        check_lines_file(path, data)
        pairs, report = load_pairs([path])
        src = report.sources[path]
        assert (src.rows_read, src.pairs_kept, src.rows_skipped) == (81, 1, 80)
        assert src.skipped == [f"{path}:{i}: chosen == rejected" for i in range(1, 6)]
        assert "... and 75 more skipped" in report.summary()


def test_regressions_found_by_the_properties():
    """Rows that used to crash load_pairs (OverflowError, ValueError, RecursionError) or, later, the tokenizer
    and split_eval (lone surrogates)."""
    cases = {
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + b"1" * 400 + b"}":
            "'margin' must be a finite number, got 1111",
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + b"1" * 5000 + b"}":
            "invalid JSON (Exceeds the limit (4300 digits)",
        b"[" * 100000: "invalid JSON (nested too deeply)",
        b'{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}': "chosen answer is not valid Unicode",
        b'{"prompt": "\\udfff", "chosen": "a", "rejected": "b"}': "prompt message 0 is not valid Unicode",
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + b"[" * 900 + b"]" * 900 + b"}":
            "'margin' must be a finite number, got [[[[...]]]]",
        # finite in Python, infinite in the float32 loss: every step would be skipped
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e300}':
            "'margin' is 1e+300, outside the float32 range the loss computes in (|x| <= 3.4e+38)",
        b'{"prompt": "p", "responses": ["a", "b"], "scores": [-1e39, 0]}':
            "scores[0] is -1e+39, outside the float32 range",
        b'{"context": [{"role": "' + b"x" * 100000 + b'", "text": "q"}], "chosen": "a", "rejected": "b"}':
            "context[0] has role 'xxxxxxxx",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (line, reason) in enumerate(cases.items()):
            for ext in (".jsonl", ".json"):
                path = os.path.join(tmp, f"case{i}{ext}")
                with open(path, "wb") as f:
                    f.write(dump(GOOD_ROWS[0]) + b"\n" + line + b"\n")
                pairs, report = load_pairs([path])
                assert len(pairs) == 1 and report.sources[path].skipped[0].startswith(f"{path}:2: {reason}")
                assert len(report.sources[path].skipped[0]) < MAX_MESSAGE + len(path)
            path = os.path.join(tmp, f"list{i}.json")
            with open(path, "wb") as f:
                f.write(b"[" + dump(GOOD_ROWS[0]) + b",\n" + line + b"]")
            pairs, report = load_pairs([path])
            src = report.sources[path]
            assert len(pairs) == 1 and (src.skipped + src.errors)[0].startswith(f"{path}:2: {reason}")
        TRIED["rows"] += 3 * len(cases)
        TRIED["files"] += 3 * len(cases)


# ---------------------------------------------------------------- over-long pairs: truncated and counted

def test_over_long_pairs_are_truncated_and_counted_never_dropped(tokenizer):
    from coati.data.template import SequenceEncoder, render_prompt, tokenize_pairs, use_chat_template

    long_prompt = " ".join(f"word{i}" for i in range(400))
    long_answer = " ".join(f"answer{i}" for i in range(300))
    rows = []
    for i in range(8):
        rows.append({"prompt": f"{long_prompt} {i}", "chosen": f"good {i}", "rejected": f"bad {i}"})  # long prompt
        rows.append({"prompt": "hi", "chosen": f"{long_answer} {i}", "rejected": f"no {i}"})  # long answer
        rows.append({"prompt": f"{long_prompt} {i}", "chosen": f"{long_answer} {i}",  # both long
                     "rejected": f"{long_answer} bad {i}"})
        rows.append({"prompt": f"q {i}", "chosen": f"yes {i}", "rejected": f"no {i}"})  # fits
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "long.jsonl")
        with open(path, "wb") as f:
            f.write(b"".join(dump(r) + b"\n" for r in rows))
        pairs, report = load_pairs([path], seed=None)
    assert len(pairs) == len(rows) == report.pairs_kept
    eos = tokenizer.eos_token_id
    encoder = SequenceEncoder(tokenizer, 64)
    for chat in (False, use_chat_template(tokenizer, "auto")):
        out, stats = tokenize_pairs(pairs, encoder, chat)
        assert len(out) == len(pairs) == stats.pairs
        for tp in out:
            for seq in (tp.chosen_ids, tp.rejected_ids):
                assert 2 <= len(seq) <= 64 and seq[-1] == eos
        # expected counts, from the truncation rule (prompt cut from the left first; the answer only when it alone
        # leaves fewer than min_prompt_tokens for the prompt)
        budget = 64 - len(encoder.prefix) - 1
        want_prompt = want_answer = 0
        for pair in pairs:
            p = len(tokenizer(render_prompt(pair.prompt, tokenizer, chat), add_special_tokens=False).input_ids)
            cut_p = cut_a = False
            for ans in (pair.chosen, pair.rejected):
                a = len(tokenizer(ans, add_special_tokens=False).input_ids)
                if p + a > budget:
                    keep = max(budget - a, min(p, encoder.min_prompt_tokens))
                    cut_p |= keep < p
                    cut_a |= min(p, keep) + a > budget
            want_prompt += cut_p
            want_answer += cut_a
        assert (stats.prompt_truncated, stats.answer_truncated) == (want_prompt, want_answer)
        assert stats.prompt_truncated >= 16 and stats.answer_truncated >= 16  # long prompts; long answers
        assert f"{len(pairs)} pairs tokenized" in stats.summary()
        # a long prompt with short answers keeps the whole answer, right before the EOS
        for pair, tp in zip(pairs, out):
            if pair.chosen.startswith("good"):
                ids = tokenizer(pair.chosen, add_special_tokens=False).input_ids
                assert tp.chosen_ids[-1 - len(ids):-1] == ids
