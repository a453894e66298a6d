"""InternLM2 backbone without remote code: checkpoints become native LLaMA modules, tokenizers a native LlamaTokenizer.

InternLM2 (technical report arXiv 2403.17297; the Hugging Face remote-code files ``modeling_internlm2.py`` /
``configuration_internlm2.py`` / ``tokenization_internlm2.py`` published with the checkpoints) is a LLaMA-style
decoder: pre-norm RMSNorm, rotary position embedding (non-interleaved "rotate half" layout), grouped-query attention
and a SwiGLU MLP ``w2(silu(w1 x) * w3 x)``. The only layout difference that matters is the attention input projection:
one fused ``wqkv`` whose rows are grouped per key/value head, ``[(num_kv_heads * (q_per_kv + 2) * head_dim), hidden]``
viewed as ``(num_kv_heads, q_per_kv + 2, head_dim, hidden)``: for every kv head, its ``q_per_kv`` query heads first,
then its key head, then its value head. :func:`split_wqkv` turns that into LLaMA's ``q_proj`` / ``k_proj`` /
``v_proj`` (query head ``h`` uses kv head ``h // q_per_kv``, as in LLaMA's ``repeat_kv``), so the converted model is a
plain ``LlamaForSequenceClassification`` that exports, loads and LoRA-adapts like any LLaMA.

Name mapping (InternLM2 -> LLaMA), per layer ``N``::

    model.tok_embeddings              -> model.embed_tokens
    model.layers.N.attention.wqkv     -> model.layers.N.self_attn.{q,k,v}_proj   (split_wqkv; weight and bias)
    model.layers.N.attention.wo       -> model.layers.N.self_attn.o_proj
    model.layers.N.feed_forward.w1    -> model.layers.N.mlp.gate_proj
    model.layers.N.feed_forward.w3    -> model.layers.N.mlp.up_proj
    model.layers.N.feed_forward.w2    -> model.layers.N.mlp.down_proj
    model.layers.N.attention_norm     -> model.layers.N.input_layernorm
    model.layers.N.ffn_norm           -> model.layers.N.post_attention_layernorm
    model.norm                        -> model.norm
    output (LM head), v_head (InternLM2 reward head), *.rotary_emb.inv_freq -> dropped

Tokenizers: InternLM2 ships a sentencepiece ``tokenizer.model`` (92544 pieces, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no
dummy prefix) and names the remote-code class ``InternLM2Tokenizer``. :func:`sentencepiece_tokenizer_folder` writes a
cache folder whose ``tokenizer_config.json`` names ``LlamaTokenizer`` so transformers converts the sentencepiece model
itself (this needs the ``sentencepiece`` and ``protobuf`` packages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

logger = logging.getLogger(__name__)

#: ``--model_config`` presets for random init (kwargs of :class:`transformers.LlamaConfig`; vocab from the tokenizer).
INTERNLM2_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-5),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-5),
    # internlm2-1.8B shape (random weights)
    "1_8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5),
    # internlm2-7B shape (random weights)
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5),
}

#: LoRA targets: the converted model has LLaMA module names.
INTERNLM2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight"}
_DROPPED = re.compile(r"^(output\.weight|v_head\.(weight|bias)|model\.layers\.\d+\.attention\.rotary_emb\.inv_freq)$")
_REQUIRED_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


# --------------------------------------------------------------------------------------------------------- config
def read_internlm2_config(path: str) -> dict[str, Any]:
    """The raw ``config.json`` of a local InternLM2 checkpoint folder.

    Raises:
        FileNotFoundError: ``path`` is not a folder with a ``config.json`` (Hub ids are not resolved here).
        ValueError: its ``model_type`` is not ``internlm2``.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--pretrain {path}: an InternLM2 checkpoint must be a local folder with config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "internlm2":
        raise ValueError(f"--pretrain {path} is a {cfg.get('model_type')!r} checkpoint but --model is 'internlm2' "
                         "(accepts model_type internlm2)")
    return cfg


