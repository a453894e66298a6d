"""A run's data: the training and evaluation pairs selected and tokenized (:func:`prepare_data`), and this rank's
loaders over them (:func:`make_loaders`), as ``--data_*`` options (:class:`~coati.config.DataArgs`) ask."""

from __future__ import annotations

from dataclasses import dataclass

from coati.config import DataArgs
from coati.data.loader import GlobalBatchSampler, PairLoader, make_collate
from coati.data.sources import PairSelection, default_data_dir, select_pairs
from coati.data.template import SequenceEncoder, TokenizedPair, TruncationStats, tokenize_pairs, use_chat_template


@dataclass
class RunData:
    """A run's pairs, selected and tokenized (:func:`prepare_data`)."""

    selection: PairSelection
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    truncation: dict[str, TruncationStats]
    chat_template: bool
    data_dir: str | None

    def summary(self) -> str:
        """The data reports and truncation counts, for the log."""
        sel = self.selection
        lines = [sel.report.summary()] + ([f"eval {sel.eval_report.summary()}"] if sel.eval_report else [])
        lines += [f"{split}: {t.summary()}" for split, t in self.truncation.items()]
        return "\n".join(lines + [f"chat template: {self.chat_template}; train pairs {len(self.train)}, eval pairs "
                                   f"{len(self.eval)}"])


def prepare_data(args: DataArgs, seed: int, tokenizer, reward_token_id: int) -> RunData:
    """Select the training and evaluation pairs (:func:`~coati.data.sources.select_pairs`, ``--data_dir`` or
    ``$COATI_DATA_DIR``) and tokenize them in the trainer's layout.

    Raises:
        as :func:`~coati.data.sources.select_pairs` and :func:`~coati.data.template.use_chat_template`.
    """
    data_dir = args.data_dir or default_data_dir()
    selection = select_pairs(args.dataset, data_dir, args.max_samples, args.strict_data, seed, args.eval_dataset,
                             args.max_eval_samples, args.eval_split, args.max_responses, args.max_text_chars,
                             args.max_line_bytes, args.ties)
    chat = use_chat_template(tokenizer, args.chat_template)
    encoder = SequenceEncoder(tokenizer, args.max_len, reward_token_id)
    (train, train_cut), (evals, eval_cut) = (tokenize_pairs(p, encoder, chat)
                                             for p in (selection.train, selection.eval))
    return RunData(selection, train, evals, {"train": train_cut, "eval": eval_cut}, chat, data_dir)


def make_loaders(data: RunData, args: DataArgs, batch_size: int, eval_batch_size: int, seed: int, pad_id: int,
                 capacity: int, strategy, list_weighting: str = "prompt",
                 margin_from_scores: bool = False, cache_prompt: bool = True) -> tuple[PairLoader, PairLoader | None]:
    """This rank's training loader (shuffled per epoch, last incomplete global batch dropped, optionally grouped by
    length) and evaluation loader (every pair once, None without evaluation pairs).

    Args:
        capacity: packed row capacity (``--max_tokens_per_batch``, or the backbone's default when that is 0).
        list_weighting, margin_from_scores: ranked lists' loss weights and margins
            (:func:`~coati.data.batch.list_layout`).
        cache_prompt: padded batches with ``--share_prefix`` may compute each prompt once and continue it through
            the key/value cache; False (gradient checkpointing, which drops the cache, or sequence parallelism) keeps
            one row per sequence.
        strategy: gives ``data_world_size`` and ``data_rank`` (the ranks of a sequence-parallel group read the same
            batches).

    With several data-parallel ranks, a rank with no evaluation pair in a batch (a held-out set smaller than the
    ranks, or its uneven tail) runs a stand-in batch that is not counted: every strategy's forward may be a
    collective (DDP broadcasts buffers in each forward, FSDP and ZeRO-3 gather parameters), so a rank that skipped
    one would leave the others waiting until ``--dist_timeout``.
    """
    share = args.share_prefix and (args.packing or cache_prompt)
    collate = make_collate(pad_id, args.packing, capacity, share, args.padding_side, list_weighting,
                           margin_from_scores, args.ties != "drop")
    lengths = [sum(map(len, p.sequences)) for p in data.train] if args.group_by_length else None
    world, rank = strategy.data_world_size, strategy.data_rank
    train = PairLoader(data.train, collate, GlobalBatchSampler(len(data.train), batch_size, world, rank, seed=seed,
                                                               lengths=lengths), list_weighting=list_weighting)
    if not data.eval:
        return train, None
    sampler = GlobalBatchSampler(len(data.eval), eval_batch_size, world, rank, shuffle=False, drop_last=False)
    return train, PairLoader(data.eval, collate, sampler, fill_empty=world > 1)
