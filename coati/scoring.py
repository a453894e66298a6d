"""Use a trained reward model: load an exported folder and score texts, preference pairs or Best-of-N candidates.

The exported folder (see :func:`coati.checkpoint.export.export_hf`) is a Hugging Face
``*ForSequenceClassification`` with ``num_labels == 1``, its tokenizer and ``train_config.json``.
:class:`RewardScorer` scores text exactly as the trainer did, so rewards are comparable with the ones seen in
training:

* the conversation is rendered with :func:`coati.data.template.render_prompt` (the tokenizer's chat template when
  ``use_chat_template(tokenizer, train_config["chat_template"])`` says so, default mode ``auto``; otherwise the
  hh-rlhf ``"\\n\\nHuman: ...\\n\\nAssistant: "`` layout);
* prompt and answer are tokenized separately and joined by :class:`coati.data.template.SequenceEncoder` with the
  reward token (``config.reward_token_id``, else the tokenizer's EOS) appended; sequences longer than ``max_len``
  (``train_config["max_len"]`` unless overridden) lose the start of the prompt first, as in training;
* the reward is the value head on the hidden state of that last token (:class:`coati.models.reward_model.RewardModel`),
  so scores do not depend on padding or on which other texts share a batch.

As in training data (:mod:`coati.data.formats`), surrounding whitespace is stripped from every message and answer,
and an empty answer (:func:`~coati.data.formats.check_answer`: empty, whitespace or only invisible format characters
such as U+200B) or text with a lone surrogate is an error. So are NaN/inf weights (refused when loaded) and a
non-finite score (never returned).

Example::

    scorer = RewardScorer.from_pretrained("out/rm")
    scores = scorer.score_texts(["What is 2+2?"] * 2, ["4.", "5."])
    scores, best = scorer.best_of_n("What is 2+2?", ["4.", "5.", "four"])
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification

from coati.checkpoint.export import non_finite_names
from coati.config import DataArgs, ModelArgs
from coati.data.batch import list_layout, pad_sequences
from coati.data.formats import check_answer, check_text, ordered_pairs, parse_message
from coati.data.sources import content_digest
from coati.data.template import (LAYOUTS, Encoded, SequenceEncoder, TruncationStats, apply_template, render_prompt,
                                 tokenize_pairs, use_chat_template)
from coati.metrics import top1_correct
from coati.models.backbones import Backbone, backbone_for
from coati.models.internlm2 import internlm2_to_llama_config, load_internlm2
from coati.models.loading import (BITSANDBYTES_INSTALL, check_weight_files, load_explained, load_tokenizer,
                                  quantization_config)
from coati.models.lora import keep_standard_4bit_layout
from coati.models.reward_model import RewardModel

logger = logging.getLogger(__name__)

#: used when an export has no ``train_config.json`` (a plain HF reward model): the trainer's defaults.
DEFAULTS = DataArgs()

Prompt = str | Sequence[dict] | None

#: default ``max_len`` of the ``chat`` / ``text`` layouts (another trainer's model: no train_config.json to read).
FOREIGN_MAX_LEN = 2048


def scoring_backbone(config) -> Backbone:
    """The registry entry of ``config.model_type`` (:func:`~coati.models.backbones.backbone_for`), or for a model
    type coati does not train (Qwen2, Gemma, ...) a scoring-only entry: padded batches with transformers' own
    attention, no packing."""
    try:
        return backbone_for(config)
    except ValueError:
        pass
    return Backbone(name=config.model_type, config_class=type(config), model_class=AutoModelForSequenceClassification,
                    model_types=(config.model_type,), lora_targets=(), packs=False)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on, checked: the one place ``--device`` and ``device=`` are parsed.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a ``torch.device``...; None = CUDA when available,
            else CPU.
    Raises:
        ValueError: a string torch cannot parse (``"gpu0"``), or a device this machine does not have (CUDA on a
            CPU-only build or without a visible GPU, a device index beyond the device count).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device}: not a device name (expected cpu, cuda or cuda:N, e.g. --device "
                         "cuda:0)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not callable(getattr(backend, "is_available", None)):
        raise ValueError(f"--device {device}: {dev.type} is not a device models can be scored on; use --device "
                         "cpu or cuda")
    if not backend.is_available():
        why = "" if dev.type != "cuda" else (f" (torch {torch.__version__} is a CPU-only build)"
                                             if torch.version.cuda is None else " (no CUDA GPU is visible)")
        name = "CUDA" if dev.type == "cuda" else dev.type
        raise ValueError(f"--device {device}: {name} is not available here{why}; use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"--device {device}: this machine has {count()} {dev.type} device(s) (indices from 0)")
    return dev


def normalize_prompt(prompt: Prompt) -> list[dict[str, str]]:
    """Turn a prompt into ``[{"role", "content"}, ...]`` messages, as the training data parser does.

    Args:
        prompt: None or ``""`` (empty prompt), a string (one user message), or a list of messages
            ``{"role"|"from": "system"|"user"|"assistant"|"human"|"gpt"|"bot", "content"|"value"|"text": str}``.
    Returns:
        messages with normalised roles and stripped contents.
    Raises:
        ValueError: another type; ``DataFormatError`` (a ValueError) for a message that is not an object, an unknown
            role or a non-string content, from the training data parser's :func:`~coati.data.formats.parse_message`,
            or text with a lone surrogate (``"prompt message 0 is not valid Unicode (...)"``).
    """
    if prompt is None or isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt.strip()}] if prompt and prompt.strip() else []
    elif isinstance(prompt, (list, tuple)):
        messages = [parse_message(msg, f"prompt[{i}]") for i, msg in enumerate(prompt)]
    else:
        raise ValueError(f"a prompt must be a string, a list of messages or None, got {type(prompt).__name__}")
    for i, message in enumerate(messages):
        check_text(f"prompt message {i}", message["content"])
    return messages


@dataclass
class PairScores:
    """What :meth:`RewardScorer.score_pairs` returns for N inputs (pairs or ranked lists) giving M comparisons.

    Attributes:
        chosen / rejected: ``[M]`` float32 CPU tensors, the raw rewards of each comparison's winner and loser, in
            input order (M = N for pairs; a ranked list gives its ordered pairs).
        owner: ``list[int]`` (M), the input index of each comparison.
        top1: ``[N]`` bool, whether each input's best answer scored highest (:func:`coati.metrics.top1_correct`).
        answer_rewards: N lists of floats, every answer's reward in each input's
            :attr:`~coati.data.formats.PreferencePair.responses` order (chosen, rejected, then the rest).
        lengths: two ``[M]`` int64 tensors, the winner's and the loser's answer length in tokens (each answer alone,
            before any cut to ``max_len``).
        truncation: :class:`~coati.data.template.TruncationStats` of the inputs.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    owner: list[int]
    top1: torch.Tensor
    answer_rewards: list[list[float]]
    lengths: tuple[torch.Tensor, torch.Tensor]
    truncation: TruncationStats


