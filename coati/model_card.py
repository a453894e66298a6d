"""The export's model card: a ``README.md`` in the Hugging Face Hub's format, written with every export.

The card is YAML front matter between two ``---`` lines (what the Hub indexes: base model, license, library,
pipeline, tags, datasets, languages), then Markdown: what the model is and how to read a reward with transformers,
the recipe (the flags that matter, then every other flag set away from its default), the data report's counts and the
final held-out figures overall, per language and per subset.

Every string a user chose (dataset specs, paths, subset names) goes into the YAML double-quoted unless it is a plain
word, and into Markdown with line breaks folded and Markdown's special characters backslash-escaped, so no name can end
the front matter, add a table row or cell, or turn into a link or HTML.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable

import yaml

from coati.config import TrainConfig

#: tags every card carries (the Hub lists models by tag)
TAGS = ("reward-model", "coati")

#: flags left out of the recipe's "other flags" table: where the run was written and how it was logged do not change
#: the model (``train_config.json`` holds every flag)
_NOT_RECIPE = frozenset({"save_path", "data_dir", "resume", "disable_tqdm", "report_to"})
#: flags the recipe's main table shows (under friendlier names), so the "other flags" table leaves them out
_MAIN_FLAGS = frozenset({"model", "model_config", "pretrain", "loss_fn", "lr", "lora_rank", "lora_alpha",
                         "lora_dropout", "max_len", "mixed_precision", "load_in_4bit", "load_in_8bit", "max_steps",
                         "dataset", "batch_size", "accumulation_steps"})

#: a string written as a plain YAML scalar; anything else is double-quoted (YAML 1.1 and 1.2 readers then agree)
_YAML_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_.\-/]*")
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
#: a Hugging Face Hub repository id (``owner/name``)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+")
#: characters Markdown (CommonMark, GFM tables, the Hub's math) gives a meaning: backslash-escaped in text
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~$#!])")
#: line and paragraph breaks (str.splitlines' set) and other control characters: folded into one space
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
#: text shown as inline code as is (no backtick, pipe, backslash or line break)
_CODE_SAFE = re.compile(r"[A-Za-z0-9_.,:+=@%/ \-]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")

_GEMMA_TERMS = "https://ai.google.dev/gemma/terms"


class _CardDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with every string that is not a plain word double-quoted.

    PyYAML would write a string holding a line break as a multi-line single-quoted scalar, and one holding U+2028 or
    U+0085 with the raw character (which reads back as a different string); double quotes escape both (``\\n``,
    ``\\L``, ``\\N``) and keep each value on one line.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    plain = _YAML_PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=None if plain else '"')


_CardDumper.add_representer(str, _represent_str)


def _clean(value: object) -> str:
    """``str(value)`` with lone surrogates (undecodable bytes of a file name) as U+FFFD, so UTF-8 can hold it."""
    return _SURROGATE.sub("\ufffd", str(value))


def md_text(value: object) -> str:
    """``value`` as one line of Markdown text that shows as written: line breaks and control characters folded into a
    space and Markdown's special characters (``|`` included, so it is safe in a table cell) backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", _BREAKS.sub(" ", _clean(value)).strip())


def _code(value: object) -> str:
    """``value`` as inline code when it is made of ordinary characters (a flag value, a dataset name, a path), else as
    escaped text (:func:`md_text`): a code span shows backslash escapes literally, so it cannot hold them."""
    text = _clean(value)
    return f"`{text}`" if _CODE_SAFE.fullmatch(text) else md_text(text)


def _number(value: object, digits: int = 4) -> str:
    """A metric for a table: a float with ``digits`` decimals, an int as is, ``n/a`` when missing or not finite
    (``summary.json`` stores NaN as null)."""
    if isinstance(value, bool) or value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return md_text(value)


def _flag_value(value: object) -> str:
    """A flag's value as the Markdown of a table cell: lists joined by commas, booleans and None in YAML's words."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_flag_value(v) for v in value) or "(none)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return md_text(value)


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 1) -> list[str]:
    """Markdown table lines; cells are already escaped; columns from ``numeric_from`` on are right-aligned."""
    header = list(header)
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(row) + " |" for row in rows]


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` names a Hub repository (``owner/name``, not a file or folder that exists here), the only
    kind of base model the front matter's ``base_model`` accepts."""
    return bool(value) and bool(_HUB_ID.fullmatch(value)) and not value.endswith(".gguf") \
        and not os.path.exists(value)


