"""Loading preference pairs from named datasets, local files and Hugging Face Hub ids.

A *spec* (one item of :func:`load_pairs`'s ``specs``) is resolved in this order:

1. a key of :data:`NAMED_DATASETS`: its ``local_files`` globs under the data dir, else its Hub id (if any);
2. an existing file (as given, else relative to the data dir): ``.jsonl``, ``.jsonl.gz``/``.gz`` (JSON lines),
   ``.json`` (a JSON list of rows, or JSON lines) or ``.parquet``;
3. a Hub id ``org/name``, loaded with ``datasets.load_dataset(spec, split="train")``.

Each row's format is detected on its own (see :mod:`coati.data.formats`). Unusable rows are skipped and counted in
a :class:`DataReport` (or raise in strict mode). Origins are ``"path:LINE"`` (1-based line of the row, also for
items of a JSON list) or ``"name:row N"`` (0-based row index) for parquet files and Hub datasets.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import random
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from coati.config import MAX_LINE_BYTES, MAX_TEXT_CHARS
from coati.data.formats import (DataFormatError, PreferencePair, detect_format, ordered_pairs, parse_row,
                                tied_pairs)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_TYPES = (".jsonl", ".jsonl.gz", ".gz", ".json", ".parquet")
_MAX_SKIP_MESSAGES = 5


@dataclass(frozen=True)
class NamedDataset:
    """A dataset known by name: local copies (globs relative to the data dir) and an optional Hub fallback
    (``hub_data_files``, when set, restricts the Hub load to those files of the repository)."""

    name: str
    local_files: tuple[str, ...]
    hub_id: str | None
    hub_split: str
    description: str
    hub_data_files: tuple[str, ...] = ()


NAMED_DATASETS: dict[str, NamedDataset] = {d.name: d for d in (
    NamedDataset("hh-rlhf", ("en/hh-rlhf_*_test.jsonl.gz",), "Anthropic/hh-rlhf", "test",
                 "Anthropic HH-RLHF test splits (4 subsets, 8552 transcript pairs), English"),
    NamedDataset("ultrafeedback", ("en/ultrafeedback_binarized_train_clean.jsonl",),
                 "argilla/ultrafeedback-binarized-preferences-cleaned", "train",
                 "UltraFeedback binarized (cleaned), English; the Hub copy stores message lists"),
    NamedDataset("dpo-en-demo", ("en/llamafactory_dpo_en_demo.json",), None, "train",
                 "LLaMA-Factory dpo_en_demo (sharegpt pairs), English"),
    NamedDataset("dpo-zh-demo", ("zh/llamafactory_dpo_zh_demo.json",), None, "train",
                 "LLaMA-Factory dpo_zh_demo (sharegpt pairs), Chinese"),
    NamedDataset("oaast-rm-zh", ("zh/llamafactory_oaast_rm_zh.json",), None, "train",
                 "LLaMA-Factory oaast_rm_zh (ranked outputs from OpenAssistant), Chinese"),
    NamedDataset("medical-dpo-zh", ("zh/medicalgpt_dpo_zh_500.jsonl",), None, "train",
                 "MedicalGPT reward data dpo_zh_500 (sharegpt pairs, string answers), Chinese"),
    NamedDataset("hh-rlhf-cn", ("zh/hh_rlhf_cn*.jsonl", "zh/hh-rlhf-cn*.jsonl", "zh/hh_rlhf_cn/*.jsonl",
                                "zh/*_base_cn_test.jsonl"),
                 "dikw/hh_rlhf_cn", "train",
                 "HH-RLHF translated to Chinese (context/chosen/rejected); from the Hub: its two *_cn test files",
                 ("harmless_base_cn_test.jsonl", "helpful_base_cn_test.jsonl")),
)}


def default_data_dir() -> str | None:
    """The data dir from the ``COATI_DATA_DIR`` environment variable, or None when unset/empty. Never raises."""
    return os.environ.get("COATI_DATA_DIR") or None


# ---------------------------------------------------------------- report

@dataclass
class SourceReport:
    """Counts for one source: rows read, pairs (or ranked lists) kept, rows skipped, formats detected, first skip
    messages, and ``errors``: file-level problems (e.g. a truncated gzip) that ended a file early. For ranked
    lists also: ``lists`` (kept rows with more than 2 answers), ``comparisons`` (ordered pairs the kept rows give),
    ``responses_dropped`` (blank or repeated answers left out of kept rows) and ``responses_capped`` (answers beyond
    ``--max_responses``). Ties (answers with equal scores, ``"tie": true``): ``ties_kept`` (tied comparisons kept
    for a tie loss, ``--ties rao_kupper`` / ``davidson``) and ``ties_dropped`` (tied comparisons left out under
    ``--ties drop``, those of skipped all-tie rows included)."""

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    pairs_kept: int = 0
    rows_skipped: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lists: int = 0
    comparisons: int = 0
    responses_dropped: int = 0
    responses_capped: int = 0
    ties_kept: int = 0
    ties_dropped: int = 0

    def skip(self, message: str) -> None:
        """Count one skipped row, keeping its message if fewer than :data:`_MAX_SKIP_MESSAGES` are kept."""
        self.rows_skipped += 1
        if len(self.skipped) < _MAX_SKIP_MESSAGES:
            self.skipped.append(message)


@dataclass
class DataReport:
    """Per-source counts of a :func:`load_pairs` call (keys: dataset name, file path or Hub id)."""

    sources: dict[str, SourceReport] = field(default_factory=dict)

    def _total(key: str, doc: str) -> property:
        return property(lambda self: sum(getattr(s, key) for s in self.sources.values()), doc=doc)

    rows_read = _total("rows_read", "Total rows read over all sources (blank lines are not rows).")
    pairs_kept = _total("pairs_kept", "Total usable pairs over all sources.")
    rows_skipped = _total("rows_skipped", "Total skipped rows over all sources.")
    comparisons = _total("comparisons", "Total comparisons (ordered pairs) of the kept rows over all sources.")
    ties_kept = _total("ties_kept", "Total tied comparisons kept (``--ties`` with a tie loss) over all sources.")
    ties_dropped = _total("ties_dropped", "Total tied comparisons dropped (``--ties drop``) over all sources.")
    del _total

    def summary(self) -> str:
        """Human-readable multi-line summary for logs."""
        lines = [f"data: {self.rows_read} rows read, {self.pairs_kept} pairs kept, {self.rows_skipped} skipped"]
        for name, s in self.sources.items():
            fmts = ", ".join(f"{k}={v}" for k, v in s.formats.items()) or "none"
            lines.append(f"  {name}: {s.rows_read} read, {s.pairs_kept} kept, {s.rows_skipped} skipped "
                         f"from {len(s.files)} file(s); formats: {fmts}")
            if s.lists or s.responses_dropped or s.responses_capped:
                lines.append(f"    ranked lists: {s.lists} with more than 2 answers, {s.comparisons} comparisons; "
                             f"answers dropped: {s.responses_dropped} blank or repeated, {s.responses_capped} beyond "
                             "--max_responses")
            if s.ties_kept or s.ties_dropped:
                lines.append(f"    ties: {s.ties_kept} tied comparisons kept, {s.ties_dropped} dropped")
            lines += [f"    skipped {m}" for m in s.skipped]
            if s.rows_skipped > len(s.skipped):
                lines.append(f"    ... and {s.rows_skipped - len(s.skipped)} more skipped")
            lines += [f"    error {m}" for m in s.errors]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable) with totals and per-source counts."""
        return {"rows_read": self.rows_read, "pairs_kept": self.pairs_kept, "rows_skipped": self.rows_skipped,
                "ties_kept": self.ties_kept, "ties_dropped": self.ties_dropped, "sources": {name: asdict(s) for name, s in self.sources.items()}}