@dataclass
class _Answers:
    """What :func:`~coati.data.batch.list_layout` reads of a tokenized item, for layouts that encode each answer
    whole: the number of answers (placeholder sequences) and their scores."""

    count: int
    scores: list[float] | None

    @property
    def sequences(self) -> list[list[int]]:
        return [[]] * self.count

    def comparisons(self, margin_from_scores: bool = False) -> list[tuple[int, int, None]]:
        return [(i, j, None) for i, j in ordered_pairs(self.count, self.scores)]


def check_recipe_unchanged(path: str, train_config: dict) -> None:
    """Refuse an export whose ``train_config.json`` differs from the one it was exported with (the digest that
    ``summary.json`` records, exports from this version on): the scorer lays texts out by it (``max_len``, chat
    template), so an edited one would silently score another layout than the one trained.

    Raises:
        ValueError: one line naming the file.
    """
    summary_path = os.path.join(path, "summary.json")
    if not train_config or not os.path.isfile(summary_path):
        return
    try:
        recorded = json.loads(Path(summary_path).read_text(encoding="utf-8")).get("train_config_sha256")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(recorded, str) and recorded != content_digest(train_config):
        raise ValueError(f"{path}/train_config.json was changed after the export (summary.json records another "
                         "digest of it); the layout it gives (max_len, chat template) may not be the one trained: "
                         "restore it, or score with --layout chat / text")