def internlm2_rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers-5 ``rope_parameters`` for an InternLM2 config's ``rope_theta`` and ``rope_scaling``.

    InternLM2's ``linear`` scaling divides positions by ``factor``; its ``dynamic`` (NTK) scaling rescales the base to
    ``theta * ((factor * L / max_position_embeddings) - (factor - 1)) ** (d / (d - 2))`` once the length ``L`` exceeds
    ``max_position_embeddings``: the same formulas as transformers' ``linear`` / ``dynamic`` rope types.

    Returns:
        ``{"rope_type": "default"|"linear"|"dynamic", "rope_theta": float[, "factor": float]}``.
    Raises:
        ValueError: a scaling type other than linear/dynamic, or no ``factor``.
    """
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "dynamic") or "factor" not in scaling:
        raise ValueError(f"unsupported InternLM2 rope_scaling {scaling!r} "
                         "(expected type linear or dynamic with a factor)")
    return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}


def internlm2_to_llama_config(cfg: dict[str, Any], num_labels: int = 1, pad_token_id: int | None = None) -> LlamaConfig:
    """Map an InternLM2 ``config.json`` dict onto an equivalent :class:`~transformers.LlamaConfig`.

    Missing optional keys take InternLM2Config's defaults (``rms_norm_eps`` 1e-6, ``rope_theta`` 1e4,
    ``max_position_embeddings`` 2048, ``bias`` True, ``hidden_act`` silu, bos 1, eos 2, pad 0). ``bias`` applies to
    ``wqkv``/``wo`` only, hence ``attention_bias=bias, mlp_bias=False``.

    Args:
        cfg: the parsed InternLM2 ``config.json``.
        num_labels: size of the ``score`` head (1 for a reward model).
        pad_token_id: overrides the checkpoint's pad id (InternLM2 configs often set pad = eos).
    Raises:
        ValueError: not ``model_type: internlm2``, a required key missing, heads that do not divide, bad rope_scaling.
    """
    if cfg.get("model_type") != "internlm2":
        raise ValueError(f"expected an InternLM2 config (model_type internlm2), got {cfg.get('model_type')!r}")
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"InternLM2 config.json lacks {', '.join(missing)}")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"InternLM2 config: hidden_size {hidden}, num_attention_heads {heads} and "
                         f"num_key_value_heads {kv_heads} do not divide evenly")
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_parameters=internlm2_rope_parameters(cfg),
        attention_bias=bool(cfg.get("bias", True)),
        mlp_bias=False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id", 0) if pad_token_id is None else pad_token_id,
        num_labels=num_labels,
    )


# -------------------------------------------------------------------------------------------------------- weights
def split_wqkv(wqkv: torch.Tensor, num_attention_heads: int, num_key_value_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused, per-kv-head grouped ``wqkv`` into LLaMA ``q_proj``, ``k_proj``, ``v_proj``.

    Args:
        wqkv: weight ``[num_kv_heads * (q_per_kv + 2) * head_dim, hidden]`` or bias ``[num_kv_heads * (q_per_kv + 2)
            * head_dim]``, any dtype; rows grouped as ``(num_kv_heads, q_per_kv + 2, head_dim)`` with the group's
            ``q_per_kv`` query heads first, then its key, then its value.
        num_attention_heads / num_key_value_heads: query and kv head counts.
    Returns:
        ``(q, k, v)``, same dtype and trailing dims: ``[num_attention_heads * head_dim, ...]``,
        ``[num_kv_heads * head_dim, ...]`` twice; query head ``h`` belongs to kv group ``h // q_per_kv``.
    Raises:
        ValueError: the head counts do not divide, or the row count is not a multiple of
            ``num_kv_heads * (q_per_kv + 2)``.
    """
    if num_key_value_heads <= 0 or num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {num_key_value_heads}")
    q_per_kv = num_attention_heads // num_key_value_heads
    rows, rest = wqkv.shape[0], tuple(wqkv.shape[1:])
    if rows % (num_key_value_heads * (q_per_kv + 2)):
        raise ValueError(f"wqkv has {rows} rows, not a multiple of num_key_value_heads * (q_per_kv + 2) = "
                         f"{num_key_value_heads * (q_per_kv + 2)}")
    head_dim = rows // (num_key_value_heads * (q_per_kv + 2))
    grouped = wqkv.reshape(num_key_value_heads, q_per_kv + 2, head_dim, *rest)
    q = grouped[:, :q_per_kv].reshape(num_attention_heads * head_dim, *rest)
    k = grouped[:, q_per_kv].reshape(num_key_value_heads * head_dim, *rest)
    v = grouped[:, q_per_kv + 1].reshape(num_key_value_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_internlm2_tensor(name: str, tensor: torch.Tensor, num_attention_heads: int, num_key_value_heads: int
                             ) -> list[tuple[str, torch.Tensor]]:
    """LLaMA ``(name, tensor)`` pairs for one InternLM2 tensor (see the module docstring for the mapping).

    Returns:
        ``[]`` for dropped tensors (LM head ``output``, reward ``v_head``, rotary caches), three pairs for ``wqkv``,
        one pair otherwise; tensors keep their dtype.
    Raises:
        ValueError: a tensor name that is not part of the InternLM2 layout.
    """
    if _DROPPED.match(name):
        return []
    if name in _TOP_RENAMES:
        return [(_TOP_RENAMES[name], tensor)]
    m = _LAYER_KEY.match(name)
    if m:
        layer, rest = m.groups()
        prefix = f"model.layers.{layer}."
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_wqkv(tensor, num_attention_heads, num_key_value_heads)
            return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in (("q", q), ("k", k), ("v", v))]
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], tensor)]
    raise ValueError(f"unexpected tensor {name!r} in an InternLM2 checkpoint")


