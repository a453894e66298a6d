"""The run fingerprint: what a resume checkpoint records about its run, so that it never resumes another one.

The fingerprint holds the options that change what a run computes (:data:`FINGERPRINT_FIELDS`, each checked against
the options :mod:`coati.config` defines when this module is imported) and the SHA-256 of the training pairs.
"""

from __future__ import annotations

import array
import difflib
import hashlib

from coati.checkpoint.safe_load import CheckpointError, read_trainer_state
from coati.config import TrainConfig, option_fields


def _check_fields(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` unchanged when each is an option of :func:`coati.config.option_fields`, named once.

    The fingerprint names the options it keeps (in the order checkpoints have always stored them); this check makes a
    misspelt name, or an option renamed in :mod:`coati.config`, fail at import instead of at the first run that
    fingerprints its settings.

    Raises:
        ValueError: a name that is not an option (with the closest option names), or one named twice.
    """
    options = option_fields()
    problems = [f"{n} is not an option" + "".join(f" (did you mean {m}?)"
                                                  for m in difflib.get_close_matches(n, options, n=1))
                for n in names if n not in options]
    problems += [f"{n} is named more than once" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise ValueError("FINGERPRINT_FIELDS must name each option of coati.config once: " + "; ".join(problems))
    return names


#: options that change what a run computes: a resume checkpoint carries them and refuses a run that differs.
#: (Strategy, logging, checkpoint and packing layout settings are left out: they do not change the math, and a
#: checkpoint resumes under another strategy.)
FINGERPRINT_FIELDS = _check_fields((
    "model", "pretrain", "model_config", "tokenizer", "lora_rank", "lora_alpha", "lora_dropout", "lora_train_bias",
    "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_double_quant", "loss_fn", "focal_gamma", "penalty",
    "penalty_weight", "reward_bound", "center_rewards_coefficient", "reward_token", "max_len", "chat_template",
    "group_by_length", "max_epochs", "max_steps", "lr", "weight_decay", "adam_eps", "warmup_ratio", "warmup_steps",
    "max_grad_norm", "mixed_precision", "seed", "init_from", "ties", "tie_param", "length_head", "length_loss_weight",
    "orthogonal_loss_weight", "length_groups",
))


def run_fingerprint(options: dict, train_tok: list, global_batch: int, total_steps: int) -> dict:
    """What identifies a run: its math-changing options (``options``: the flat config) and the SHA-256 of its
    training pairs (token ids and margins, in order), so a checkpoint never resumes another run's data or settings.

    Returns:
        ``{"settings": {field: value, "global_batch": int, "total_steps": int}, "data_sha256": hex str}``.
    """
    settings = dict({k: options[k] for k in FINGERPRINT_FIELDS}, global_batch=global_batch, total_steps=total_steps)
    h = hashlib.sha256()
    for p in train_tok:
        h.update(array.array("q", [len(p.chosen_ids), *p.chosen_ids, len(p.rejected_ids), *p.rejected_ids]).tobytes())
        h.update(repr(p.margin).encode())
    return {"settings": settings, "data_sha256": h.hexdigest()}


def check_same_run(path: str, fingerprint: dict) -> None:
    """Refuse to resume the checkpoint ``path`` of another run: one line naming every setting (``name: old -> new``)
    in which its fingerprint (see :func:`run_fingerprint`) differs; a checkpoint without one (an older coati)
    differs in everything.

    Raises:
        CheckpointError: the fingerprints differ, or the checkpoint's trainer state is unreadable.
    """
    saved = read_trainer_state(path).get("fingerprint")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        diffs = ["run fingerprint (the checkpoint has none: written by an older coati)"]
    else:
        defaults = TrainConfig().to_dict()  # a setting added since the checkpoint was written had its default then
        new = fingerprint["settings"]
        old = {k: saved["settings"].get(k, defaults.get(k)) for k in set(saved["settings"]) | set(new)}
        diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        if saved.get("data_sha256") != fingerprint.get("data_sha256"):
            diffs.append("training data (the pairs' content or order differs)")
    if diffs:
        raise CheckpointError(f"--resume: {path} belongs to another run ({'; '.join(diffs)}); resume with that run's "
                              "settings and data, or start a new run from its weights with --init_from " + path +
                              " and another --save_path")