def card_languages(summary: dict) -> list[str]:
    """Language codes seen in the run: those of the final evaluation, else those of the last training epoch."""
    for key in ("eval", "train_last_epoch"):
        langs = (summary.get(key) or {}).get("languages") or {}
        seen = [_clean(lang) for lang, m in langs.items() if isinstance(m, dict) and m.get("pairs")]
        if seen:
            return seen
    return []


def front_matter(recipe: dict, summary: dict, base_model: str | None, license: str | None) -> dict:
    """The card's YAML metadata (see :func:`render_model_card` for the arguments): ``base_model`` (only a Hub id:
    a local folder or file is named in the text instead), ``license`` (when known), ``library_name``,
    ``pipeline_tag``, ``tags``, ``datasets`` (the ``--dataset`` values) and ``language`` (when seen)."""
    meta: dict = {}
    if is_hub_id(base_model):
        meta["base_model"] = _clean(base_model)
    if license:
        meta["license"] = _clean(license)
    meta.update(library_name="transformers", pipeline_tag="text-classification", tags=list(TAGS))
    datasets = recipe.get("dataset") or []
    if isinstance(datasets, str):
        datasets = [datasets]
    if datasets:
        meta["datasets"] = [_clean(d) for d in datasets]
    if languages := card_languages(summary):
        meta["language"] = languages
    return meta


def _about(recipe: dict, base_model: str | None) -> list[str]:
    if base_model:
        base = f"fine-tuned from {_code(base_model)}"
    else:
        base = (f"starting from a randomly initialised {_code(recipe.get('model', '?'))} backbone (model config "
                f"{_code(recipe.get('model_config', '?'))}, no pretrained weights)")
    return [
        "# Reward model (coati)", "",
        f"A reward model trained with coati, {base}. It is a Hugging Face `*ForSequenceClassification` model with "
        "`num_labels=1`: the single logit is the reward (a unitless score; higher means the answer is preferred). "
        "It was trained on preference pairs so that the chosen answer scores above the rejected one.", "",
        "## Use", "",
        "```python",
        "import torch",
        "from transformers import AutoModelForSequenceClassification",
        "from coati.scoring import RewardScorer",
        "",
        'path = "path/to/this/folder"  # or the Hub id it was uploaded under',
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()",
        "# token ids in the layout the model was trained on, ending with the reward token",
        'ids = RewardScorer.from_pretrained(path).encode(["How do I boil an egg?"], ["Boil it for 8 minutes."])',
        "with torch.no_grad():",
        "    reward = model(input_ids=torch.tensor(ids)).logits[:, 0]",
        "```", "",
        "The reward is read at the last token that is not padding, which must be the reward token "
        "(`reward_token_id` in `config.json`, the EOS unless the run chose another): the prompt is rendered with the "
        "tokenizer's chat template when it has one (unless `chat_template` is `never` in `train_config.json`), else "
        "as `\\n\\nHuman: ...\\n\\nAssistant: `, followed by the answer and that token. coati's `RewardScorer` and "
        "`python3 -m coati.score` build exactly this; `config.json` also stores `reward_mean` and `reward_std` for "
        "normalised scores `(r - reward_mean) / reward_std`.", ""] + ([
        "It was trained with a length head (ODIN, Chen et al. 2024, arXiv 2402.07319): the value head above is the "
        "quality head, trained to be uncorrelated with the answer's length; the length head's `[1, hidden]` weight "
        "is in `length_head.safetensors` for those who want the length-carrying part of the reward.", ""]
        if recipe.get("length_head") else [])


