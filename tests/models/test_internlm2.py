"""InternLM2 backbone: checkpoint conversion against an independent reference forward, tokenizer, random init.

The reference forward (``reference_hidden`` in tests/helpers.py) is written from the InternLM2 equations (technical
report arXiv 2403.17297 and the HF remote-code layout ``modeling_internlm2.py``): RMSNorm, rotary embedding
(rotate-half, ``rope_theta``, linear or dynamic-NTK scaling), a fused ``wqkv`` grouped per key/value head,
grouped-query causal attention, SwiGLU ``w2(silu(w1 x) * w3 x)``. It works on the raw InternLM2 tensors in float64
and shares no code with the converter.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from coati.checkpoint.export import export_hf
from coati.data.template import SequenceEncoder
from coati.models.backbones import build_config, get_backbone
from coati.models.internlm2 import load_internlm2, split_wqkv
from coati.models.loading import build_model, load_tokenizer
from coati.models.reward_model import RewardModel
from helpers import (HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, TOKENIZER_DIR, internlm2_config, internlm2_weights,
                     reference_hidden, write_internlm2)

HELLO = "你好，世界"
HELLO_IDS = [77230, 60353, 68339]  # "你好", "，", "世界": observed with sentencepiece on the real tokenizer.model
TOL = 1e-5


@pytest.fixture(scope="session")
def internlm2_tokenizer():
    """The real InternLM2 tokenizer (bare tokenizer.model folder), prepared for reward modelling."""
    if not (TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.fail(f"{TOKENIZER_DIR}/tokenizer.model is missing (set COATI_TOKENIZER_DIR)")
    return load_tokenizer(str(TOKENIZER_DIR))


def body_hidden(model: LlamaForSequenceClassification, ids: torch.Tensor) -> torch.Tensor:
    """The converted model's final hidden states ``[B, T, hidden]`` (what the reward head reads)."""
    with torch.no_grad():
        return model.model(input_ids=ids, use_cache=False).last_hidden_state


def max_diff(model, w, cfg, ids) -> float:
    return (body_hidden(model, ids).double() - reference_hidden(w, cfg, ids)).abs().max().item()