def _read_model_folder(path: str, load_in_4bit: bool) -> tuple[dict, Any, dict]:
    """``(config.json as a dict, the model config, train_config.json or {})`` of a reward-model folder; an
    InternLM2 reward model's config converted to LLaMA's (:func:`coati.models.internlm2.internlm2_to_llama_config`).

    Raises:
        ValueError: not a folder, no ``config.json``, an InternLM2 model with ``load_in_4bit``, or not a
            single-output model (``num_labels != 1``).
    """
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such model folder (expected an export written by train_reward_model.py "
                         "--save_path)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a reward-model export (no config.json); pass the --save_path folder of a "
                         "training run")
    raw = json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
    raw = raw if isinstance(raw, dict) else {}
    internlm2 = raw.get("model_type") == "internlm2"
    if internlm2 and load_in_4bit:
        raise ValueError(f"{path}: --load_in_4bit is not supported for InternLM2 reward models (they are "
                         "converted in fp32)")
    config = internlm2_to_llama_config(raw) if internlm2 else \
        load_explained(lambda: AutoConfig.from_pretrained(path, trust_remote_code=False), path)
    if getattr(config, "num_labels", None) != 1:
        raise ValueError(f"{path}: config.json has num_labels={getattr(config, 'num_labels', None)}, a reward "
                         "model export has num_labels=1 (one scalar per sequence)")
    tc_path = os.path.join(path, "train_config.json")
    train_config = json.loads(Path(tc_path).read_text(encoding="utf-8")) if os.path.isfile(tc_path) else {}
    return raw, config, train_config


