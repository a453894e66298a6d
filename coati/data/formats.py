"""Preference-pair and ranked-list row formats: detection and parsing into :class:`PreferencePair`.

Every supported layout is a :class:`Format` in :data:`FORMATS`; adding one means writing a ``detect`` / ``parse``
function pair and one registry entry. Common rules for all formats:

* roles are normalised to ``"system"``, ``"user"`` and ``"assistant"`` (``human``/``user`` -> user,
  ``gpt``/``assistant``/``bot`` -> assistant, case-insensitive);
* surrounding whitespace is stripped from every message and answer;
* an optional numeric ``margin`` key is read in every format;
* extra keys are ignored;
* a row that cannot give a usable pair raises :class:`DataFormatError` saying why (values quoted in the
  message are shortened, so a hostile row cannot produce a huge message).
"""
from __future__ import annotations

import math
import re
import reprlib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

Message = dict[str, str]

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_SPACE = re.compile(r"\s")


def detect_language(text: str) -> str:
    """Return ``"zh"`` when CJK ideographs are at least 10% of the non-whitespace characters, else ``"en"``.

    Ideographs are the CJK Unified Ideographs (base block and extensions A-F) and the compatibility block; kana,
    hangul and CJK punctuation do not count. Empty or whitespace-only text is ``"en"``. Never raises.
    """
    visible = len(text) - len(_SPACE.findall(text))
    return "zh" if visible and len(_CJK.findall(text)) >= 0.1 * visible else "en"


class DataFormatError(ValueError):
    """A row (or file) that cannot give a usable preference pair; the message says why (and where, when known)."""


@dataclass
class PreferencePair:
    """One preference comparison (two final assistant answers to the same conversation), or a ranked list of K >= 2
    answers to it.

    Attributes:
        prompt: the conversation before the answer, as ``{"role", "content"}`` messages (role ``system``, ``user``
            or ``assistant``); may be empty.
        chosen: the preferred final assistant answer (text only); of a list, the best one.
        rejected: the dispreferred final assistant answer; of a list, the second best.
        margin: the row's optional ``margin`` value, else None.
        source: the dataset name or file path the pair came from.
        origin: where in the source, e.g. ``"path:12"`` (1-based line) or ``"name:row 3"`` (0-based row).
        more: answers 3..K of a ranked list, in rank order (empty for a pair).
        scores: of a scored list, the scores of :attr:`responses` (higher is better, non-increasing; equal scores
            are ties); None when the answers are strictly ranked in order.
        dropped: answers of the row that were dropped while parsing (blank or repeated ones), counted in the report.
        subset: the row's optional string ``subset`` field (RewardBench's subset names), else ``""``.
        row_id: the row's optional ``id`` field (a string or an integer) as a string, else ``""`` (RewardBench 2's
            Ties subset pairs its rows by id).
    """

    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = ""
    origin: str = ""
    more: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    dropped: int = 0
    subset: str = ""
    row_id: str = ""

    @property
    def responses(self) -> list[str]:
        """The K answers in rank order: ``[chosen, rejected, *more]``."""
        return [self.chosen, self.rejected, *self.more]

    def cap(self, k: int) -> int:
        """Keep only the ``k`` (>= 2) best-ranked answers; returns how many were removed."""
        removed = max(len(self.more) - (k - 2), 0)
        if removed:
            self.more = self.more[:k - 2]
            if self.scores is not None:
                self.scores = self.scores[:k]
        return removed

    @property
    def lang(self) -> str:
        """``"zh"`` or ``"en"`` by :func:`detect_language` over the prompt contents and the chosen answer."""
        return detect_language("\n".join([m["content"] for m in self.prompt] + [self.chosen]))


@dataclass(frozen=True)
class Format:
    """A row layout: ``detect(row)`` says whether a row looks like it, ``parse(row)`` builds the pair (raising
    :class:`DataFormatError` for a row that is not usable)."""

    name: str
    detect: Callable[[Mapping], bool]
    parse: Callable[[Mapping], PreferencePair]
    description: str