def iter_checkpoint_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a checkpoint folder, one shard at a time (CPU, stored dtype).

    Looks for, in order: ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
    ``pytorch_model.bin.index.json`` (sharded), ``pytorch_model.bin``. ``.bin`` files are read with
    ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and plain containers.

    Raises:
        FileNotFoundError: none of these files (or a shard named by an index) exists.
        ValueError: a ``.bin`` file that is not a flat ``{name: tensor}`` dict.
        pickle.UnpicklingError: a ``.bin`` file holding arbitrary pickled objects.
    """
    def shards(index_name: str) -> list[str]:
        with open(os.path.join(path, index_name), encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, s) for s in sorted(set(weight_map.values()))]

    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        files, kind = shards("model.safetensors.index.json"), "safetensors"
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files, kind = [os.path.join(path, "model.safetensors")], "safetensors"
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin.index.json")):
        files, kind = shards("pytorch_model.bin.index.json"), "bin"
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        files, kind = [os.path.join(path, "pytorch_model.bin")], "bin"
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: shard named by the index is missing")
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{file}: expected a flat {{name: tensor}} state dict")
            yield from state.items()
            del state


def load_internlm2(path: str, num_labels: int = 1, pad_token_id: int | None = None) -> LlamaForSequenceClassification:
    """Load a local InternLM2 checkpoint as a native ``LlamaForSequenceClassification`` (fp32, eval mode).

    No remote code runs: the config is mapped by :func:`internlm2_to_llama_config`, the tensors are renamed and
    ``wqkv`` split by :func:`convert_internlm2_tensor`, one shard at a time. The ``score`` head (``[num_labels,
    hidden]``, no bias) is freshly initialised ``N(0, initializer_range)``; the LM head ``output`` is dropped.

    Args:
        path: local folder with ``config.json`` (``model_type: internlm2``) and weights (see
            :func:`iter_checkpoint_tensors`).
        num_labels: score outputs (1 for a reward model).
        pad_token_id: the tokenizer's pad id (stored in the config; the sequence-classification head uses it).
    Raises:
        FileNotFoundError: no config.json or no weights.
        ValueError: another model_type, an unexpected tensor name, a shape mismatch, or tensors missing.
    """
    cfg = read_internlm2_config(path)
    config = internlm2_to_llama_config(cfg, num_labels=num_labels, pad_token_id=pad_token_id)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter but `score` is overwritten below
        model = LlamaForSequenceClassification(config)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in iter_checkpoint_tensors(path):
            for new_name, value in convert_internlm2_tensor(name, tensor, config.num_attention_heads,
                                                            config.num_key_value_heads):
                target = params.get(new_name)
                if target is None:
                    raise ValueError(f"{path}: {name} maps to {new_name}, which the converted model does not have "
                                     "(check bias / num_hidden_layers in config.json)")
                if tuple(target.shape) != tuple(value.shape):
                    raise ValueError(f"{path}: {name} -> {new_name} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(target.shape)} from config.json")
                target.copy_(value.to(torch.float32))
                loaded.add(new_name)
            if name.startswith("v_head."):
                logger.warning("%s: dropping the checkpoint's reward head %s; the value head is re-initialised",
                               path, name)
        missing = sorted(n for n in params if n not in loaded and not n.startswith("score."))
        if missing:
            raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:4])}")
        model.score.weight.normal_(mean=0.0, std=config.initializer_range)
    logger.info("loaded internlm2 from %s as LlamaForSequenceClassification; value head (score) freshly initialised",
                path)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ tokenizer
def _is_internlm2_tokenizer_config(tok_cfg: dict[str, Any]) -> bool:
    """True when a ``tokenizer_config.json`` names InternLM2's remote-code tokenizer (class or auto_map)."""
    names = [str(tok_cfg.get("tokenizer_class") or "")]
    auto = (tok_cfg.get("auto_map") or {}).get("AutoTokenizer") or []
    names += [str(a) for a in (auto if isinstance(auto, list) else [auto]) if a]
    return any("internlm2" in n.lower() for n in names)


