"""Builders shared by the tests (and by tests/sp_worker.py, run under torchrun): the repository and data paths, the
environment of a child process, tiny models and trainers, random token pairs, sample rows in every data format, and
tiny InternLM2 checkpoint folders with an independent reference forward.

Test files import from here (``from helpers import ...``: ``tests`` is on pytest's ``pythonpath``); they never import
each other or conftest.py, which keeps only the pytest fixtures.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("COATI_DATA_DIR", REPO.parent / "shared" / "data"))
TOKENIZER_DIR = Path(os.environ.get("COATI_TOKENIZER_DIR", REPO.parent / "shared" / "tokenizers" / "internlm2"))


# ------------------------------------------------------------------------------------------------ processes
def run_env(**extra) -> dict:
    """The environment of a child ``python``/``torchrun``: this repo importable, one thread per process, offline,
    no inherited torchrun variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def made_once(tmp_path_factory, make):
    """``get(key)``: the folder ``make(key, folder)`` filled for ``key``, made on the first call with a new folder
    and returned again after (what a module-scoped fixture hands to the tests that compare with the same run)."""
    runs = {}

    def get(key):
        if key not in runs:
            runs[key] = make(key, tmp_path_factory.mktemp(f"run_{key}"))
        return runs[key]
    return get


def free_port() -> int:
    """A TCP port nothing listens on now (for a second torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ models and data
def tiny_model(name: str, tokenizer, seed: int = 0):
    """A randomly initialised tiny ``*ForSequenceClassification`` of backbone ``name`` in eval mode."""
    from coati.models.backbones import get_backbone
    from coati.models.loading import build_model

    torch.manual_seed(seed)
    return build_model(get_backbone(name), tokenizer, None, "tiny").eval()


def tiny_trainer(tokenizer, folder, loss_fn, **options):
    """A :class:`coati.trainer.Trainer` (naive strategy) of a tiny LLaMA on 32 random pairs, 8 steps of 4 pairs,
    constant learning rate, padded batches; ``metrics.jsonl`` in ``folder``; ``options`` set any
    :class:`~coati.config.TrainConfig` option (flat names)."""
    from coati.config import TrainConfig
    from coati.data.loader import GlobalBatchSampler, PairLoader, make_collate
    from coati.data.template import TokenizedPair
    from coati.models.backbones import get_backbone
    from coati.models.reward_model import RewardModel
    from coati.reporting import MetricsLog
    from coati.strategies.naive import NaiveStrategy
    from coati.trainer import Trainer

    Path(folder).mkdir(parents=True, exist_ok=True)
    defaults = dict(batch_size=4, max_grad_norm=1.0, seed=0, log_every=1, packing=False, mixed_precision="fp32")
    cfg = TrainConfig.from_dict(dict(defaults, **options))
    strategy = NaiveStrategy(cfg.strategy)
    strategy.setup()
    torch.manual_seed(0)
    model = RewardModel(tiny_model("llama", tokenizer), get_backbone("llama")).train()
    if cfg.loss.length_head:
        model.add_length_head()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    pairs = [TokenizedPair(torch.randint(5, 300, (8,), generator=g).tolist() + [2],
                           torch.randint(5, 300, (6,), generator=g).tolist() + [2], None, "en", "x") for _ in range(32)]
    collate = make_collate(tokenizer.pad_token_id, cfg.data.packing, 0, cfg.data.share_prefix, "right")
    loader = PairLoader(pairs, collate, GlobalBatchSampler(len(pairs), cfg.optim.batch_size, seed=cfg.optim.seed))
    log = MetricsLog(str(folder))
    return Trainer(strategy, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), loss_fn,
                   loader, None, cfg.optim, cfg.log, write_row=log.write,
                   length_head=(cfg.loss.length_loss_weight, cfg.loss.orthogonal_loss_weight)
                   if cfg.loss.length_head else None, length_groups=cfg.loss.length_groups)


def make_pairs(seed=0, n=6, prompt=False):
    """Random pairs; with ``prompt``, chosen and rejected start with the same 5-30 tokens (as real pairs do)."""
    from coati.data.template import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lc, lr = torch.randint(3, 40, (2,), generator=g).tolist()
        n_prompt = int(torch.randint(5, 31, (1,), generator=g)) if prompt else 0
        p = torch.randint(5, 400, (n_prompt,), generator=g).tolist()
        c = p + torch.randint(5, 400, (lc,), generator=g).tolist() + [2]
        r = p + torch.randint(5, 400, (lr,), generator=g).tolist() + [2]
        out.append(TokenizedPair(c, r, None, "en", "x"))
    return out


# ------------------------------------------------------------------------------------------------ data rows
# one row in each layout coati.data.formats reads (tests/data/test_formats.py parses them, test_sources.py loads them)
def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour."
HH = {"chosen": HH_PROMPT + "\n\nAssistant: Blue. ", "rejected": HH_PROMPT + "\n\nAssistant: No."}
HH_CN = {"context": [{"role": "human", "text": "你好"}, {"role": "assistant", "text": "你好！有什么可以帮你？"},
                     {"role": "human", "text": "推荐一本书。"}],
         "chosen": {"role": "assistant", "text": "《红楼梦》。"}, "rejected": {"role": "assistant", "text": "不知道。"}}
FLAT = {"prompt": "how to cook t-bone", "chosen": "Oven at 200C.", "rejected": "Boil it.", "margin": 2,
        "metadata": {"score_chosen": 9.0}, "source_index": 7}
UF_HUB = {"source": "evol_instruct", "prompt": "What is 2+2?",
          "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
          "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
          "chosen-rating": 5.0, "rejected-rating": 1.0}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "22"}}
MEDICAL = {"conversations": [{"from": "human", "value": "头痛怎么办？"}], "chosen": "多休息，必要时就医。",
           "rejected": "忍着。", "system": "你是医生。"}
RANKED = {"instruction": "翻译成英文", "input": "你好", "output": ["Hello", "Hi there", "Yo"],
          "history": [["你是谁？", "我是助手。"]]}


# ------------------------------------------------------------------------------------------------- InternLM2
HEADS, KV_HEADS, HIDDEN, INTER, LAYERS = 4, 2, 64, 96, 2  # the tiny InternLM2 of internlm2_config


def internlm2_config(vocab_size: int, rope_scaling=None, rope_theta=50000.0, bias=False, max_pos=64) -> dict:
    """A config.json in InternLM2's own key names (as released checkpoints write it)."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling, "vocab_size": vocab_size, "bias": bias,
        "max_position_embeddings": max_pos, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "tie_word_embeddings": False, "attn_implementation": "eager", "torch_dtype": "float32",
    }