def _recipe(recipe: dict, summary: dict) -> list[str]:
    get = recipe.get
    if get("pretrain"):
        model = f"{_code(get('model'))}, pretrained {_code(get('pretrain'))}"
    else:
        model = f"{_code(get('model'))}, random init from model config {_code(get('model_config'))}"
    if get("lora_rank"):
        lora = f"rank {get('lora_rank')}, alpha {_flag_value(get('lora_alpha'))}, " \
               f"dropout {_flag_value(get('lora_dropout'))} (merged into the weights)"
    else:
        lora = "none (all weights trained)"
    precision = md_text(get("mixed_precision", "fp32"))
    if get("load_in_4bit") or get("load_in_8bit"):
        precision += f", backbone loaded in {'4' if get('load_in_4bit') else '8'}-bit (QLoRA)"
    steps = summary.get("steps")
    total = summary.get("total_steps")
    steps_text = _number(steps) + (f" of {_number(total)} planned" if total not in (None, steps) else "")
    if summary.get("stopped_by_time"):
        steps_text += " (stopped by `--max_train_minutes`)"
    world, sp = summary.get("world_size") or 1, summary.get("sequence_parallel_size") or 1
    data_parallel = world // sp if isinstance(world, int) and isinstance(sp, int) and sp > 0 else world
    batch = f"{_flag_value(get('batch_size'))} pairs x {_flag_value(get('accumulation_steps', 1))} accumulation " \
            f"x {_number(data_parallel)} data-parallel process(es)"
    rows = [("model", model), ("datasets", _flag_value(get("dataset") or [])), ("loss", _code(get("loss_fn"))),
            ("learning rate", _flag_value(get("lr"))), ("LoRA", lora), ("max_len", _flag_value(get("max_len"))),
            ("precision", precision), ("steps", steps_text), ("batch", batch),
            ("pairs", f"{_number(summary.get('train_pairs'))} train, {_number(summary.get('eval_pairs'))} held out")]
    lines = ["## Recipe", "", "The full recipe is `train_config.json`: `coati-train --config train_config.json "
             "--save_path NEW_FOLDER` trains the same run again.", ""]
    lines += _table(("setting", "value"), rows, numeric_from=2)
    defaults = TrainConfig().to_dict()
    missing = object()
    other = [(_code(f"--{k}"), _flag_value(v)) for k, v in recipe.items()
             if k not in _MAIN_FLAGS and k not in _NOT_RECIPE and defaults.get(k, missing) != v]
    if other:
        lines += ["", "Other flags set away from their defaults:", ""] + _table(("flag", "value"), other,
                                                                                 numeric_from=2)
    return lines + [""]


def _data(summary: dict) -> list[str]:
    data = summary.get("data") or {}
    sources = data.get("sources") or {}
    lines = ["## Data", ""]
    if not sources:
        return lines + ["No data report was recorded.", ""]
    ranked = any((s or {}).get("lists") for s in sources.values())
    header = ["dataset", "rows read", "pairs kept", "rows skipped"] + (["comparisons"] if ranked else [])
    rows = []
    for name, s in sources.items():
        s = s or {}
        rows.append([md_text(name), _number(s.get("rows_read")), _number(s.get("pairs_kept")),
                     _number(s.get("rows_skipped"))] + ([_number(s.get("comparisons"))] if ranked else []))
    if len(sources) > 1:
        rows.append(["**all**", _number(data.get("rows_read")), _number(data.get("pairs_kept")),
                     _number(data.get("rows_skipped"))] +
                    ([_number(sum((s or {}).get("comparisons") or 0 for s in sources.values()))] if ranked else []))
    lines += ["Rows read, preference pairs kept (a ranked list counts once) and rows skipped as unusable, per "
              "`--dataset`:", ""] + _table(header, rows)
    errors = sum(len((s or {}).get("errors") or []) for s in sources.values())
    if errors:
        lines += ["", f"{errors} file-level problem(s) ended a file early; `summary.json` names them."]
    cut = []
    for split, t in (summary.get("truncation") or {}).items():
        if isinstance(t, dict) and t.get("pairs"):
            cut.append(f"{md_text(split)}: {_number(t.get('prompt_truncated'))} of {_number(t.get('pairs'))} pairs "
                       f"had a prompt cut from the left, {_number(t.get('answer_truncated'))} an answer cut at its end")
    if cut:
        lines += ["", f"Truncation to `max_len` (no pair is dropped): {'; '.join(cut)}."]
    return lines + [""]


def _metric_rows(groups: dict) -> list[list[str]]:
    return [[md_text(name), _number(m.get("pairs")), _number(m.get("acc")), _number(m.get("dist"))]
            for name, m in groups.items() if isinstance(m, dict)]