# ---------------------------------------------------------------- shared helpers

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 3
_brief = _REPR.repr  # short reprs for error messages: hostile rows may hold megabytes or deeply nested values


def _keys(row: Mapping) -> str:
    """The row's keys for error messages (sorted, at most 10, each shortened)."""
    keys = sorted(str(k) for k in row)
    return "[" + ", ".join(_brief(k) for k in keys[:10]) + (", ...]" if len(keys) > 10 else "]")


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
          "system": "system"}


def _require(row: Mapping, key: str, types: type | tuple[type, ...], what: str):
    if key not in row:
        raise DataFormatError(f"missing key {key!r} (keys: {_keys(row)})")
    value = row[key]
    if not isinstance(value, types):
        raise DataFormatError(f"{key!r} must be {what}, got {type(value).__name__}")
    return value


def parse_message(obj: object, where: str) -> Message:
    """One message from ``{"role"|"from": ..., "content"|"value"|"text": ...}``, roles normalised, content stripped.

    Raises:
        DataFormatError: not a mapping, an unknown role or a non-string content (message starts with ``where``).
    """
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{where} must be a message object, got {type(obj).__name__}")
    role = next((obj[k] for k in ("role", "from") if k in obj), None)
    content = next((obj[k] for k in ("content", "value", "text") if k in obj), None)
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise DataFormatError(f"{where} has role {_brief(role)}; known roles: {sorted(_ROLES)}")
    if not isinstance(content, str):
        raise DataFormatError(f"{where} needs a string 'content'/'value'/'text', got {type(content).__name__}")
    return {"role": _ROLES[role.lower()], "content": content.strip()}


def _messages(value: list, key: str) -> list[Message]:
    return [parse_message(m, f"{key}[{i}]") for i, m in enumerate(value)]


def _answer(row: Mapping, key: str, conversation: bool = False) -> tuple[list[Message], str]:
    """(earlier messages, final answer text) from a string, one assistant message or (``conversation``) a list."""
    types, what = ((str, Mapping, list), "a string, a message or a list of messages") if conversation else \
        ((str, Mapping), "a string or a message")
    value = _require(row, key, types, what)
    if isinstance(value, str):
        return [], value.strip()
    msgs = [parse_message(value, key)] if isinstance(value, Mapping) else _messages(value, key)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataFormatError(f"{key!r} must end with an assistant message")
    return msgs[:-1], msgs[-1]["content"]


#: the largest magnitude a margin or score may have: float32's largest finite value (the loss computes in float32
#: or narrower; a margin of 1e300, finite in Python, is infinite there and makes every step's loss non-finite)
MAX_DATA_NUMBER = 3.4028234663852886e38


def _number(value: object, what: str) -> float:
    """A float from a JSON number (not a bool) that is finite in float32, the precision the loss uses;
    DataFormatError naming ``what`` otherwise."""
    try:  # a JSON integer too large for a float (e.g. 400 digits) overflows
        number = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise DataFormatError(f"{what} must be a finite number, got {_brief(value)}")
    if abs(number) > MAX_DATA_NUMBER:
        raise DataFormatError(f"{what} is {number:g}, outside the float32 range the loss computes in "
                              f"(|x| <= {MAX_DATA_NUMBER:.3g})")
    return number


def _margin(row: Mapping) -> float | None:
    value = row.get("margin")
    return None if value is None else _number(value, "'margin'")


def ordered_pairs(k: int, scores: list[float] | None) -> list[tuple[int, int]]:
    """The comparisons ``(winner, loser)`` of K answers in rank order: all ``i < j`` when strictly ranked
    (``scores`` None; a pair: ``[(0, 1)]``), else those with ``scores[i] > scores[j]`` (ties give none)."""
    return [(i, j) for i in range(k) for j in range(i + 1, k) if scores is None or scores[i] > scores[j]]


def tied_pairs(k: int, scores: list[float] | None) -> list[tuple[int, int]]:
    """The ties ``(i, j)``, ``i < j``, of K answers in rank order: those with ``scores[i] == scores[j]`` (none when
    strictly ranked, ``scores`` None)."""
    return [] if scores is None else [(i, j) for i in range(k) for j in range(i + 1, k) if scores[i] == scores[j]]