# ---------------------------------------------------------------- readers
# Each reader yields (where, row, problem): row is the decoded value, or None with a problem for an unreadable row.

class _FileError(Exception):
    """A problem that ends a file early (rows yielded before it are kept)."""


@dataclass(frozen=True)
class _Hub:
    hub_id: str
    split: str
    data_files: tuple[str, ...]
    not_found: str  # what was looked for locally, for the error message


def _bounded_lines(fh, max_bytes: int) -> Iterator[bytes | None]:
    """The lines of a binary file, each read with at most ``max_bytes + 1`` bytes in memory; a longer line is read
    to its end in chunks and dropped, and None stands in for it."""
    while True:
        raw = fh.readline(max_bytes + 1)
        if not raw:
            return
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):  # the rest of the long line
            raw = fh.readline(1 << 20)
        yield None


def _read_lines(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, object, str | None]]:
    line = 0
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
        try:
            for line, raw in enumerate(_bounded_lines(fh, max_line_bytes), 1):
                where = f"{path}:{line}"
                if raw is None:
                    yield where, None, f"line longer than --max_line_bytes {max_line_bytes}"
                    continue
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield where, None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
                    continue
                yield (where, *_decode_json(text))
        except EOFError as e:
            raise _FileError(f"{path}: truncated gzip after line {line} ({e})") from e
        except (OSError, zlib.error) as e:
            raise _FileError(f"{path}: corrupt or unreadable after line {line} ({e})") from e