def _token_text(token: Any) -> str | None:
    """The string of a special token entry (``"</s>"`` or ``{"content": "</s>", ...}``)."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def sentencepiece_tokenizer_folder(path: str, cache_root: str) -> str | None:
    """A folder ``AutoTokenizer.from_pretrained`` loads natively, for InternLM2 / bare sentencepiece tokenizers.

    Used when ``path`` is a ``*.model`` sentencepiece file, a folder whose ``tokenizer_config.json`` names the
    remote-code ``InternLM2Tokenizer`` (class or ``auto_map``), or a folder holding ``tokenizer.model`` and neither
    ``tokenizer_config.json`` nor ``tokenizer.json``. The folder (``<cache_root>/tokenizers/sentencepiece-<hash>``,
    keyed by the sentencepiece file, the settings and the transformers version; built once, atomically) holds a
    ``tokenizer_config.json`` naming ``LlamaTokenizer`` and the ``tokenizer.json`` transformers converted.

    Settings: special tokens come from the source ``tokenizer_config.json`` when it names them, else from the
    sentencepiece model (InternLM2: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2); ``add_prefix_space`` follows the model's
    ``add_dummy_prefix`` (False for InternLM2, so ids equal ``sentencepiece`` encodings); bos is added, eos is not
    (unless ``add_bos_token`` / ``add_eos_token`` say otherwise); a ``chat_template`` is kept. Entries of
    ``added_tokens_decoder`` that rename an existing piece (InternLM2-chat's ``<|im_start|>`` = id 92543, stored as
    ``[UNUSED_TOKEN_146]``) rename that piece, so the ids stay those of the checkpoint.

    Returns:
        the cache folder, or None when ``path`` is something else (a native HF tokenizer folder, a Hub id).
    Raises:
        FileNotFoundError: the config names InternLM2Tokenizer but there is no ``tokenizer.model``.
        ValueError: an ``added_tokens_decoder`` entry whose id does not survive the conversion.
        RuntimeError: the converted vocabulary is smaller than the sentencepiece model (sentencepiece or protobuf
            missing: transformers then falls back to a 3-token vocabulary).
    """
    src_cfg: dict[str, Any] = {}
    if os.path.isfile(path) and path.endswith(".model"):
        sp_file = path
    elif os.path.isdir(path):
        sp_file = os.path.join(path, "tokenizer.model")
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                src_cfg = json.load(f)
            if not _is_internlm2_tokenizer_config(src_cfg):
                return None
            if not os.path.isfile(sp_file):
                raise FileNotFoundError(f"{path}: tokenizer_config.json names InternLM2Tokenizer but there is no "
                                        "tokenizer.model to load it from")
        elif not os.path.isfile(sp_file) or os.path.isfile(os.path.join(path, "tokenizer.json")):
            return None
    else:
        return None

    import transformers
    from sentencepiece import sentencepiece_model_pb2

    with open(sp_file, "rb") as f:
        sp_bytes = f.read()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_bytes)
    pieces = proto.pieces
    trainer = proto.trainer_spec

    def piece(idx: int, default: str) -> str:
        return pieces[idx].piece if 0 <= idx < len(pieces) else default

    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _token_text(src_cfg.get("unk_token")) or piece(trainer.unk_id, "<unk>"),
        "bos_token": _token_text(src_cfg.get("bos_token")) or piece(trainer.bos_id, "<s>"),
        "eos_token": _token_text(src_cfg.get("eos_token")) or piece(trainer.eos_id, "</s>"),
        "add_bos_token": bool(src_cfg.get("add_bos_token", True)),
        "add_eos_token": bool(src_cfg.get("add_eos_token", False)),
        "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    if _token_text(src_cfg.get("pad_token")):
        config["pad_token"] = _token_text(src_cfg["pad_token"])
    if isinstance(src_cfg.get("chat_template"), str):
        config["chat_template"] = src_cfg["chat_template"]
    if src_cfg.get("model_max_length"):
        config["model_max_length"] = src_cfg["model_max_length"]
    extra = [t for t in (_token_text(x) for x in src_cfg.get("additional_special_tokens") or []) if t]
    renamed: dict[int, str] = {}
    appended: dict[str, dict[str, Any]] = {}
    for idx_text, entry in (src_cfg.get("added_tokens_decoder") or {}).items():
        idx, content = int(idx_text), _token_text(entry)
        if content is None:
            continue
        if idx < len(pieces):
            if pieces[idx].piece != content:
                renamed[idx] = content
        else:
            appended[idx_text] = entry
    if renamed:
        for idx, content in renamed.items():
            pieces[idx].piece = content
            if pieces[idx].type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL:
                pieces[idx].type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        sp_bytes = proto.SerializeToString()
    if appended:
        config["added_tokens_decoder"] = appended
    if extra:
        config["additional_special_tokens"] = extra

    key_src = sp_bytes + json.dumps(config, sort_keys=True).encode() + transformers.__version__.encode()
    out_dir = os.path.join(cache_root, "tokenizers", "sentencepiece-" + hashlib.sha256(key_src).hexdigest()[:16])
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return out_dir

    from transformers import AutoTokenizer

    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(sp_bytes)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        logger.info("converting sentencepiece tokenizer %s into %s (once)", sp_file, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        if len(tokenizer) < len(pieces):
            raise RuntimeError(f"{sp_file}: transformers built a {len(tokenizer)}-token vocabulary from a "
                               f"{len(pieces)}-piece sentencepiece model; install sentencepiece and protobuf")
        for idx_text, entry in list(appended.items()) + [(str(i), c) for i, c in renamed.items()]:
            if tokenizer.convert_tokens_to_ids(_token_text(entry)) != int(idx_text):
                raise ValueError(f"{path}: added token {_token_text(entry)!r} does not keep id {idx_text}")
        tokenizer.save_pretrained(tmp)  # adds tokenizer.json: later loads skip the slow conversion
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