def _pair_scores(row: Mapping) -> list[float] | None:
    """A pair row's ``[chosen, rejected]`` scores: ``[0, 0]`` for ``"tie": true``; else its ``score_chosen`` and
    ``score_rejected`` (top level, or both in a ``metadata`` object, as UltraFeedback binarized has them); else None.

    Raises:
        DataFormatError: ``tie`` is not a boolean, only one score is given at the top level, a score is not a finite number, or the
            chosen answer scores below the rejected one.
    """
    tie = row.get("tie")
    if tie is not None and not isinstance(tie, bool):
        raise DataFormatError(f"'tie' must be true or false, got {_brief(tie)}")
    if tie:
        return [0.0, 0.0]
    keys = ("score_chosen", "score_rejected")
    meta = row.get("metadata")
    if any(k in row for k in keys):
        holder = row
        if not all(k in row for k in keys):
            raise DataFormatError("a pair row needs both 'score_chosen' and 'score_rejected', or neither")
    elif isinstance(meta, Mapping) and all(k in meta for k in keys):  # free-form metadata: only a full pair counts
        holder = meta
    else:
        return None
    chosen, rejected = _number(holder["score_chosen"], "'score_chosen'"), _number(holder["score_rejected"],
                                                                                  "'score_rejected'")
    if chosen < rejected:
        raise DataFormatError(f"'score_chosen' {chosen:g} is below 'score_rejected' {rejected:g}")
    return [chosen, rejected]