def internlm2_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors under InternLM2's names (including the LM head ``output``)."""
    g = torch.Generator().manual_seed(seed)
    hd, q_per_kv = HIDDEN // HEADS, HEADS // KV_HEADS

    def rnd(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    w = {"model.tok_embeddings.weight": rnd(cfg["vocab_size"], HIDDEN, std=1.0),
         "model.norm.weight": 1 + rnd(HIDDEN, std=0.1),
         "output.weight": rnd(cfg["vocab_size"], HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "attention.wqkv.weight"] = rnd(KV_HEADS * (q_per_kv + 2) * hd, HIDDEN)
        w[p + "attention.wo.weight"] = rnd(HIDDEN, HIDDEN)
        if cfg["bias"]:
            w[p + "attention.wqkv.bias"] = rnd(KV_HEADS * (q_per_kv + 2) * hd, std=0.5)
            w[p + "attention.wo.bias"] = rnd(HIDDEN, std=0.5)
        w[p + "feed_forward.w1.weight"] = rnd(INTER, HIDDEN)
        w[p + "feed_forward.w3.weight"] = rnd(INTER, HIDDEN)
        w[p + "feed_forward.w2.weight"] = rnd(HIDDEN, INTER)
        w[p + "attention_norm.weight"] = 1 + rnd(HIDDEN, std=0.1)
        w[p + "ffn_norm.weight"] = 1 + rnd(HIDDEN, std=0.1)
    return w


def write_internlm2(folder: Path, cfg: dict, weights: dict[str, torch.Tensor], fmt: str = "safetensors") -> Path:
    """Write a checkpoint folder: ``safetensors``, ``sharded`` (safetensors + index) or ``bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"))
    elif fmt == "sharded":
        names = sorted(weights)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for shard, keys in halves.items():
            save_file({k: weights[k] for k in keys}, str(folder / shard))
            weight_map.update({k: shard for k in keys})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif fmt == "bin":
        torch.save(weights, str(folder / "pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    return folder


# InternLM2's reference forward: its equations on its own tensor names, sharing no code with coati's converter
def reference_hidden(w: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2 final hidden states (after the last RMSNorm), float64, from the raw InternLM2 tensors.

    Args:
        ids: ``[B, T]`` int64, no padding (positions 0..T-1).
    Returns:
        ``[B, T, hidden]`` float64.
    """
    W = {k: v.double() for k, v in w.items()}
    heads, kv_heads, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, groups, eps = hidden // heads, heads // kv_heads, cfg["rms_norm_eps"]
    bsz, T = ids.shape

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    # rotary embedding, InternLM2RotaryEmbedding / ...LinearScaling... / ...DynamicNTKScaling...
    base, pos = float(cfg["rope_theta"]), torch.arange(T, dtype=torch.float64)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "linear":
        pos = pos / scaling["factor"]
    elif scaling.get("type") == "dynamic" and T > cfg["max_position_embeddings"]:
        f = scaling["factor"]
        base = base * ((f * T / cfg["max_position_embeddings"]) - (f - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(pos, inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, hd]

    def rotate(t):  # t: [B, heads, T, hd]; rotate_half layout
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = W["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "attention_norm.weight"])
        qkv = h @ W[p + "attention.wqkv.weight"].T
        if p + "attention.wqkv.bias" in W:
            qkv = qkv + W[p + "attention.wqkv.bias"]
        qkv = qkv.view(bsz, T, kv_heads, groups + 2, hd)  # per kv head: its q heads, then k, then v
        q = qkv[:, :, :, :groups].reshape(bsz, T, heads, hd).transpose(1, 2)
        k = qkv[:, :, :, groups].transpose(1, 2)
        v = qkv[:, :, :, groups + 1].transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # q head h -> kv h // groups
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (probs @ v).transpose(1, 2).reshape(bsz, T, hidden) @ W[p + "attention.wo.weight"].T
        if p + "attention.wo.bias" in W:
            attn = attn + W[p + "attention.wo.bias"]
        x = x + attn
        h = rms(x, W[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ W[p + "feed_forward.w1.weight"].T) * (h @ W[p + "feed_forward.w3.weight"].T)) \
            @ W[p + "feed_forward.w2.weight"].T
    return rms(x, W["model.norm.weight"])