def _json_problem(e: ValueError | RecursionError) -> str:
    """Why ``json`` refused a text: a syntax error, nesting too deep, or e.g. an integer of more than 4300 digits."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at column {e.colno})"
    return "invalid JSON (nested too deeply)" if isinstance(e, RecursionError) else f"invalid JSON ({str(e)[:200]})"


def _decode_json(text: str) -> tuple[object, str | None]:
    """(value, None), or (None, why) for text that is not JSON (including what ``json`` refuses beyond syntax)."""
    try:
        return json.loads(text), None
    except (ValueError, RecursionError) as e:
        return None, _json_problem(e)


def json_object_lines(lines: Iterable[str], name: str, error=ValueError) -> Iterator[tuple[str, dict]]:
    """``(name:line, object)`` for each non-blank line of JSON-lines text (scoring input, metrics files).

    Raises:
        ``error``: ``"name:line: why"`` at the first line that is not a JSON object (see :func:`_decode_json`).
    """
    for line_no, line in enumerate(lines, 1):
        if line.strip():
            row, problem = _decode_json(line)
            if problem is None and not isinstance(row, dict):
                problem = f"a row must be a JSON object, got {type(row).__name__}"
            if problem:
                raise error(f"{name}:{line_no}: {problem}")
            yield f"{name}:{line_no}", row


def _read_json(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, object, str | None]]:
    """A ``.json`` file: a JSON list of rows (each reported at the line where it starts) or JSON lines."""
    with open(path, "rb") as fh:
        data = fh.read()
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"{":  # JSON lines, unless the file is one object spread over several lines
        def loads(raw: bytes) -> object:  # None for what is not JSON (a broken first line is reported row by row)
            try:
                return json.loads(raw.decode("utf-8-sig"))
            except (ValueError, RecursionError):
                return None
        if not isinstance(loads(data.lstrip().split(b"\n", 1)[0]), dict) and loads(data) is not None:
            raise DataFormatError(f"{path}: expected a JSON list of rows or JSON lines, got one JSON object "
                                  f"spanning several lines")
        yield from _read_lines(path, max_line_bytes)
        return
    if head != b"[":
        raise DataFormatError(f"{path}: expected a JSON list of rows or JSON lines (file starts with {head!r})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _FileError(f"{path}:{line}: invalid UTF-8 ({e.reason}); the JSON list cannot be read") from e
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    skip = re.compile(r"\s*")
    try:
        while True:
            pos = skip.match(text, pos).end()
            if text.startswith("]", pos):
                return
            line, counted = line + text.count("\n", counted, pos), pos
            row, pos = decoder.raw_decode(text, pos)
            yield f"{path}:{line}", row, None
            pos = skip.match(text, pos).end()
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    except (ValueError, RecursionError) as e:
        raise _FileError(f"{path}:{getattr(e, 'lineno', line)}: {_json_problem(e)}; rest of the list not read") from e


def _read_parquet(path: str) -> Iterator[tuple[str, object, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
        for index, row in enumerate(rows):
            yield f"{path}:row {index}", row, None
    except (OSError, ValueError, pa.ArrowException) as e:  # pyarrow errors (most derive from the first two)
        raise _FileError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from e


def _read_hub(hub: _Hub) -> Iterator[tuple[str, object, str | None]]:
    try:
        import datasets

        ds = datasets.load_dataset(hub.hub_id, split=hub.split, data_files=list(hub.data_files) or None)
    except Exception as e:  # any failure (offline, unknown id, no `datasets`) becomes one clear error
        reason = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"{hub.not_found}; and could not load {hub.hub_id!r} (split {hub.split!r}) from "
                                f"the Hub: {type(e).__name__}: {reason}") from e
    for index, row in enumerate(ds):
        yield f"{hub.hub_id}:row {index}", row, None


def _read(source: str | _Hub, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, object, str | None]]:
    if isinstance(source, _Hub):
        return _read_hub(source)
    if source.endswith(".parquet"):
        return _read_parquet(source)
    for ends, reader in ((".json", _read_json), ((".jsonl", ".gz"), _read_lines)):
        if source.endswith(ends):
            return reader(source, max_line_bytes)
    raise DataFormatError(f"{source}: unsupported file type (expected one of {', '.join(_FILE_TYPES)})")


# ---------------------------------------------------------------- resolution

def _resolve(spec: str, data_dir: str | None) -> tuple[str, list[str | _Hub]]:
    """(source name, inputs) for one spec; raises FileNotFoundError when nothing matches."""
    if (named := NAMED_DATASETS.get(spec)) is not None:
        if data_dir:
            patterns = [os.path.join(data_dir, p) for p in named.local_files]
            files = list(dict.fromkeys(f for p in patterns for f in sorted(glob.glob(p))))
            if files:
                return spec, files
            not_found = f"{spec}: not found in data dir {data_dir} (looked for {', '.join(patterns)})"
        else:
            not_found = f"{spec}: no data dir (pass data_dir or set COATI_DATA_DIR)"
        if named.hub_id is None:
            raise FileNotFoundError(f"{not_found} and no Hub id")
        return spec, [_Hub(named.hub_id, named.hub_split, named.hub_data_files, not_found)]
    candidates = [spec] + ([os.path.join(data_dir, spec)] if data_dir and not os.path.isabs(spec) else [])
    for path in candidates:
        if os.path.isdir(path):
            raise ValueError(f"{spec}: is a directory; pass its files (or a named dataset) instead")
        if os.path.isfile(path):
            return path, [path]
    looked = f"looked for {' and '.join(candidates)}"
    if _HUB_ID.match(spec) and not spec.endswith(_FILE_TYPES):
        return spec, [_Hub(spec, "train", (), f"{spec}: no such local file ({looked})")]
    raise FileNotFoundError(f"unknown data spec {spec!r}: not a named dataset ({', '.join(NAMED_DATASETS)}), "
                            f"no such file ({looked}), and not a Hub id 'org/name'")


# ---------------------------------------------------------------- public API

def load_pairs(specs: Sequence[str], data_dir: str | None = None, max_samples: int | None = None,
               strict: bool = False, seed: int | None = 0, max_responses: int | None = None,
               max_text_chars: int = MAX_TEXT_CHARS, max_line_bytes: int = MAX_LINE_BYTES,
               ties: str = "drop") -> tuple[list[PreferencePair], DataReport]:
    """Load preference pairs from named datasets, local files or Hub ids (see the module docstring).

    Args:
        specs: dataset names, file paths or Hub ids (a single string is accepted too).
        data_dir: where named datasets and relative paths are looked up; None uses :func:`default_data_dir`.
        max_samples: per spec, keep only the first N usable pairs in file order (files in sorted order), and stop
            reading there; deterministic. None keeps all.
        strict: raise on the first unusable row or file problem instead of skipping it.
        seed: the returned list (all specs together) is shuffled with ``random.Random(seed)``; None keeps file order.
            The choice of pairs never depends on it.
        max_responses: ranked lists keep their K best-ranked answers (:meth:`PreferencePair.cap`; counted in the
            report); a list whose kept answers all tie is skipped. None keeps all.
        max_text_chars: a row with a prompt message or answer longer than this (characters) is skipped.
        max_line_bytes: a JSON-lines row longer than this (bytes) is skipped while it is read, never held whole.
        ties: ``"drop"``: tied comparisons are left out and a row with no other comparison is skipped (both
            counted); any other value (a tie loss, ``--ties``) keeps them.
    Returns:
        (pairs, report); each pair's ``source`` is the dataset name (or file path / Hub id), ``subset`` the row's
        string ``subset`` field (else ``""``) and ``origin`` its
        ``"path:line"`` (or ``"name:row N"``).
    Raises:
        FileNotFoundError: unknown spec, missing file, or a named dataset with no local copy that cannot be loaded
            from the Hub (offline, no Hub id, ...); the message says what was looked for.
        DataFormatError: a ``.json`` file that is neither a list nor JSON lines, an unsupported file type, or in
            strict mode the first bad row (``"path:line: reason"``) or file problem (e.g. a truncated gzip).
        ValueError: ``max_samples`` < 1, a spec is a directory, or a spec gave no usable pairs (the message has
            the report summary).
    """
    if isinstance(specs, str):
        specs = [specs]
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    data_dir = data_dir if data_dir is not None else default_data_dir()
    report, pairs = DataReport(), []
    for spec in specs:
        source, inputs = _resolve(spec, data_dir)
        stats = report.sources.setdefault(source, SourceReport())
        kept = _load_source(source, inputs, stats, max_samples, strict, max_responses, max_text_chars,
                            max_line_bytes, ties != "drop")
        if not kept:
            raise ValueError(f"{spec}: no usable preference pairs\n{report.summary()}")
        pairs += kept
    if seed is not None:
        random.Random(seed).shuffle(pairs)
    return pairs, report


def _check_lengths(pair: PreferencePair, max_chars: int) -> None:
    """DataFormatError naming the first prompt message or answer longer than ``max_chars`` characters."""
    for i, m in enumerate(pair.prompt):
        if len(m["content"]) > max_chars:
            raise DataFormatError(f"prompt message {i} has {len(m['content'])} characters, more than "
                                  f"--max_text_chars {max_chars}")
    for i, answer in enumerate(pair.responses):
        if len(answer) > max_chars:
            raise DataFormatError(f"answer {i} has {len(answer)} characters, more than --max_text_chars {max_chars}")


def _load_source(source: str, inputs: list[str | _Hub], stats: SourceReport, max_samples: int | None,
                 strict: bool, max_responses: int | None = None, max_text_chars: int = MAX_TEXT_CHARS,
                 max_line_bytes: int = MAX_LINE_BYTES, keep_ties: bool = False) -> list[PreferencePair]:
    kept: list[PreferencePair] = []
    for item in inputs:
        stats.files.append(item.hub_id if isinstance(item, _Hub) else item)
        try:
            for where, row, problem in _read(item, max_line_bytes):
                stats.rows_read += 1
                try:
                    if problem:
                        raise DataFormatError(problem)
                    fmt = detect_format(row)
                    stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
                    pair = parse_row(row, fmt)
                    _check_lengths(pair, max_text_chars)
                    capped = pair.cap(max_responses) if max_responses else 0
                except DataFormatError as e:
                    if strict:
                        raise DataFormatError(f"{where}: {e}") from e
                    stats.skip(f"{where}: {e}")
                    continue
                ties = len(tied_pairs(len(pair.responses), pair.scores))
                if not keep_ties and pair.scores is not None and pair.scores[0] == pair.scores[-1]:
                    # not a bad row (--strict_data goes on): a tie, which --ties drop leaves out, counted
                    stats.ties_dropped += ties
                    kept_by = " kept by --max_responses" if capped else ""
                    stats.skip(f"{where}: the {len(pair.responses)} answers{kept_by} all tie: no preference to learn "
                               "(--ties drop; a tie loss keeps them)")
                    continue
                pair.source, pair.origin = source, where
                if isinstance(subset := row.get("subset"), str):
                    pair.subset = subset
                if isinstance(row_id := row.get("id"), (str, int)) and not isinstance(row_id, bool):
                    pair.row_id = str(row_id)
                kept.append(pair)
                stats.pairs_kept += 1
                stats.lists += int(bool(pair.more))
                stats.comparisons += len(ordered_pairs(len(pair.responses), pair.scores))
                if keep_ties:
                    stats.ties_kept += ties
                    stats.comparisons += ties
                else:
                    stats.ties_dropped += ties
                stats.responses_dropped += pair.dropped
                stats.responses_capped += capped
                if max_samples is not None and len(kept) >= max_samples:
                    return kept
        except _FileError as e:
            if strict:
                raise DataFormatError(str(e)) from e
            stats.errors.append(str(e))
    return kept


def _bucket(pair: PreferencePair) -> float:
    """A stable number in [0, 1) from the pair's content (prompt, chosen, rejected, and a list's other answers)."""
    content = [pair.prompt, pair.chosen, pair.rejected] + ([pair.more] if pair.more else [])
    key = json.dumps(content, ensure_ascii=False, sort_keys=True)
    # surrogatepass: a hand-built pair may hold lone surrogates (parse_row rejects them); same bytes otherwise
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64


def content_digest(obj) -> str:
    """SHA-256 (hex) of ``obj`` as canonical JSON (sorted keys, no spaces, UTF-8): equal for equal content, whatever
    the key order or formatting of the file it was read from."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def pairs_digest(pairs: Sequence[PreferencePair]) -> str:
    """:func:`content_digest` of the pairs' content in order (prompt, answers in rank order, scores, margin): what
    ``summary.json`` records of the held-out pairs, so that ``coati.evaluate --heldout`` can tell it re-created
    exactly them."""
    return content_digest([[p.prompt, p.responses, p.scores, p.margin] for p in pairs])