def is_blank(text: str) -> bool:
    """True for text with nothing visible: empty, whitespace, or only invisible format characters.

    Format characters are Unicode category ``Cf`` (zero-width space U+200B, joiners U+200C/U+200D, word joiner
    U+2060, BOM U+FEFF, soft hyphen, bidi marks, ...); an answer made of them alone is empty to a reader, so it is
    treated as empty in training data and in scoring input.
    """
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def check_text(where: str, text: str) -> None:
    """Reject lone surrogates (JSON escapes such as ``"\\ud800"``): tokenizers and UTF-8 encoders refuse them.

    Raises:
        DataFormatError: ``"<where> is not valid Unicode (lone surrogate ... at character N)"``.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataFormatError(f"{where} is not valid Unicode (lone surrogate {text[e.start]!r} at character "
                                  f"{e.start})") from None


def check_answer(where: str, text: str) -> None:
    """Raise DataFormatError ``"<where> is empty (...)"`` for :func:`is_blank` text, else as :func:`check_text`."""
    if is_blank(text):
        raise DataFormatError(f"{where} is empty (nothing but whitespace or invisible format characters); an empty "
                              "answer has no meaningful reward")
    check_text(where, text)


def _pair(row: Mapping, prompt: list[Message], chosen: str, rejected: str) -> PreferencePair:
    if is_blank(chosen):
        raise DataFormatError("empty chosen answer")
    if is_blank(rejected):
        raise DataFormatError("empty rejected answer")
    if chosen == rejected:
        raise DataFormatError("chosen == rejected")
    check_text("chosen answer", chosen)
    check_text("rejected answer", rejected)
    for i, message in enumerate(prompt):
        check_text(f"prompt message {i}", message["content"])
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=_margin(row),
                          scores=_pair_scores(row))


def _ranked_list(row: Mapping, prompt: list[Message], answers: list[str | None],
                 scores: list[float] | None = None) -> PreferencePair:
    """A ranked list from ``answers`` (best first when ``scores`` is None, else in any order with one score each,
    higher better). Blank answers (and None: an answer that could not be read) and repeats of an earlier answer are
    dropped and counted in ``dropped``; a scored list is sorted by score, best first (stable: ties keep row order).

    Raises:
        DataFormatError: fewer than 2 answers left, or text that is not valid Unicode. (A list whose answers all
            tie gives no strict comparison; whether it is kept is ``--ties``'s choice, in the loader.)
    """
    for i, message in enumerate(prompt):
        check_text(f"prompt message {i}", message["content"])
    keep, seen = [], set()
    for i, text in enumerate(answers):
        if text is None or is_blank(text) or text in seen:
            continue
        check_text(f"answer {i}", text)
        seen.add(text)
        keep.append((i, text))
    if scores is not None:
        keep.sort(key=lambda item: -scores[item[0]])
    if len(keep) < 2:
        raise DataFormatError(f"a ranked list needs at least 2 distinct non-empty answers, got {len(keep)} of "
                              f"{len(answers)}")
    kept_scores = None if scores is None else [scores[i] for i, _ in keep]
    texts = [t for _, t in keep]
    return PreferencePair(prompt, texts[0], texts[1], _margin(row), more=texts[2:], scores=kept_scores,
                          dropped=len(answers) - len(keep))


# ---------------------------------------------------------------- hh-rlhf

_HH_LAST = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _detect_hh(row: Mapping) -> bool:
    return (not any(k in row for k in ("prompt", "context", "conversations"))
            and all(isinstance(row.get(k), str) and "Assistant:" in row[k] for k in ("chosen", "rejected")))


def _hh_split(text: str, key: str) -> tuple[str, str]:
    text = text if text.startswith("\n\n") else "\n\n" + text
    cut = text.rfind(_HH_LAST)
    if cut < 0:
        raise DataFormatError(f"{key!r} has no '\\n\\nAssistant:' turn")
    return text[:cut], text[cut + len(_HH_LAST):].strip()


def _parse_hh(row: Mapping) -> PreferencePair:
    """Split each transcript at its last ``\\n\\nAssistant:``; the prompt is the chosen transcript's prefix.

    The two prefixes normally agree; when they differ (a few upstream rows), the chosen one is used.
    """
    prefix, chosen = _hh_split(_require(row, "chosen", str, "a string"), "chosen")
    _, rejected = _hh_split(_require(row, "rejected", str, "a string"), "rejected")
    parts = _HH_TURN.split(prefix)  # [head, role, text, role, text, ...]
    if parts[0].strip():
        raise DataFormatError("text before the first 'Human:'/'Assistant:' turn")
    prompt = [{"role": _ROLES[role.lower()], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    return _pair(row, prompt, chosen, rejected)


# ---------------------------------------------------------------- hh_rlhf_cn

def _parse_hh_cn(row: Mapping) -> PreferencePair:
    prompt = _messages(_require(row, "context", list, "a list of messages"), "context")
    return _pair(row, prompt, _answer(row, "chosen")[1], _answer(row, "rejected")[1])


# ---------------------------------------------------------------- prompt / chosen / rejected (flat)

def _detect_flat(row: Mapping) -> bool:
    return ({"chosen", "rejected"} <= row.keys() and not any(k in row for k in ("context", "conversations"))
            and ("prompt" in row or isinstance(row["chosen"], list)))


def _prompt_field(row: Mapping) -> list[Message]:
    """The optional ``prompt`` key: a string (one user message; empty or missing: no message) or messages."""
    raw = row.get("prompt")
    if raw is None or isinstance(raw, str):
        return [{"role": "user", "content": raw.strip()}] if raw and raw.strip() else []
    if isinstance(raw, list):
        return _messages(raw, "prompt")
    raise DataFormatError(f"'prompt' must be a string or a list of messages, got {type(raw).__name__}")


def _parse_flat(row: Mapping) -> PreferencePair:
    """Answers are strings or conversations ending with the assistant answer (UltraFeedback on the Hub).

    With conversations, their earlier messages (the chosen one's) are the prompt when ``prompt`` is missing or
    matches their start; otherwise the ``prompt`` messages come first, followed by the earlier messages.
    """
    context, chosen = _answer(row, "chosen", conversation=True)
    _, rejected = _answer(row, "rejected", conversation=True)
    given = _prompt_field(row)
    prompt = context if context[:len(given)] == given else given + context
    return _pair(row, prompt, chosen, rejected)


# ---------------------------------------------------------------- sharegpt pairs

def _parse_sharegpt(row: Mapping) -> PreferencePair:
    """``conversations`` (``from``/``value``) then one answer each; an optional ``system`` string goes first."""
    prompt = _messages(_require(row, "conversations", list, "a list of messages"), "conversations")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataFormatError(f"'system' must be a string, got {type(system).__name__}")
    if system and system.strip():
        prompt.insert(0, {"role": "system", "content": system.strip()})
    return _pair(row, prompt, _answer(row, "chosen")[1], _answer(row, "rejected")[1])


# ---------------------------------------------------------------- ranked outputs

def _instruction_prompt(row: Mapping) -> list[Message]:
    """History turns, then ``instruction`` (+ ``"\\n" + input`` when non-empty) as the last user message."""
    instruction = _require(row, "instruction", str, "a string")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataFormatError(f"'input' must be a string, got {type(extra).__name__}")
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataFormatError(f"'history' must be a list, got {type(history).__name__}")
    prompt: list[Message] = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataFormatError(f"'history' must be a list of [user, assistant] string pairs (bad item {i})")
        prompt += [{"role": "user", "content": turn[0].strip()}, {"role": "assistant", "content": turn[1].strip()}]
    user = instruction.strip() + ("\n" + extra.strip() if extra.strip() else "")
    prompt.append({"role": "user", "content": user})
    return prompt


def _parse_ranked(row: Mapping) -> PreferencePair:
    """:func:`_instruction_prompt`, then all of ``output``, best first (``output[0]`` beats every later one)."""
    prompt = _instruction_prompt(row)
    outputs = _require(row, "output", list, "a list of ranked answers")
    bad = next((i for i, o in enumerate(outputs) if not isinstance(o, str)), None)
    if bad is not None:
        raise DataFormatError(f"'output' must hold string answers; item {bad} is {type(outputs[bad]).__name__}")
    if len(outputs) < 2:
        raise DataFormatError(f"'output' needs at least 2 string answers, got {len(outputs)} item(s)")
    return _ranked_list(row, prompt, [o.strip() for o in outputs])


# ---------------------------------------------------------------- generic ranked / scored lists

def _parse_list(row: Mapping) -> PreferencePair:
    """``prompt`` (a string or messages), ``responses`` (strings or assistant messages) and one of ``scores``
    (higher is better) or ``ranking`` (each response's rank, lower is better: 1 = best); equal values are ties."""
    prompt = _prompt_field(row)
    responses = _require(row, "responses", list, "a list of answers")
    answers = []
    for i, item in enumerate(responses):
        if isinstance(item, str):
            answers.append(item.strip())
            continue
        message = parse_message(item, f"responses[{i}]")
        if message["role"] != "assistant":
            raise DataFormatError(f"responses[{i}] must be an assistant message, got role {message['role']!r}")
        answers.append(message["content"])
    key = "scores" if "scores" in row else "ranking"
    values = _require(row, key, list, "a list of numbers")
    if len(values) != len(answers):
        raise DataFormatError(f"{key!r} has {len(values)} values for {len(answers)} responses")
    numbers = [_number(v, f"{key}[{i}]") for i, v in enumerate(values)]
    return _ranked_list(row, prompt, answers, numbers if key == "scores" else [-v for v in numbers])


def _parse_completions(row: Mapping) -> PreferencePair:
    """UltraFeedback's raw layout: ``instruction`` and ``completions`` ``[{"response", "overall_score"}...]``
    (``fine-grained_score`` when there is no ``overall_score``). A completion without a usable response or score is
    dropped and counted."""
    prompt = _instruction_prompt(row)
    completions = _require(row, "completions", list, "a list of completions")
    answers, scores = [], []
    for item in completions:
        text = item.get("response") if isinstance(item, Mapping) else None
        score = next((item[k] for k in ("overall_score", "fine-grained_score") if isinstance(item, Mapping)
                      and k in item), None)
        try:
            score = _number(score, "score")
        except DataFormatError:
            text, score = None, 0.0
        answers.append(text.strip() if isinstance(text, str) else None)
        scores.append(score)
    return _ranked_list(row, prompt, answers, scores)


# ---------------------------------------------------------------- chosen list / rejected list (RewardBench 2)

def _string_lists(row: Mapping) -> bool:
    return all(isinstance(row.get(k), list) and row[k] and all(isinstance(t, str) for t in row[k])
               for k in ("chosen", "rejected"))


def _parse_lists(row: Mapping) -> PreferencePair:
    """``prompt`` (a string or messages), ``chosen`` and ``rejected``: non-empty lists of answer strings. Every
    chosen answer beats every rejected one and chosen answers tie among themselves (a scored list, chosen 1,
    rejected 0), so the comparisons are ``len(chosen) * len(rejected)``; RewardBench 2 rows have this layout."""
    chosen, rejected = [t.strip() for t in row["chosen"]], [t.strip() for t in row["rejected"]]
    return _ranked_list(row, _prompt_field(row), chosen + rejected, [1.0] * len(chosen) + [0.0] * len(rejected))


# ---------------------------------------------------------------- registry

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("hh-rlhf", _detect_hh, _parse_hh,
           'Anthropic transcripts: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}'),
    Format("hh_rlhf_cn", lambda row: {"context", "chosen", "rejected"} <= row.keys(), _parse_hh_cn,
           '{"context": [{"role", "text"}...], "chosen": {"role", "text"}, "rejected": {"role", "text"}}'),
    Format("chosen_rejected_lists", lambda row: {"chosen", "rejected"} <= row.keys() and _string_lists(row),
           _parse_lists, '{"prompt": str | messages, "chosen": [str...], "rejected": [str...]} (RewardBench 2: every '
           'chosen beats every rejected)'),
    Format("prompt_chosen_rejected", _detect_flat, _parse_flat,
           '{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}'),
    Format("sharegpt_pairs", lambda row: {"conversations", "chosen", "rejected"} <= row.keys(), _parse_sharegpt,
           '{"conversations": [{"from", "value"}...], "chosen": {"from", "value"} | str, "rejected": ...}'),
    Format("ranked_outputs", lambda row: {"instruction", "output"} <= row.keys(), _parse_ranked,
           '{"instruction": str, "input": str, "output": [best, second, ...], "history": [[user, assistant]...]}'),
    Format("ranked_list", lambda row: "responses" in row and ("scores" in row or "ranking" in row), _parse_list,
           '{"prompt": str | messages, "responses": [str | message...], "scores": [higher better] | "ranking": '
           '[rank, 1 = best]}'),
    Format("completions", lambda row: {"instruction", "completions"} <= row.keys(), _parse_completions,
           '{"instruction": str, "completions": [{"response": str, "overall_score": number}...]} (UltraFeedback)'),
)}


def detect_format(row: Mapping) -> str:
    """Name (a key of :data:`FORMATS`) of the first format whose ``detect`` accepts ``row``.

    Raises:
        DataFormatError: ``row`` is not an object, or no format matches (the message lists the keys seen and the
            formats known).
    """
    if not isinstance(row, Mapping):
        raise DataFormatError(f"row must be a JSON object, got {type(row).__name__}")
    for fmt in FORMATS.values():
        if fmt.detect(row):
            return fmt.name
    raise DataFormatError(f"unrecognised row format (keys: {_keys(row)}); known formats: {', '.join(FORMATS)}")


def parse_row(row: Mapping, fmt: str | None = None) -> PreferencePair:
    """Parse one row into a :class:`PreferencePair` (``source``/``origin`` left empty for the caller to fill).

    Args:
        row: the decoded row (a mapping).
        fmt: a key of :data:`FORMATS`; None detects it with :func:`detect_format`.
    Raises:
        ValueError: ``fmt`` is not a known format name.
        DataFormatError: the row is not usable: undetectable format, missing keys, wrong types, unknown roles,
            empty chosen/rejected after stripping, chosen == rejected, a non-numeric margin, text that is not
            valid Unicode (lone surrogates from ``\\ud800``-style JSON escapes), ...
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if fmt is None or not isinstance(row, Mapping):
        fmt = detect_format(row)  # raises for a row that is not an object
    return FORMATS[fmt].parse(row)
