"""One text layout for training, evaluation and scoring: render a conversation and an answer, then tokenize.

The sequence scored for a (prompt, answer) pair is ``[bos?] prompt_ids answer_ids reward_id`` where ``reward_id`` is
the EOS (or a dedicated reward token). Over-long sequences lose the start of the prompt first; the answer is cut
only when it alone does not fit, and the reward token is always kept.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from coati.data.formats import ordered_pairs, tied_pairs

#: how a prompt and answer are rendered into text: ``coati`` (this trainer's template, from an export's
#: train_config.json), ``chat`` (the tokenizer's chat template), ``text`` (plain ``Human: / Assistant:`` turns);
#: ``auto`` resolves to one of the others (:meth:`coati.scoring.RewardScorer.from_pretrained`, ``--layout``)
LAYOUTS = ("auto", "coati", "chat", "text")

_PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}

#: the longest a chat template may take to render one conversation (seconds); real templates take milliseconds.
#: A template comes with a model folder a user was handed, and jinja's sandbox bounds each range() but not the
#: loops nested around them.
TEMPLATE_SECONDS = 5.0
_JINJA_FILENAME = "<template>"  # the file name jinja gives the Python code it compiles a template to


class ChatTemplateError(ValueError):
    """A chat template that failed to render, tripped jinja's sandbox, or ran past :data:`TEMPLATE_SECONDS`."""


def apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                   add_generation_prompt: bool, seconds: float | None = None) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, ...)``, bounded in time and failing in one line.

    The bound is checked in the rendering thread itself (a trace function on the template's compiled code and on
    every call it makes, installed for this call only), so it holds in a server's worker threads too, where no
    signal can interrupt a render.

    Raises:
        ChatTemplateError: the template raised (jinja's ``TemplateError``, its sandbox's ``SecurityError``, or any
            other error) or took longer than ``seconds`` (default :data:`TEMPLATE_SECONDS`).
    """
    limit = TEMPLATE_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + limit

    def in_template(frame, event, arg):  # 'line' events of the template's own code (its loops)
        if event == "line" and time.monotonic() > deadline:
            raise _TemplateTimeout
        return in_template

    def on_call(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TemplateTimeout
        return in_template if frame.f_code.co_filename == _JINJA_FILENAME else None

    whose = f"the chat template of {tokenizer.name_or_path}" if getattr(tokenizer, "name_or_path", "") \
        else "the chat template"
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except _TemplateTimeout:
        raise ChatTemplateError(f"{whose} took longer than {limit:g} s to render a conversation of "
                                f"{len(messages)} messages; refused") from None
    except RecursionError:
        raise ChatTemplateError(f"{whose} recursed too deeply") from None
    except Exception as e:  # jinja2.TemplateError, SecurityError, or what the template's own code raised
        text = " ".join(str(e).split())[:300]
        raise ChatTemplateError(f"{whose} failed: {type(e).__name__}: {text}") from None
    finally:
        sys.settrace(previous)


class _TemplateTimeout(Exception):
    pass


def use_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """Whether conversations are rendered with the tokenizer's chat template.

    Args:
        mode: ``auto`` (when the tokenizer has one), ``always`` or ``never``.
    Raises:
        ValueError: ``always`` with a tokenizer that has no chat template.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has:
        raise ValueError("--chat_template always, but the tokenizer has no chat template")
    return has and mode != "never"