def _text_layout(path: str, layout: str, tokenizer, train_config: dict, max_len: int | None) -> tuple[str, int, bool]:
    """``(layout, max_len, chat template on)`` of a folder (:meth:`RewardScorer.from_pretrained`'s ``layout``):
    ``auto`` resolved, ``coati``'s settings and recipe digest read from ``train_config``.

    Raises:
        ValueError: ``chat`` without a chat template, ``max_len`` < 8, an edited recipe
            (:func:`check_recipe_unchanged`).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if layout == "auto":
        layout = "coati" if train_config else "chat" if has_template else "text"
    if layout == "coati":
        check_recipe_unchanged(path, train_config)
    if layout == "chat" and not has_template:
        raise ValueError(f"{path}: layout chat, but its tokenizer has no chat template (use layout text)")
    if layout == "coati" and not train_config:
        logger.warning("%s has no train_config.json: using max_len=%d and chat_template=%s; scores may not match "
                       "the layout the model was trained on", path, DEFAULTS.max_len, DEFAULTS.chat_template)
    default_len = train_config.get("max_len", DEFAULTS.max_len) if layout == "coati" else FOREIGN_MAX_LEN
    max_len = int(max_len if max_len is not None else default_len)
    if max_len < 8:
        raise ValueError(f"max_len must be at least 8, got {max_len}")
    chat = use_chat_template(tokenizer, train_config.get("chat_template") or DEFAULTS.chat_template) \
        if layout == "coati" else layout == "chat"
    return layout, max_len, chat


def _load_value_model(path: str, internlm2: bool, tokenizer, dtype: torch.dtype, device: torch.device,
                      load_in_4bit: bool):
    """The ``*ForSequenceClassification`` model of a folder in eval mode on ``device``, its value head ``score`` in
    fp32 (4-bit NF4 linear layers with ``load_in_4bit``; an InternLM2 reward model converted, ``v_head`` as ``score``).

    Raises:
        ValueError: unreadable weight files (:func:`coati.models.loading.check_weight_files`), no ``score`` head,
            or weights that are not finite.
    """
    quantization = quantization_config(ModelArgs(load_in_4bit=True), dtype) if load_in_4bit else None
    check_weight_files(path)
    if internlm2:
        hf_model = load_explained(lambda: load_internlm2(path, pad_token_id=tokenizer.pad_token_id,
                                                         reward_head=True).to(dtype), path)
    else:
        hf_model = load_explained(lambda: AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, **({} if quantization is None else {
                "quantization_config": quantization, "device_map": {"": str(device)}})), path)
    if not isinstance(getattr(hf_model, "score", None), torch.nn.Linear):
        raise ValueError(f"{path}: {type(hf_model).__name__} has no 'score' head (Linear(hidden, 1)); coati "
                         "reads decoder reward models whose value head is 'score', as transformers' "
                         "*ForSequenceClassification and coati's exports have")
    if bad := non_finite_names(hf_model):  # one torch.isfinite(p).all() per parameter, no copies
        what = "1 weight tensor is" if len(bad) == 1 else f"{len(bad)} weight tensors are"
        loaded = str(hf_model.dtype).replace("torch.", "")
        advice = ("this export is broken, retrain it" if loaded == "float32" else f"they do not fit in {loaded}: "
                  "load it in float32 (--dtype float32), or retrain it if that fails too")
        raise ValueError(f"{path}: {what} not finite (NaN/inf), e.g. {bad[0]}; {advice}")
    hf_model.score.to(torch.float32)  # RewardModel runs the value head in fp32
    if quantization is None:  # a quantised model was loaded onto the device
        hf_model.to(device)
    else:
        keep_standard_4bit_layout(hf_model)  # scores computed in the chosen dtype, not bnb's bf16 CPU kernel
    return hf_model.eval()


class RewardScorer:
    """A loaded reward model that scores (prompt, response) texts in the trainer's layout.

    Build it with :meth:`from_pretrained`. All scoring methods run under ``torch.no_grad`` in batches of
    ``batch_size`` sequences, sorted by length inside (less padding); results come back in input order.

    Attributes:
        model: the :class:`~coati.models.reward_model.RewardModel` (eval mode) on ``device``.
        tokenizer: the export's tokenizer (right padding, pad id distinct from the reward token).
        encoder: the :class:`~coati.data.template.SequenceEncoder` (``max_len``, reward token id).
        chat_template: whether prompts are rendered with the tokenizer's chat template.
        train_config: the export's ``train_config.json`` (``{}`` when absent).
        device: where the model runs; batch_size: sequences per forward pass.
        reward_mean / reward_std: the statistics of ``normalize=True`` (``config.json``'s, or given), or None; set
            them with :meth:`set_normalization`.
        layout: how a (prompt, response) becomes tokens (:data:`LAYOUTS`): ``coati`` (the trainer's), ``chat`` or
            ``text`` (other trainers' reward models: see :meth:`from_pretrained`).
        strip_pad_id: with ``chat`` / ``text``, trailing tokens with this id (the model's ``pad_token_id``) are not
            scored, so the reward is read where transformers' sequence-classification pooling reads it (the last
            token that is not the pad id); None: nothing stripped.
        append_reward_token: with ``chat``, the config's ``reward_token_id`` is appended to every text.
    """

    def __init__(self, model: RewardModel, tokenizer, encoder: SequenceEncoder, chat_template: bool,
                 device: torch.device, batch_size: int = 8, train_config: dict | None = None,
                 reward_mean: float | None = None, reward_std: float | None = None, path: str = "",
                 layout: str = "coati", strip_pad_id: int | None = None, append_reward_token: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if layout not in LAYOUTS[1:]:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS[1:])}, got {layout!r}")
        self.model, self.tokenizer, self.encoder, self.chat_template = model, tokenizer, encoder, chat_template
        self.device, self.batch_size, self.train_config, self.path = device, batch_size, train_config or {}, path
        self.layout, self.strip_pad_id, self.append_reward_token = layout, strip_pad_id, append_reward_token
        self.set_normalization(reward_mean, reward_std)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                        max_len: int | None = None, batch_size: int = 8, reward_mean: float | None = None,
                        reward_std: float | None = None, load_in_4bit: bool = False,
                        layout: str = "auto") -> RewardScorer:
        """Load a reward model folder: a coati export, another trainer's ``*ForSequenceClassification`` export with one
        label (TRL's, for example), or a released InternLM2 reward model (``InternLM2ForRewardModel``).

        Args:
            path: folder written by :func:`coati.checkpoint.export.export_hf`; or any HF ``*ForSequenceClassification``
                folder with ``num_labels == 1``, a ``score`` head and a tokenizer; or an InternLM2 reward model
                (``model_type: internlm2`` with ``v_head.weight``), converted without remote code as the backbone
                is (:func:`coati.models.internlm2.load_internlm2` with ``reward_head``).
            layout: how each (prompt, response) is turned into tokens, i.e. which layout the model was trained on:

                * ``coati``: the trainer's (the module docstring), settings from ``train_config.json`` (without one:
                  ``max_len=512`` and ``chat_template=auto``, with a warning);
                * ``chat``: the whole conversation, the response as its last assistant message, rendered by the
                  tokenizer's chat template and tokenized as one text (no special tokens added), then
                  ``config.reward_token_id`` appended when the config has one (InternLM2 reward models); TRL's
                  ``RewardTrainer`` on conversational data;
                * ``text``: the prompt in the hh-rlhf layout, the response and the EOS text, tokenized with the
                  tokenizer's special tokens (TRL's ``RewardTrainer`` on plain-text data);
                * ``auto`` (default): ``coati`` when ``train_config.json`` exists, else ``chat`` when the tokenizer
                  has a chat template, else ``text``.

                With ``chat`` / ``text`` the reward of a ``*ForSequenceClassification`` model is read where its own
                pooling reads it (trailing ``pad_token_id`` tokens are not scored; :attr:`strip_pad_id`), an
                InternLM2 reward model's at its reward token; over-long texts lose tokens from the start (flagged
                ``prompt_truncated``) and ``max_len`` defaults to 2048.
            device: ``"cuda"``, ``"cpu"``, a ``torch.device``...; default CUDA when available, else CPU; checked by
                :func:`resolve_device` before anything is loaded.
            dtype: weights dtype of the backbone (``torch.float32``, ``torch.bfloat16``, ...); the value head always
                runs in fp32 and scores are fp32.
            max_len: maximum tokens per scored sequence; default ``train_config["max_len"]``.
            batch_size: sequences per forward pass (>= 1).
            reward_mean / reward_std: normalisation statistics overriding ``config.json``'s ``reward_mean`` /
                ``reward_std`` (both or neither).
            load_in_4bit: load the backbone's linear layers as bitsandbytes NF4 (double quantisation, computing in
                ``dtype``) on ``device``: about a quarter of the fp32 weight memory; scores move by the
                quantisation error (measured in docs/qlora.md); the value head stays fp32.
        Returns:
            the scorer, model in eval mode on ``device``.
        Raises:
            ValueError: ``path`` is not a folder, has no ``config.json``, is not a single-output sequence
                classifier (``num_labels != 1``) or has no ``score`` head, is an InternLM2 checkpoint without
                ``v_head``, has weights that are not finite (NaN/inf), a bad or unavailable ``device``
                (:func:`resolve_device`), bad ``max_len`` / ``batch_size`` / statistics / ``layout`` (``chat``
                without a chat template), or ``load_in_4bit`` without the bitsandbytes package (or with an InternLM2
                reward model).
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        dev = resolve_device(device)
        if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"--load_in_4bit needs the bitsandbytes package: {BITSANDBYTES_INSTALL}")
        path = os.fspath(path)
        raw, config, train_config = _read_model_folder(path, load_in_4bit)
        internlm2 = raw.get("model_type") == "internlm2"
        stored = raw.get("reward_token_id") if internlm2 else getattr(config, "reward_token_id", None)  # None: EOS
        tokenizer = load_tokenizer(path, reward_token="auto" if stored is None else str(stored))
        layout, max_len, chat = _text_layout(path, layout, tokenizer, train_config, max_len)
        encoder = SequenceEncoder(tokenizer, max_len, stored)
        hf_model = _load_value_model(path, internlm2, tokenizer, dtype, dev, load_in_4bit)
        model = RewardModel(hf_model, backbone_for(config) if layout == "coati" else scoring_backbone(config)).eval()
        if reward_mean is None and reward_std is None:
            reward_mean, reward_std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
            if (reward_mean is None) != (reward_std is None):
                logger.warning("%s/config.json has only one of reward_mean/reward_std; normalisation disabled", path)
                reward_mean = reward_std = None
        strip = None if internlm2 or layout == "coati" else getattr(config, "pad_token_id", None)
        return cls(model, tokenizer, encoder, chat, dev, batch_size, train_config, reward_mean, reward_std, path,
                   layout, strip, append_reward_token=layout == "chat" and stored is not None)

    def set_normalization(self, mean: float | None, std: float | None) -> None:
        """Set (or clear with ``None, None``) the statistics of ``normalize=True``: score = (r - mean) / std.

        Raises:
            ValueError: only one of them given, a non-finite value, or ``std <= 0``.
        """
        if (mean is None) != (std is None):
            raise ValueError("give both reward_mean and reward_std")
        if mean is not None:
            mean, std = float(mean), float(std)
            if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
                raise ValueError(f"reward statistics must be finite with std > 0, got mean={mean}, std={std}")
        self.reward_mean, self.reward_std = mean, std

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(r - reward_mean) / reward_std`` (OpenRLHF-style normalised reward), same shape and dtype.

        Raises:
            ValueError: the export stores no statistics and none were given.
        """
        if self.reward_mean is None:
            raise ValueError(f"{self.path or 'this model'}: config.json has no reward_mean/reward_std, so scores "
                             "cannot be normalised; retrain with a trainer that stores them (they are computed on the "
                             "evaluation set at the end of training), or pass the statistics (reward_mean=, "
                             "reward_std= / --reward_mean --reward_std, e.g. the reward_mean/reward_std of "
                             "python -m coati.evaluate)")
        return (rewards - self.reward_mean) / self.reward_std

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], progress: bool = False) -> torch.Tensor:
        """Rewards of N already encoded sequences (:meth:`encode` outputs: token id lists, each ending in the reward
        token, at most ``max_len`` long), ``progress``: a tqdm bar over batches (on stderr).

        Returns:
            ``[N]`` float32 CPU tensor of raw rewards, in input order, all finite.
        Raises:
            ValueError: an empty sequence, or a reward that is not finite (NaN/inf: the forward pass overflowed or
                the model is broken); a NaN is never returned as a score.
        """
        n = len(sequences)
        out = torch.empty(n, dtype=torch.float32)
        if any(len(s) == 0 for s in sequences):
            raise ValueError("cannot score an empty token sequence")
        order = sorted(range(n), key=lambda i: len(sequences[i]), reverse=True)
        for start in tqdm(range(0, n, self.batch_size), "scoring", unit="batch", disable=not progress, leave=False):
            idx = order[start:start + self.batch_size]
            ids, mask = pad_sequences([sequences[i] for i in idx], self.tokenizer.pad_token_id)
            rewards = self.model(ids.to(self.device), mask.to(self.device))
            out[torch.as_tensor(idx)] = rewards.float().cpu()
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
        if bad:
            hint = "" if self.model.hf_model.dtype == torch.float32 else " (try --dtype float32)"
            raise ValueError(f"{len(bad)} of {n} scores are not finite (NaN/inf), e.g. sequence {bad[0]} (0-based): "
                             f"the model's forward pass overflowed or the export is broken{hint}")
        return out

    def encode_texts(self, prompts: Sequence[Prompt] | None, responses: Sequence[str]) -> list[Encoded]:
        """Encode (prompt, response) pairs in the trainer's layout (see the module docstring), keeping truncation.

        Args:
            prompts: N prompts (a string, i.e. one user message, a list of messages or None: see
                :func:`normalize_prompt`), or None for N empty prompts.
            responses: N response strings (the final assistant answer; surrounding whitespace is stripped).
        Returns:
            N :class:`~coati.data.template.Encoded`: ``input_ids`` (``list[int]``, ending in the reward token, at
            most ``max_len`` long) and whether the prompt (``prompt_truncated``, cut from the left) or the answer
            (``answer_truncated``, its end cut) lost tokens to ``max_len``.
        Raises:
            ValueError: lengths differ, a response is not a string, is empty (``is_blank``: empty, whitespace or
                only invisible format characters) or has a lone surrogate, or a bad prompt.
        """
        if prompts is None:
            prompts = [None] * len(responses)
        if isinstance(prompts, str) or isinstance(responses, str):
            raise ValueError("prompts and responses must be lists (one item per text), not single strings")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise ValueError(f"responses[{i}] must be a string, got {type(r).__name__}")
            check_answer(f"responses[{i}]", r)
        if self.layout != "coati":
            return self._encode_whole([normalize_prompt(p) for p in prompts], [r.strip() for r in responses])
        tok = self.tokenizer
        keys, rendered = [], {}
        for p in prompts:  # each distinct prompt is rendered and tokenized once
            key = p if isinstance(p, str) or p is None else json.dumps(p, sort_keys=True, ensure_ascii=False)
            if key not in rendered:
                rendered[key] = render_prompt(normalize_prompt(p), tok, self.chat_template)
            keys.append(key)
        prompt_ids = dict(zip(rendered, tok(list(rendered.values()), add_special_tokens=False).input_ids
                              if rendered else []))
        answer_ids = tok([r.strip() for r in responses], add_special_tokens=False).input_ids if responses else []
        return [self.encoder.encode_ids(prompt_ids[k] if rendered[k] else [], a) for k, a in zip(keys, answer_ids)]

    def _encode_whole(self, prompts: list[list[dict]], responses: list[str]) -> list[Encoded]:
        """The ``chat`` / ``text`` layouts (:meth:`from_pretrained`): each conversation tokenized as one text."""
        tok, reward = self.tokenizer, self.encoder.reward_token_id
        if self.layout == "chat":
            texts = [apply_template(tok, p + [{"role": "assistant", "content": r}], add_generation_prompt=False)
                     for p, r in zip(prompts, responses)]
            ids = tok(texts, add_special_tokens=False).input_ids if texts else []
            extra = [reward] if self.append_reward_token else []
        else:
            texts = [render_prompt(p, tok, False) + r + (tok.eos_token or "") for p, r in zip(prompts, responses)]
            ids, extra = (tok(texts).input_ids if texts else []), []
        out = []
        for seq in ids:
            seq = list(seq) + extra
            while self.strip_pad_id is not None and len(seq) > 1 and seq[-1] == self.strip_pad_id:
                seq.pop()
            out.append(self.encoder.fit_whole(seq))
        return out

    def encode(self, prompts: Sequence[Prompt] | None, responses: Sequence[str]) -> list[list[int]]:
        """Token ids of (prompt, response) pairs: the ``input_ids`` of :meth:`encode_texts` (same errors)."""
        return [e.input_ids for e in self.encode_texts(prompts, responses)]

    def score_texts(self, prompts: Sequence[Prompt] | None, responses: Sequence[str], normalize: bool = False,
                    progress: bool = False) -> list[float]:
        """Score N (prompt, response) pairs (as :meth:`encode_texts` takes them): N floats in input order, fp32
        rewards (unitless value-head logits), or with ``normalize`` ``(r - reward_mean) / reward_std``.

        Raises:
            ValueError: as :meth:`encode_texts`, ``normalize`` without statistics, or a non-finite score.
        """
        return self.score_encoded(self.encode_texts(prompts, responses), normalize=normalize, progress=progress)

    def score_encoded(self, encoded: Sequence[Encoded], normalize: bool = False, progress: bool = False) -> list[float]:
        """Scores (N floats, as :meth:`score_texts`) of N :meth:`encode_texts` outputs, so a caller can also report
        their truncation. Raises ValueError: ``normalize`` without statistics, or a non-finite score."""
        if normalize:
            self.normalize(torch.zeros(1))  # fail before the (possibly long) forward passes
        rewards = self.score_ids([e.input_ids for e in encoded], progress=progress)
        if normalize:
            rewards = self.normalize(rewards)
        return rewards.tolist()

    def score_pairs(self, pairs: Sequence, progress: bool = False) -> PairScores:
        """Score N :class:`~coati.data.formats.PreferencePair` (pairs or ranked lists) exactly as the trainer's
        evaluation does (:func:`tokenize_pairs`, every answer scored once); ``progress``: tqdm bar over batches.

        Returns:
            :class:`PairScores`: the M comparisons' rewards, which input each comes from, per-input top-1 and
            answer rewards, the answers' lengths and the truncation counts.
        """
        if self.layout == "coati":
            items, truncation = tokenize_pairs(list(pairs), self.encoder, self.chat_template)
            layout = list_layout(items)
            sequences = layout.sequences
            answer_lengths = [it.answer_lengths for it in items]
        else:  # every answer encoded whole, in answer-major order as list_layout numbers them
            layout = list_layout([_Answers(len(p.responses), p.scores) for p in pairs])
            owners: list[tuple[int, int]] = [(0, 0)] * len(layout.sequences)  # sequence -> (item, answer)
            for b, idx in enumerate(layout.index):
                for k, n in enumerate(idx):
                    owners[n] = (b, k)
            encoded = self.encode_texts([pairs[b].prompt for b, _ in owners],
                                        [pairs[b].responses[k] for b, k in owners])
            sequences = [e.input_ids for e in encoded]
            cut = {b for (b, _), e in zip(owners, encoded) if e.prompt_truncated}
            truncation = TruncationStats(len(pairs), len(cut), 0)
            counts = iter(self.tokenizer([a for p in pairs for a in p.responses], add_special_tokens=False).input_ids)
            answer_lengths = [[len(next(counts)) for _ in p.responses] for p in pairs]
        rewards = self.score_ids(sequences, progress)
        index = torch.tensor(layout.pairs, dtype=torch.int64).reshape(-1, 2)
        lengths = torch.zeros(len(sequences), dtype=torch.int64)
        for idx, answer_len in zip(layout.index, answer_lengths):
            lengths[idx] = torch.tensor(answer_len, dtype=torch.int64)
        return PairScores(chosen=rewards[index[:, 0]].clone(), rejected=rewards[index[:, 1]].clone(),
                          owner=[layout.item[w] for w, _ in layout.pairs],
                          top1=top1_correct(rewards, torch.tensor(layout.item), torch.tensor(layout.best),
                                            len(layout.index)),
                          answer_rewards=[rewards[torch.tensor(idx)].tolist() for idx in layout.index],
                          lengths=(lengths[index[:, 0]], lengths[index[:, 1]]), truncation=truncation)

    def best_of_n(self, prompt: Prompt, responses: Sequence[str], normalize: bool = False) -> tuple[list[float], int]:
        """Score N >= 1 candidate responses to one prompt and pick the best (Best-of-N / rejection sampling).

        ``normalize`` as :meth:`score_texts` (the ranking is the same either way: std > 0).

        Returns:
            (scores, best): N floats in the order of ``responses``, and the index of the highest score (the first
            one on ties).
        Raises:
            ValueError: no responses, or see :meth:`score_texts`.
        """
        if not responses:
            raise ValueError("best_of_n needs at least one response")
        scores = self.score_texts([prompt] * len(responses), responses, normalize=normalize)
        return scores, scores.index(max(scores))