def split_eval(pairs: Sequence[PreferencePair], fraction: float) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split into (train, eval): a pair goes to eval when the SHA-256 of its content falls below ``fraction``.

    The split depends only on each pair's prompt, chosen and rejected (not on order, seed, source or process), so
    duplicates land on the same side and about ``fraction`` of the pairs go to eval. Input order is kept.

    Raises:
        ValueError: ``fraction`` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"eval fraction must be in [0, 1], got {fraction}")
    train, held = [], []
    for pair in pairs:
        (held if _bucket(pair) < fraction else train).append(pair)
    return train, held


@dataclass
class PairSelection:
    """The training and evaluation pairs of a run, with the data reports of their loads (``eval_report`` is None
    when the evaluation pairs were split from ``train``'s datasets: ``eval_split``)."""

    train: list[PreferencePair]
    eval: list[PreferencePair]
    report: DataReport
    eval_report: DataReport | None = None


def select_pairs(dataset: Sequence[str], data_dir: str | None, max_samples: int | None = None, strict: bool = False,
                 seed: int | None = 0, eval_dataset: Sequence[str] | None = None,
                 max_eval_samples: int | None = None, eval_split: float = 0.0,
                 max_responses: int | None = None, max_text_chars: int = MAX_TEXT_CHARS,
                 max_line_bytes: int = MAX_LINE_BYTES, ties: str = "drop") -> PairSelection:
    """The trainer's deterministic choice of training and evaluation pairs (``train_reward_model.py`` settings).

    With ``eval_dataset`` the evaluation pairs are loaded from it (at most ``max_eval_samples`` per dataset);
    otherwise ``eval_split`` of the ``dataset`` pairs are held out by :func:`split_eval` (content hash), and
    ``max_eval_samples`` caps their number. The same settings always give the same pairs, so
    ``python -m coati.evaluate --heldout`` re-creates a run's held-out pairs from its ``train_config.json``.

    Raises:
        as :func:`load_pairs`; ValueError: no training pairs are left after the split, or ``eval_split`` > 0 held
        none out.
    """
    limits = {"max_text_chars": max_text_chars, "max_line_bytes": max_line_bytes, "ties": ties}
    train, report = load_pairs(dataset, data_dir, max_samples, strict, seed, max_responses, **limits)
    eval_report = None
    if eval_dataset:
        held, eval_report = load_pairs(eval_dataset, data_dir, max_eval_samples, strict, seed, max_responses,
                                       **limits)
    else:
        train, held = split_eval(train, eval_split) if eval_split > 0 else (train, [])
        if eval_split > 0 and not held:
            raise ValueError(f"--eval_split {eval_split:g} held out none of the {len(train)} pairs: raise it, or "
                             "set 0 to train without a held-out evaluation")
        held = held[:max_eval_samples]  # None keeps all
    if not train:
        raise ValueError("no training pairs left after the evaluation split")
    return PairSelection(train, held, report, eval_report)