def naive_split_copy(model: LlamaForSequenceClassification, w: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` with q/k/v re-filled by the WRONG contiguous split ``wqkv = [q | k | v]``."""
    import copy

    bad = copy.deepcopy(model)
    hd = HIDDEN // HEADS
    with torch.no_grad():
        for i, layer in enumerate(bad.model.layers):
            wqkv = w[f"model.layers.{i}.attention.wqkv.weight"]
            q, k, v = wqkv.split([HEADS * hd, KV_HEADS * hd, KV_HEADS * hd])
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
    return bad


# ---------------------------------------------------------------------------------------------------- tests
SCALINGS = {
    "plain": dict(rope_scaling=None, bias=False),
    "linear+bias": dict(rope_scaling={"type": "linear", "factor": 2.0}, bias=True),
    "dynamic-active": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False, max_pos=8),  # T=12 > 8
}


@pytest.mark.parametrize("variant", list(SCALINGS))
def test_converted_model_matches_internlm2_reference(variant, internlm2_tokenizer, tmp_path):
    cfg = internlm2_config(len(internlm2_tokenizer), **SCALINGS[variant])
    w = internlm2_weights(cfg)
    path = write_internlm2(tmp_path / "ckpt", cfg, w)
    model = build_model(get_backbone("internlm2"), internlm2_tokenizer, str(path), "tiny")
    assert type(model) is LlamaForSequenceClassification and model.config.num_labels == 1
    assert model.config.pad_token_id == internlm2_tokenizer.pad_token_id != 2  # not the checkpoint's pad = eos
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor(HELLO_IDS)

    diff = max_diff(model, w, cfg, ids)
    print(f"{variant}: max |converted - reference| = {diff:.3e}")
    assert diff < TOL

    # the comparison can fail: the naive contiguous q|k|v split is far off
    naive = max_diff(naive_split_copy(model, w), w, cfg, ids)
    print(f"{variant}: max |naive split - reference| = {naive:.3e}")
    assert naive > 1e3 * TOL
    if cfg["rope_scaling"]:  # the scaling is active here: ignoring it would fail the comparison too
        assert max_diff(model, w, dict(cfg, rope_scaling=None), ids) > 1e3 * TOL

    # and the reward model reads it like any LLaMA
    rewards = RewardModel(model, get_backbone("internlm2"))(ids, torch.ones_like(ids))
    assert rewards.shape == (2,) and rewards.dtype == torch.float32


def test_rope_theta_and_scaling_carry_over(tmp_path):
    cfg = internlm2_config(300, rope_scaling={"type": "dynamic", "factor": 2.5}, rope_theta=1234567.0, bias=True,
                           max_pos=4096)
    model = load_internlm2(str(write_internlm2(tmp_path, cfg, internlm2_weights(cfg))), pad_token_id=0)
    c = model.config
    assert c.rope_parameters["rope_type"] == "dynamic"
    assert c.rope_parameters["rope_theta"] == 1234567.0 and c.rope_parameters["factor"] == 2.5
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (HIDDEN, INTER, LAYERS)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert c.max_position_embeddings == 4096 and c.rms_norm_eps == 1e-5 and c.vocab_size == 300
    assert c.attention_bias is True and c.mlp_bias is False and c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.num_labels) == (1, 2, 0, 1)
    assert model.model.layers[0].self_attn.q_proj.bias is not None and model.model.layers[0].mlp.up_proj.bias is None
    # theta alone (no scaling) stays a default rope
    plain = load_internlm2(str(write_internlm2(tmp_path / "plain", internlm2_config(300, rope_theta=1e6),
                                               internlm2_weights(internlm2_config(300)))))
    assert plain.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_weight_formats_load_identically(fmt, tmp_path):
    cfg = internlm2_config(300)
    w = internlm2_weights(cfg)
    ref = load_internlm2(str(write_internlm2(tmp_path / "st", cfg, w)), pad_token_id=0)
    other = load_internlm2(str(write_internlm2(tmp_path / fmt, cfg, w, fmt)), pad_token_id=0)
    a, b = ref.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("score."))


class _NotATensor:
    """A pickled object torch.load(weights_only=True) must refuse."""


def test_bin_with_pickled_objects_is_refused(tmp_path):
    cfg = internlm2_config(300)
    tmp_path.joinpath("config.json").write_text(json.dumps(cfg))
    torch.save({"model.norm.weight": torch.ones(HIDDEN), "evil": _NotATensor()}, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_internlm2(str(tmp_path))


def test_loader_errors(tmp_path):
    cfg = internlm2_config(300)
    w = internlm2_weights(cfg)
    with pytest.raises(ValueError, match="model_type"):
        load_internlm2(str(write_internlm2(tmp_path / "llama", dict(cfg, model_type="llama"), w)))
    missing = {k: v for k, v in w.items() if k != "model.layers.1.ffn_norm.weight"}
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        load_internlm2(str(write_internlm2(tmp_path / "missing", cfg, missing)))
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_internlm2(str(write_internlm2(tmp_path / "extra", cfg, dict(w, **{"model.layers.0.foo": torch.zeros(3)}))))
    with pytest.raises(ValueError, match="which the converted model does not have"):  # bias weights, bias=False
        load_internlm2(str(write_internlm2(tmp_path / "bias", cfg, internlm2_weights(dict(cfg, bias=True)))))
    with pytest.raises(FileNotFoundError):
        load_internlm2(str(tmp_path / "nowhere"))


def test_split_wqkv_groups_per_kv_head():
    hd, groups = 2, HEADS // KV_HEADS
    rows = torch.arange(KV_HEADS * (groups + 2) * hd, dtype=torch.float32)  # bias-like 1-D input
    q, k, v = split_wqkv(rows, HEADS, KV_HEADS)
    # kv head 0 owns rows 0..7: q0 = 0,1; q1 = 2,3; k0 = 4,5; v0 = 6,7; kv head 1 owns rows 8..15
    assert q.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and k.tolist() == [4, 5, 12, 13] and v.tolist() == [6, 7, 14, 15]
    with pytest.raises(ValueError):
        split_wqkv(torch.zeros(15, 4), HEADS, KV_HEADS)


# ------------------------------------------------------------------------------------------------- tokenizer
def test_real_internlm2_tokenizer(internlm2_tokenizer):
    import sentencepiece as spm

    tok = internlm2_tokenizer
    assert len(tok) == 92544
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "right"
    ids = tok(HELLO, add_special_tokens=False).input_ids
    assert ids == HELLO_IDS and tok.convert_ids_to_tokens(ids) == ["你好", "，", "世界"]
    assert tok.decode(ids) == HELLO
    assert tok(HELLO).input_ids == [1] + HELLO_IDS  # bos added, eos not
    assert tok("").input_ids == [1]  # SequenceEncoder detects the bos prefix from this
    nihao = tok("你好", add_special_tokens=False).input_ids
    assert nihao == [77230] and tok.decode(nihao) == "你好"
    enc = SequenceEncoder(tok, max_len=32)
    assert enc.prefix == [1] and enc.encode("", "你好").input_ids == [1, 77230, 2]
    # same ids as the sentencepiece library itself (no dummy prefix space, as InternLM2's own tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    for text in [HELLO, "\n\nHuman: 你好吗？\n\nAssistant: 我很好，谢谢。", "  Hello world, 123 tokens!", "他说——好吧……"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text


def test_tokenizer_model_file_path(internlm2_tokenizer):
    tok = load_tokenizer(str(TOKENIZER_DIR / "tokenizer.model"))
    assert len(tok) == 92544 and tok(HELLO, add_special_tokens=False).input_ids == HELLO_IDS
    assert tok.pad_token_id == internlm2_tokenizer.pad_token_id


def test_remote_code_tokenizer_config_loads_natively(tmp_path):
    shutil.copy(TOKENIZER_DIR / "tokenizer.model", tmp_path / "tokenizer.model")
    # the remote-code module must never run
    (tmp_path / "tokenization_internlm2.py").write_text("raise RuntimeError('remote code executed')\n")
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False,
        # InternLM2-chat renames two reserved pieces; the ids must stay the checkpoint's
        "added_tokens_decoder": {"92543": dict(special, content="<|im_start|>"),
                                 "92542": dict(special, content="<|im_end|>")},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }), encoding="utf-8")
    tok = load_tokenizer(str(tmp_path))
    assert type(tok).__name__ == "LlamaTokenizer" and len(tok) == 92544
    assert tok(HELLO, add_special_tokens=False).input_ids == HELLO_IDS
    assert tok.eos_token_id == 2 and tok.pad_token_id != tok.eos_token_id  # config's pad = eos was replaced
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [92543, 92542]
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == 92543 and ids.count(92543) == 2 and 92542 in ids and 77230 in ids


# ----------------------------------------------------------------------------------------------- random init
def test_random_init_tiny_reward_model(internlm2_tokenizer, tmp_path):
    tok = internlm2_tokenizer
    backbone = get_backbone("internlm2")
    torch.manual_seed(0)
    model = build_model(backbone, tok, None, "tiny").eval()
    assert type(model) is LlamaForSequenceClassification
    assert model.config.vocab_size == 92544 and model.config.rope_parameters["rope_theta"] == 1e6
    rm = RewardModel(model, backbone).eval()
    enc = SequenceEncoder(tok, max_len=32)
    seqs = [enc.encode("\n\nHuman: 你好吗？\n\nAssistant: ", "我很好，谢谢。").input_ids, enc.encode("", HELLO).input_ids]
    length = max(map(len, seqs))
    ids = torch.full((2, length), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        rewards = rm(ids, mask)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    # the export is a plain LLaMA sequence classifier that scores the same
    export_hf(model, tok, str(tmp_path), {"model": "internlm2"})
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is LlamaForSequenceClassification
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits[:, 0], rewards, atol=1e-4)


def test_1_8b_preset_shape():
    cfg = build_config(get_backbone("internlm2"), "1_8b", vocab_size=92544, pad_token_id=0, eos_token_id=2,
                       bos_token_id=1)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 8192, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 8)
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.num_labels == 1
