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

Names (per layer ``N``; see ``_TOP_RENAMES`` / ``_LAYER_RENAMES``): ``tok_embeddings`` -> ``embed_tokens``,
``attention.{wqkv,wo}`` -> ``self_attn.{q,k,v}_proj`` (split) / ``o_proj``, ``feed_forward.{w1,w3,w2}`` ->
``mlp.{gate,up,down}_proj``, ``attention_norm`` / ``ffn_norm`` -> ``input_layernorm`` / ``post_attention_layernorm``;
``output`` (LM head), ``v_head`` (InternLM2 reward head) and rotary caches are dropped.

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
from typing import Any, Iterator

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from coati.models.cache import build_cached_folder

logger = logging.getLogger(__name__)

#: ``--model_config`` presets for random init (kwargs of :class:`transformers.LlamaConfig`; vocab from the tokenizer).
INTERNLM2_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
               num_key_value_heads=kv, max_position_embeddings=pos, rope_theta=1000000.0, rms_norm_eps=1e-5)
    for name, (h, i, n, heads, kv, pos) in {
        "tiny": (64, 128, 2, 4, 2, 2048), "small": (256, 1024, 4, 8, 4, 4096),
        "1_8b": (2048, 8192, 24, 16, 8, 32768), "7b": (4096, 14336, 32, 32, 8, 32768),  # internlm2 shapes, random
    }.items()
}

#: LoRA targets: the converted model has LLaMA module names.
INTERNLM2_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight", "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight"}
_DROPPED = re.compile(r"^(output\.weight|v_head\.(weight|bias)|model\.layers\.\d+\.attention\.rotary_emb\.inv_freq)$")
_REQUIRED_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