def render_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase | None,
                  chat_template: bool) -> str:
    """Text that precedes the answer.

    With ``chat_template`` the tokenizer's template is applied with the generation prompt (the answer follows it).
    Otherwise the hh-rlhf layout is used: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` ending in ``"\\n\\nAssistant: "``.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, possibly empty.
    """
    if chat_template and tokenizer is not None:
        return apply_template(tokenizer, messages, add_generation_prompt=True) if messages else ""
    parts = [f"\n\n{_PLAIN_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "".join(parts) + "\n\nAssistant: "


@dataclass
class Encoded:
    """Token ids of one scored sequence.

    Attributes:
        input_ids: ``list[int]``, ending in the reward token; ``len <= max_len``.
        prompt_truncated: the prompt lost tokens from its start.
        answer_truncated: the answer lost tokens from its end (it alone did not fit).
    """

    input_ids: list[int]
    prompt_truncated: bool
    answer_truncated: bool


class SequenceEncoder:
    """Tokenizes (prompt text, answer text) into a scored sequence of at most ``max_len`` tokens.

    Args:
        tokenizer: a tokenizer prepared by :func:`coati.models.loading.prepare_tokenizer`.
        max_len: maximum sequence length in tokens (>= 8).
        reward_token_id: id appended after the answer where the reward is read (default: EOS).
        min_prompt_tokens: when the answer is too long, this many prompt tokens (the end of the prompt) are kept
            and the answer is cut instead; default ``max_len // 4``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int, reward_token_id: int | None = None,
                 min_prompt_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.reward_token_id = tokenizer.eos_token_id if reward_token_id is None else reward_token_id
        probe = tokenizer("").input_ids  # what the tokenizer adds by itself
        bos = tokenizer.bos_token_id
        self.prefix = [bos] if bos is not None and probe and probe[0] == bos else []
        self.min_prompt_tokens = max_len // 4 if min_prompt_tokens is None else min_prompt_tokens

    def encode(self, prompt: str, answer: str) -> Encoded:
        """Encode one sequence from text; see the module docstring for the truncation rule."""
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=False).input_ids if prompt else []
        return self.encode_ids(p, tok(answer, add_special_tokens=False).input_ids)

    def encode_ids(self, prompt_ids: list[int], answer_ids: list[int]) -> Encoded:
        """Encode one sequence from already tokenized prompt and answer (no special tokens)."""
        p, a = list(prompt_ids), list(answer_ids)
        budget = self.max_len - len(self.prefix) - 1  # room for prompt + answer
        keep = min(len(p), max(budget - len(a), self.min_prompt_tokens))  # prompt tokens kept (its end)
        prompt_cut, answer_cut = keep < len(p), keep + len(a) > budget
        return Encoded(self.prefix + p[len(p) - keep:] + a[:budget - keep] + [self.reward_token_id], prompt_cut,
                       answer_cut)

    def fit_whole(self, ids: list[int], prefix: list[int] | tuple[int, ...] = ()) -> Encoded:
        """Cut a sequence that was tokenized whole (the ``chat`` / ``text`` layouts of another trainer's model, the
        server's raw ``text``) to ``max_len``: its oldest tokens go, as the prompt's do in :meth:`encode_ids`, after
        ``prefix`` (the BOS ``ids`` start with, kept in front). The one truncation rule besides :meth:`encode_ids`.

        Returns:
            :class:`Encoded` with ``prompt_truncated`` True when tokens were cut (the start of a whole text is its
            prompt), ``answer_truncated`` False.
        """
        if len(ids) <= self.max_len:
            return Encoded(list(ids), False, False)
        return Encoded(list(prefix) + list(ids[len(ids) - (self.max_len - len(prefix)):]), True, False)


@dataclass
class TokenizedPair:
    """A preference pair, or a ranked list of K >= 2 answers to one prompt, ready for batching.

    Attributes:
        chosen_ids / rejected_ids: ``list[int]`` scored sequences (see :class:`SequenceEncoder`) of the first two
            answers (of a list: the best and the second best).
        margin: the row's margin or None.
        lang: ``"en"`` or ``"zh"``; source: dataset name or file.
        more_ids: the sequences of answers 3..K of a ranked list, in rank order (empty for a pair).
        scores: for a scored list, the K answers' scores (higher is better, non-increasing; equal scores are ties and
            give no comparison); None: strictly ranked in order (a pair: chosen beats rejected).
        answer_lengths: the K answers' lengths in tokens (the answer alone, before any cut to ``max_len``), in rank
            order, for the length-bias figures (:func:`coati.metrics.length_bias`); None when unknown.
    """

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None
    lang: str
    source: str
    more_ids: list[list[int]] = field(default_factory=list)
    scores: list[float] | None = None
    answer_lengths: list[int] | None = None

    @property
    def sequences(self) -> list[list[int]]:
        """The K scored sequences in rank order: ``[chosen_ids, rejected_ids, *more_ids]``."""
        return [self.chosen_ids, self.rejected_ids, *self.more_ids]

    def comparisons(self, margin_from_scores: bool = False) -> list[tuple[int, int, float | None]]:
        """The ordered pairs of the list: ``(winner, loser, margin)`` with indices into :attr:`sequences`.

        All ``C(K, 2)`` pairs ``i < j`` of a strictly ranked list (a pair: ``[(0, 1, margin)]``); of a scored list
        those with ``scores[i] > scores[j]`` (ties give none). The margin is the row's ``margin`` (None without
        one), or with ``margin_from_scores`` (scored lists only) the score difference ``scores[i] - scores[j]``.
        """
        pairs = ordered_pairs(2 + len(self.more_ids), self.scores)
        if self.scores is None or not margin_from_scores:
            return [(i, j, self.margin) for i, j in pairs]
        return [(i, j, self.scores[i] - self.scores[j]) for i, j in pairs]

    def ties(self) -> list[tuple[int, int]]:
        """The tied answers ``(i, j)``, ``i < j`` (equal scores; :func:`~coati.data.formats.tied_pairs`)."""
        return tied_pairs(2 + len(self.more_ids), self.scores)


@dataclass
class TruncationStats:
    """How many pairs lost tokens to ``max_len`` (counted, never dropped)."""

    pairs: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0

    def summary(self) -> str:
        """One line for logs."""
        return (f"{self.pairs} pairs tokenized; {self.prompt_truncated} had the prompt cut from the left, "
                f"{self.answer_truncated} had an answer cut at the end (max_len reached)")


def tokenize_pairs(pairs: list, encoder: SequenceEncoder, chat_template: bool,
                   chunk: int = 512) -> tuple[list[TokenizedPair], TruncationStats]:
    """Render and tokenize :class:`~coati.data.formats.PreferencePair` objects (each prompt tokenized once; the
    answers of a ranked list all of them).

    Returns:
        the tokenized pairs (and lists) in input order, and truncation counts.
    """
    tok = encoder.tokenizer
    out: list[TokenizedPair] = []
    stats = TruncationStats()
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        prompts = [render_prompt(p.prompt, tok, chat_template) for p in part]
        answers = [a for p in part for a in p.responses]
        ids = tok(prompts + answers, add_special_tokens=False).input_ids
        at = len(part)
        for i, pair in enumerate(part):
            k = len(pair.responses)
            encoded = [encoder.encode_ids(ids[i], a) for a in ids[at:at + k]]
            at += k
            stats.pairs += 1
            stats.prompt_truncated += int(any(e.prompt_truncated for e in encoded))
            stats.answer_truncated += int(any(e.answer_truncated for e in encoded))
            seqs = [e.input_ids for e in encoded]
            out.append(TokenizedPair(seqs[0], seqs[1], pair.margin, pair.lang, pair.source, seqs[2:],
                                     None if pair.scores is None else list(pair.scores),
                                     [len(a) for a in ids[at - k:at]]))
    return out, stats