def _evaluation(summary: dict) -> list[str]:
    final = summary.get("eval") or {}
    lines = ["## Held-out evaluation", ""]
    if not final.get("pairs"):
        return lines + ["There was no held-out evaluation (no `--eval_split` or `--eval_dataset`), so no held-out "
                        "figures are reported; `summary.json` holds the last training epoch's online figures "
                        "(`train_last_epoch`).", ""]
    lines += [f"The final evaluation, after step {_number(final.get('step', summary.get('steps')))}, on pairs never "
              "trained on. `acc`: share of pairs whose chosen answer gets the higher reward (a tie counts as "
              "wrong); `dist`: mean reward margin (chosen minus rejected).", ""]
    lines += _table(("", "pairs", "acc", "dist"), [["**all**", _number(final.get("pairs")), _number(final.get("acc")),
                                                   _number(final.get("dist"))]])
    if languages := final.get("languages"):
        lines += ["", "Per language:", ""] + _table(("language", "pairs", "acc", "dist"), _metric_rows(languages))
    if subsets := final.get("subsets"):
        lines += ["", "Per subset:", ""] + _table(("subset", "pairs", "acc", "dist"), _metric_rows(subsets))
    return lines + [""]


def _license(base_model: str | None, license: str | None) -> list[str]:
    lines = ["## License", ""]
    base = _code(base_model) if base_model else ""
    if license == "gemma":
        text = (f"The base model {base} is provided under the [Gemma Terms of Use]({_GEMMA_TERMS}); this model is "
                "derived from it, so those terms (and Gemma's prohibited use policy) apply to it and to its use.")
    elif license:
        text = f"The base model {base} is released under {_code(license)}; its terms apply to this derived model."
    elif base_model:
        text = (f"coati did not record the license of the base model {base}: its terms apply to this derived model; "
                "check them before sharing it.")
    else:
        text = "The backbone was randomly initialised: no base model's license applies to these weights."
    return lines + [text, ""]


def render_model_card(recipe: dict, summary: dict, base_model: str | None = None, license: str | None = None) -> str:
    """The export's ``README.md``: YAML front matter (:func:`front_matter`) and a Markdown model card.

    The Markdown says what the model is and how to read its reward with transformers, gives the recipe (model,
    pretrain, datasets, loss, learning rate, LoRA, max_len, precision, steps, batch, then every other flag that
    differs from :class:`~coati.config.TrainConfig`'s default, except where the run was saved and how it was logged),
    the data report's counts per dataset, and the final held-out ``pairs`` / ``acc`` / ``dist`` overall, per language
    and per subset (4 decimals), or that there was no evaluation; and under which license the base model's weights
    come. Missing parts of ``summary`` show as ``n/a`` or as a sentence saying they were not recorded.

    Args:
        recipe: the run's flat config (``TrainConfig.to_dict()``: flag name -> value).
        summary: the run's ``summary.json`` content (:func:`coati.run.summarize`): ``steps``, ``total_steps``,
            ``train_pairs``, ``eval_pairs``, ``eval`` (final metrics with ``languages`` and, if present,
            ``subsets``; ``{}`` when there was no evaluation), ``data`` (the data report's ``to_dict()``),
            ``truncation``, ...
        base_model: the base model's Hub id, or the ``--pretrain`` folder or file (named in the text only), or None
            for a random init (:func:`coati.models.cache.base_model_info`).
        license: the base model's Hub license id (``apache-2.0``, ``gemma``: the Gemma Terms of Use are named), or
            None when unknown.
    Returns:
        The card's text (UTF-8-encodable: lone surrogates become U+FFFD), ending with a newline.
    Raises:
        yaml.YAMLError: a front-matter value PyYAML cannot represent (only strings and lists of strings are put
            there, so this does not happen for a config from :class:`~coati.config.TrainConfig`).
    """
    meta = yaml.dump(front_matter(recipe, summary, base_model, license), Dumper=_CardDumper, sort_keys=False,
                     allow_unicode=True, width=float("inf"))
    body = _about(recipe, base_model) + _recipe(recipe, summary) + _data(summary) + _evaluation(summary) + \
        _license(base_model, license)
    return "---\n" + meta + "---\n\n" + "\n".join(body).rstrip("\n") + "\n"