# --------------------------------------------------------------------------------------------------------- config
def internlm2_to_llama_config(cfg: dict[str, Any], num_labels: int = 1, pad_token_id: int | None = None) -> LlamaConfig:
    """Map an InternLM2 ``config.json`` dict onto an equivalent :class:`~transformers.LlamaConfig`.

    Missing optional keys take InternLM2Config's defaults (``rms_norm_eps`` 1e-6, ``rope_theta`` 1e4,
    ``max_position_embeddings`` 2048, ``bias`` True, ``hidden_act`` silu, bos 1, eos 2, pad 0). ``bias`` applies to
    ``wqkv``/``wo`` only, hence ``attention_bias=bias, mlp_bias=False``. ``rope_scaling`` becomes transformers'
    ``rope_parameters`` of type ``linear`` (positions divided by ``factor``) or ``dynamic`` (NTK: the base becomes
    ``theta * ((factor * L / max_position_embeddings) - (factor - 1)) ** (d / (d - 2))`` beyond that length), the
    same formulas as InternLM2's; none gives ``{"rope_type": "default", "rope_theta": theta}``.

    Args:
        cfg: the parsed InternLM2 ``config.json``.
        num_labels: size of the ``score`` head (1 for a reward model).
        pad_token_id: overrides the checkpoint's pad id (InternLM2 configs often set pad = eos).
    Raises:
        ValueError: not ``model_type: internlm2``, a required key missing, heads that do not divide, a rope_scaling
            other than linear/dynamic with a factor.
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
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    if scaling := cfg.get("rope_scaling"):
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type"))
        if rope["rope_type"] not in ("linear", "dynamic") or "factor" not in scaling:
            raise ValueError(f"unsupported InternLM2 rope_scaling {scaling!r} "
                             "(expected type linear or dynamic with a factor)")
        rope["factor"] = float(scaling["factor"])
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_parameters=rope, attention_bias=bool(cfg.get("bias", True)), mlp_bias=False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2), num_labels=num_labels,
        pad_token_id=cfg.get("pad_token_id", 0) if pad_token_id is None else pad_token_id)


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
    group = num_key_value_heads * (q_per_kv + 2)
    rows, rest = wqkv.shape[0], tuple(wqkv.shape[1:])
    if rows % group:
        raise ValueError(f"wqkv has {rows} rows, not a multiple of num_key_value_heads * (q_per_kv + 2) = {group}")
    grouped = wqkv.reshape(num_key_value_heads, q_per_kv + 2, rows // group, *rest)
    q, k, v = grouped[:, :q_per_kv], grouped[:, q_per_kv], grouped[:, q_per_kv + 1]
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


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
    layer, rest = m.groups() if (m := _LAYER_KEY.match(name)) else (None, None)
    if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
        qkv = split_wqkv(tensor, num_attention_heads, num_key_value_heads)
        return [(f"model.layers.{layer}.self_attn.{p}_proj.{rest.rsplit('.', 1)[1]}", t) for p, t in zip("qkv", qkv)]
    if rest in _LAYER_RENAMES:
        return [(f"model.layers.{layer}.{_LAYER_RENAMES[rest]}", tensor)]
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
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(index := os.path.join(path, single + ".index.json")):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
        if os.path.isfile(os.path.join(path, single)):
            files = [single]
            break
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
    for file in (os.path.join(path, name) for name in files):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: shard named by the index is missing")
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as f:
                yield from ((name, f.get_tensor(name)) for name in f.keys())
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{file}: expected a flat {{name: tensor}} state dict")
            yield from state.items()
            del state


def load_internlm2(path: str, num_labels: int = 1, pad_token_id: int | None = None,
                   reward_head: bool = False) -> LlamaForSequenceClassification:
    """Load a local InternLM2 checkpoint as a native ``LlamaForSequenceClassification`` (fp32, eval mode).

    No remote code runs: the config is mapped by :func:`internlm2_to_llama_config`, the tensors are renamed and
    ``wqkv`` split by :func:`convert_internlm2_tensor`, one shard at a time. The ``score`` head (``[num_labels,
    hidden]``, no bias) is freshly initialised ``N(0, initializer_range)``, or with ``reward_head`` taken from the
    checkpoint's ``v_head.weight`` (the released InternLM2 reward models, ``InternLM2ForRewardModel``: backbone +
    ``v_head = Linear(hidden, 1, bias=False)``); the LM head ``output`` is dropped.

    Args:
        path: local folder with ``config.json`` (``model_type: internlm2``) and weights (see
            :func:`iter_checkpoint_tensors`).
        num_labels: score outputs (1 for a reward model).
        pad_token_id: the tokenizer's pad id (stored in the config; the sequence-classification head uses it).
        reward_head: keep the checkpoint's reward head ``v_head`` as the value head (``num_labels`` must be 1).
    Raises:
        FileNotFoundError: no config.json or no weights (Hub ids are not resolved here).
        ValueError: another model_type, an unexpected tensor name, a shape mismatch, or tensors missing (with
            ``reward_head``: no ``v_head.weight``, or a ``v_head.bias``, which the value head does not have).
    """
    from transformers.initialization import no_init_weights

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--pretrain {path}: an InternLM2 checkpoint must be a local folder with config.json")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "internlm2":
        raise ValueError(f"--pretrain {path} is a {cfg.get('model_type')!r} checkpoint but --model is 'internlm2' "
                         "(accepts model_type internlm2)")
    config = internlm2_to_llama_config(cfg, num_labels=num_labels, pad_token_id=pad_token_id)
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
            if reward_head and name.startswith("v_head."):
                if name != "v_head.weight":
                    raise ValueError(f"{path}: the reward head has {name}; coati's value head has no bias")
                if tuple(tensor.shape) != tuple(model.score.weight.shape):
                    raise ValueError(f"{path}: v_head.weight has shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(model.score.weight.shape)}")
                model.score.weight.copy_(tensor.to(torch.float32))
                loaded.add("score.weight")
            elif name.startswith("v_head."):
                logger.warning("%s: dropping the checkpoint's reward head %s; the value head is re-initialised",
                               path, name)
        missing = sorted(n for n in params if n not in loaded and not n.startswith("score."))
        if missing:
            raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:4])}")
        if reward_head and "score.weight" not in loaded:
            raise ValueError(f"{path}: no v_head.weight, so this InternLM2 checkpoint is not a reward model "
                             "(InternLM2ForRewardModel); train one with --model internlm2 --pretrain " + path)
        if not reward_head:
            model.score.weight.normal_(mean=0.0, std=config.initializer_range)
    logger.info("loaded internlm2 from %s as LlamaForSequenceClassification; value head (score) %s", path,
                "from its v_head" if reward_head else "freshly initialised")
    return model.eval()


# ------------------------------------------------------------------------------------------------------ tokenizer
def _token_text(token: Any) -> str | None:
    """The string of a special token entry (``"</s>"`` or ``{"content": "</s>", ...}``)."""
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def sentencepiece_tokenizer_folder(path: str, cache_root: str) -> str | None:
    """A folder ``AutoTokenizer.from_pretrained`` loads natively, for InternLM2 / bare sentencepiece tokenizers.

    Used when ``path`` is a ``*.model`` sentencepiece file, a folder whose ``tokenizer_config.json`` names the
    remote-code ``InternLM2Tokenizer`` (class or ``auto_map``), or a folder holding ``tokenizer.model`` and neither
    ``tokenizer_config.json`` nor ``tokenizer.json``. The folder (``<cache_root>/tokenizers/sentencepiece-<hash>``,
    keyed by the sentencepiece file, the settings and the transformers version; built once, see
    :func:`coati.models.cache.build_cached_folder`) holds a ``tokenizer_config.json`` naming ``LlamaTokenizer`` and
    the ``tokenizer.json`` transformers converted.

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
        coati.models.cache.CacheError: the cache folder could not be written.
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
            named = [src_cfg.get("tokenizer_class"), (src_cfg.get("auto_map") or {}).get("AutoTokenizer")]
            if "internlm2" not in json.dumps(named).lower():  # the remote-code class, by name or auto_map
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
    pieces, trainer = proto.pieces, proto.trainer_spec

    def special(key: str, idx: int, default: str) -> str:
        return _token_text(src_cfg.get(key)) or (pieces[idx].piece if 0 <= idx < len(pieces) else default)

    renamed: dict[int, str] = {}
    appended: dict[str, dict[str, Any]] = {}
    for idx_text, entry in (src_cfg.get("added_tokens_decoder") or {}).items():
        idx, content = int(idx_text), _token_text(entry)
        if content is not None and idx >= len(pieces):
            appended[idx_text] = entry
        elif content is not None and pieces[idx].piece != content:
            renamed[idx] = content
            pieces[idx].piece = content
            if pieces[idx].type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL:
                pieces[idx].type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    if renamed:
        sp_bytes = proto.SerializeToString()
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer", "unk_token": special("unk_token", trainer.unk_id, "<unk>"),
        "bos_token": special("bos_token", trainer.bos_id, "<s>"),
        "eos_token": special("eos_token", trainer.eos_id, "</s>"),
        "add_bos_token": bool(src_cfg.get("add_bos_token", True)),
        "add_eos_token": bool(src_cfg.get("add_eos_token", False)),
        "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix), "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    template = src_cfg.get("chat_template")
    optional = {"pad_token": _token_text(src_cfg.get("pad_token")), "model_max_length": src_cfg.get("model_max_length"),
                "chat_template": template if isinstance(template, str) else None, "added_tokens_decoder": appended,
                "additional_special_tokens": [
                    t for t in map(_token_text, src_cfg.get("additional_special_tokens") or []) if t]}
    config.update({k: v for k, v in optional.items() if v})

    def build(tmp: str) -> None:
        from transformers import AutoTokenizer

        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(sp_bytes)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        if len(tokenizer) < len(pieces):
            raise RuntimeError(f"{sp_file}: transformers built a {len(tokenizer)}-token vocabulary from a "
                               f"{len(pieces)}-piece sentencepiece model; install sentencepiece and protobuf")
        for idx_text, entry in list(appended.items()) + [(str(i), c) for i, c in renamed.items()]:
            if tokenizer.convert_tokens_to_ids(_token_text(entry)) != int(idx_text):
                raise ValueError(f"{path}: added token {_token_text(entry)!r} does not keep id {idx_text}")
        tokenizer.save_pretrained(tmp)  # adds tokenizer.json: later loads skip the slow conversion

    key = sp_bytes + json.dumps(config, sort_keys=True).encode() + transformers.__version__.encode()
    out_dir = os.path.join(cache_root, "tokenizers", "sentencepiece-" + hashlib.sha256(key).hexdigest()[:16])
    return build_cached_folder(out_dir, build, ("tokenizer.json",), f"sentencepiece tokenizer {sp_file}")
