"""QLoRA: a bitsandbytes 4-bit (or 8-bit) frozen backbone, LoRA adapters and a full-precision value head; and LoRA's
frozen backbone stored in bf16 under bf16 training."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coati.checkpoint.safe_load import _SafeReader
from coati.cli.train import parse_args
from coati.config import LoraArgs, LossArgs, ModelArgs
from coati.data.batch import collate_pairs
from coati.data.packing import collate_packed
from coati.losses import LOSSES, PENALTIES, build_loss, log_sig_loss
from coati.models.backbones import BACKBONES
from coati.models.loading import build_reward_model
from coati.models.lora import is_quantized, merged_copy
from helpers import REPO, make_pairs, run_env

pytest.importorskip("bitsandbytes")
QLORA = ["--lora_rank", "8", "--load_in_4bit"]


def _build(tokenizer, name="llama", compute=torch.float32, **model_options):
    torch.manual_seed(0)
    return build_reward_model(ModelArgs(model=name, **model_options), LoraArgs(lora_rank=8), tokenizer, compute)


def _train_a_little(rm, tokenizer, steps=3, compute=torch.float32):
    """A few optimizer steps on random pairs, so LoRA's B (zero at init) and the value head move."""
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    pairs = make_pairs(seed=1, prompt=True)
    batch = collate_packed(pairs, tokenizer.pad_token_id, 0 if rm.backbone.group_attention else 256)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute is torch.bfloat16):
            r = rm(**batch.inputs)
        log_sig_loss(r[:len(pairs)], r[len(pairs):]).backward()
        opt.step()
        opt.zero_grad()
    return rm.eval()


def _run_cli(args, save_path, timeout=600):
    proc = subprocess.run([sys.executable, str(REPO / "train_reward_model.py")] + args + ["--save_path", str(save_path)],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (Path(save_path) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_qlora_trains_on_real_english_and_chinese_pairs_and_exports_a_plain_model(tmp_path):
    """hh-rlhf + oaast-rm-zh, the same 16 pairs each step: the loss is finite and falls; the export is a plain fp32
    ``*ForSequenceClassification`` (no quantisation config) with the reward token and the adapter beside it."""
    out = tmp_path / "rm"
    rows = _run_cli(["--model", "llama", "--dataset", "hh-rlhf", "oaast-rm-zh", "--max_samples", "8", "--max_len", "96",
                     "--batch_size", "16", "--max_epochs", "6", "--lr", "2e-3", "--warmup_ratio", "0",
                     "--mixed_precision", "fp32", "--log_every",
                     "1", "--disable_tqdm", "--strategy", "naive", "--reward_token", "5", "--export_adapter"] + QLORA,
                    out)
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 6 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.03, losses
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["reward_token_id"] == 5 and len(config["id2label"]) == 1
    weights = load_file(out / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert weights["score.weight"].shape[0] == 1
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["load_in_4bit"] is True


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_export_of_a_4bit_model_scores_like_the_trainer(compute, tokenizer, tmp_path):
    """The export (de-quantised base + merged LoRA, fp32) loads with AutoModelForSequenceClassification and gives the
    trainer's rewards: within 1e-5 when the 4-bit layers compute in fp32 (measured 4.5e-8: the export's weights are
    exactly those the 4-bit forward de-quantised); against a trainer computing in bf16, within a tenth of the
    rewards' spread (measured 0.08 at a spread of 1.3: bf16's rounding of the activations, LoRA's path included)."""
    from transformers import AutoModelForSequenceClassification

    from coati.checkpoint.export import export_hf

    rm = _train_a_little(_build(tokenizer, compute=compute, load_in_4bit=True), tokenizer, compute=compute)
    assert is_quantized(rm)
    pairs = make_pairs(seed=2)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute is torch.bfloat16):
        trainer = rm(**batch.inputs)
    export_hf(rm.model, tokenizer, str(tmp_path))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not is_quantized(hf) and hf.score.weight.dtype == torch.float32
    trained_head = rm.model.get_base_model().score.modules_to_save["default"].weight
    assert torch.equal(hf.score.weight, trained_head.float())
    with torch.no_grad():
        exported = hf(**{k: batch.inputs[k] for k in ("input_ids", "attention_mask")}).logits.squeeze(-1)
    tol = 1e-5 if compute is torch.float32 else 0.1 * trainer.std().item()
    assert (exported - trainer).abs().max().item() < tol, (exported - trainer).abs().max()


def test_an_evaluation_forward_leaves_the_4bit_layers_trainable_and_exportable(tokenizer):
    """bitsandbytes repacks a 4-bit weight for its bf16 CPU kernel on the first eval-mode no-grad forward (on
    AVX512-BF16 CPUs, such as this project's); after that the layer passes no gradient to its input and de-quantises
    wrongly. coati keeps the standard layout: after an evaluation, gradients equal those of a twin that never
    evaluated, and the export still equals the trainer."""
    evaluated, twin = _build(tokenizer, load_in_4bit=True), _build(tokenizer, load_in_4bit=True)
    pairs = make_pairs(seed=3, prompt=True)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        before = evaluated.eval()(**batch.inputs)
    layers = [m for m in evaluated.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    grads = []
    for rm in (evaluated.train(), twin.train()):
        r = rm(**batch.inputs)
        log_sig_loss(r[:len(pairs)], r[len(pairs):]).backward()
        grads.append({n: p.grad for n, p in rm.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads[0].values())
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[1])
    with torch.no_grad():
        exported = merged_copy(evaluated.model).eval()(**batch.inputs).logits.squeeze(-1)
    assert (exported - before).abs().max().item() < 1e-5


def test_merged_copy_uses_the_dequantised_weights_the_forward_used(tokenizer):
    """Every adapted linear of the merged copy is dequantize(W4) + (alpha / r) B A, with bitsandbytes' own
    de-quantisation as the reference."""
    import bitsandbytes.functional as F

    rm = _train_a_little(_build(tokenizer, load_in_4bit=True), tokenizer)
    plain = merged_copy(rm.model)
    layer = rm.model.get_base_model().model.layers[0].self_attn.q_proj
    w4 = layer.base_layer.weight
    expected = F.dequantize_4bit(w4.data, w4.quant_state).float() + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    assert torch.allclose(plain.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)
    assert not layer.lora_B["default"].weight.eq(0).all()


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_4bit_packed_equals_padded(name, share_prefix, tokenizer):
    """Packing and prefix sharing are unchanged on a 4-bit backbone (4-bit layers computing in fp32)."""
    rm = _build(tokenizer, name, load_in_4bit=True).train()
    pairs = make_pairs(prompt=True)
    capacity = 0 if rm.backbone.group_attention else 256
    padded = rm(**collate_pairs(pairs, tokenizer.pad_token_id).inputs)
    packed_batch = collate_packed(pairs, tokenizer.pad_token_id, capacity, share_prefix=share_prefix)
    assert (packed_batch.computed_tokens < packed_batch.real_tokens) == share_prefix
    packed = rm(**packed_batch.inputs)
    assert (packed - padded).abs().max().item() < 1e-5


@pytest.mark.parametrize("loss_fn, penalty", [(name, "none") for name in LOSSES] +
                         [("log_sig", name) for name in PENALTIES if name != "none"])
def test_every_loss_and_penalty_trains_the_adapters_and_value_head_of_a_4bit_model(loss_fn, penalty, tokenizer):
    rm = _build(tokenizer, load_in_4bit=True).train()
    loss = build_loss(LossArgs(loss_fn=loss_fn, penalty=penalty))
    pairs = make_pairs(prompt=True)
    r = rm(**collate_packed(pairs, tokenizer.pad_token_id, 0).inputs)
    value = loss(r[:len(pairs)], r[len(pairs):], None)
    assert torch.isfinite(value)
    value.backward()
    grads = {n: p.grad for n, p in rm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and any("score" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)


def test_lora_backbone_is_stored_in_bf16_and_computes_exactly_as_the_fp32_store(tokenizer):
    """Under bf16 training LoRA's frozen linear weights are bf16 (autocast casts them to bf16 for every matmul
    anyway): rewards and gradients equal those of the fp32-stored backbone under autocast, bit for bit; adapters,
    value head, embeddings and norms stay fp32."""
    fp32_store, bf16_store = _build(tokenizer).train(), _build(tokenizer, compute=torch.bfloat16).train()
    frozen = {n: p.dtype for n, p in bf16_store.named_parameters() if not p.requires_grad}
    assert frozen["model.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"] == torch.bfloat16
    assert frozen["model.base_model.model.model.embed_tokens.weight"] == torch.float32
    assert {p.dtype for p in bf16_store.parameters() if p.requires_grad} == {torch.float32}
    stored = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert stored(bf16_store) < stored(fp32_store)
    pairs = make_pairs(prompt=True)
    results = []
    for rm in (fp32_store, bf16_store):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = rm(**collate_packed(pairs, tokenizer.pad_token_id, 0).inputs)
        log_sig_loss(r[:len(pairs)], r[len(pairs):]).backward()
        results.append((r.detach(), {n: p.grad for n, p in rm.named_parameters() if p.requires_grad}))
    (r1, g1), (r2, g2) = results
    assert torch.equal(r1, r2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


def _in_file_mapping(model, folder) -> list[str]:
    """Names of ``model``'s tensors whose memory lies in a memory map of a file under ``folder`` (/proc/self/maps)."""
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].startswith(str(folder)):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            maps.append((lo, hi))
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, t in tensors if t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in maps)]


@pytest.mark.parametrize("options", [dict(compute=torch.bfloat16), dict(load_in_4bit=True)], ids=["bf16_store", "4bit"])
def test_cast_or_quantised_backbone_keeps_no_view_into_the_checkpoint_file(options, tokenizer, tmp_path):
    """transformers loads safetensors as views into one memory map of the file; after the bf16 cast or the 4-bit
    quantisation no tensor may stay such a view (one would keep every page of the full-precision file resident).
    The fp32 LoRA store, which casts nothing, still reads the weights from the map: the detector sees them."""
    from coati.models.backbones import get_backbone
    from coati.models.loading import build_model

    torch.manual_seed(0)
    build_model(get_backbone("llama"), tokenizer, None, "tiny").save_pretrained(tmp_path)
    fp32 = _build(tokenizer, pretrain=str(tmp_path))
    assert "model.base_model.model.model.embed_tokens.weight" in _in_file_mapping(fp32, tmp_path)
    options = dict(options)
    converted = _build(tokenizer, compute=options.pop("compute", torch.float32), pretrain=str(tmp_path), **options)
    assert _in_file_mapping(converted, tmp_path) == []
    kept, copied = fp32.state_dict(), converted.state_dict()
    norms = [n for n in kept if n.endswith(("embed_tokens.weight", "norm.weight"))]
    assert norms and all(torch.equal(kept[n], copied[n]) for n in norms)  # the copies hold the loaded values


def test_scorer_loads_an_export_in_4bit(tokenizer, tmp_path):
    """RewardScorer(load_in_4bit=True) scores exactly like the fp32 export whose linear weights went through NF4
    quantisation and back (bitsandbytes' own round trip), i.e. its error is the weights' quantisation error only."""
    import bitsandbytes.functional as F

    from coati.checkpoint.export import export_hf
    from coati.scoring import RewardScorer

    rm = _train_a_little(_build(tokenizer), tokenizer)
    export_hf(rm.model, tokenizer, str(tmp_path / "rm"))
    full = RewardScorer.from_pretrained(tmp_path / "rm", device="cpu")
    q = RewardScorer.from_pretrained(tmp_path / "rm", device="cpu", load_in_4bit=True)
    assert is_quantized(q.model) and q.model.hf_model.score.weight.dtype == torch.float32
    with torch.no_grad():
        for module in full.model.hf_model.model.modules():
            if isinstance(module, torch.nn.Linear):
                packed, state = F.quantize_4bit(module.weight.data, quant_type="nf4", compress_statistics=True)
                module.weight.data = F.dequantize_4bit(packed, state).float()
    prompts = ["What is 2 + 2?", "用一句话介绍长城。", "Tell me a joke."] * 2
    answers = ["4", "长城是中国古代的防御工程。", "No.", "Five.", "我不知道。", "Why did the chicken cross the road?"]
    a, b = q.score_texts(prompts, answers), full.score_texts(prompts, answers)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # the command line takes the same path: python -m coati.score --load_in_4bit
    from coati.cli.score import main as score_main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": r}, ensure_ascii=False) + "\n"
                            for p, r in zip(prompts, answers)), encoding="utf-8")
    assert score_main(["--model_path", str(tmp_path / "rm"), "--input", str(rows), "--output",
                       str(tmp_path / "scored.jsonl"), "--load_in_4bit", "--disable_tqdm", "--device", "cpu"]) == 0
    cli = [json.loads(line)["score"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert max(abs(x - y) for x, y in zip(cli, a)) < 1e-6


def test_8bit_backbone_trains_and_exports(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from coati.checkpoint.export import export_hf

    rm = _train_a_little(_build(tokenizer, load_in_8bit=True), tokenizer)
    assert is_quantized(rm)
    batch = collate_pairs(make_pairs(seed=2), tokenizer.pad_token_id)
    with torch.no_grad():
        trainer = rm(**batch.inputs)
    export_hf(rm.model, tokenizer, str(tmp_path))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        exported = hf(**{k: batch.inputs[k] for k in ("input_ids", "attention_mask")}).logits.squeeze(-1)
    # LLM.int8 also quantises the activations (fp16, int8 outside the outlier columns): the fp32 export of the same
    # weights agrees within a tenth of the rewards' spread (measured 0.047 at a spread of 1.2)
    assert (exported - trainer).abs().max().item() < 0.1 * trainer.std().item()


@pytest.mark.parametrize("argv, message", [
    (["--load_in_4bit"], "--load_in_4bit freezes the quantised backbone, so it needs LoRA adapters to train: add "
                         "--lora_rank"),
    (QLORA + ["--strategy", "fsdp"], "--strategy fsdp cannot train a 4-/8-bit backbone: FSDP2 shards each parameter"),
    (QLORA + ["--strategy", "colossalai_ddp"], "--strategy colossalai_ddp cannot train a 4-/8-bit backbone"),
    (QLORA + ["--load_in_8bit"], "--load_in_4bit and --load_in_8bit: choose one"),
    (["--bnb_4bit_quant_type", "fp4"], "--bnb_4bit_quant_type is used only with --load_in_4bit"),
    (["--export_adapter"], "--export_adapter writes the LoRA adapter: add --lora_rank"),
])
def test_refusals_before_any_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_missing_bitsandbytes_names_the_install_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        parse_args(QLORA)
    assert e.value.code == 2
    assert "--load_in_4bit needs the bitsandbytes package: pip install --no-deps bitsandbytes==0.50.2" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_4bit_run_resumes_after_sigkill_like_an_uninterrupted_run(tmp_path):
    """Resume checkpoints of a 4-bit run hold the trainable parameters only (the 4-bit base is rebuilt from the same
    weights); a SIGKILL after step 4 and --resume auto end with the uninterrupted run's losses and export."""
    args = ["--model", "llama", "--dataset", "hh-rlhf", "--max_samples", "48", "--max_len", "96", "--batch_size", "4",
            "--max_steps", "8", "--lr", "1e-3", "--log_every", "1", "--disable_tqdm", "--strategy", "naive",
            "--save_every", "2", "--seed", "3", "--mixed_precision", "fp32"] + QLORA
    straight = tmp_path / "straight"
    _run_cli(args, straight)
    killed = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, str(REPO / "train_reward_model.py")] + args + ["--save_path", str(killed)],
                              env=run_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004" / "manifest.json").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed / "model.safetensors").exists()
    stored = _SafeReader(str(killed / "checkpoints" / "step-000004" / "model_optim")).read_metadata()
    model_keys = [k for k in stored.state_dict_metadata if k.startswith("model.")]
    assert any("lora_A" in k for k in model_keys) and any("score" in k for k in model_keys)
    assert not any("base_layer" in k or "embed_tokens" in k for k in model_keys), model_keys[:5]
    rows = _run_cli(args + ["--resume", "auto"], killed)
    a = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    b = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-6
    wa, wb = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


@pytest.mark.slow
def test_4bit_ddp_on_two_processes_trains_like_naive(tmp_path):
    """ddp (2 gloo processes x 2 pairs) == naive (4 pairs) on a 4-bit backbone: the same losses and export."""
    args = ["--model", "llama", "--dataset", "hh-rlhf", "--max_samples", "32", "--max_len", "96", "--max_steps", "4",
            "--lr", "1e-3", "--adam_eps", "1e-6", "--log_every", "1", "--disable_tqdm", "--seed", "7",
            "--mixed_precision", "fp32"] + QLORA
    naive = _run_cli(args + ["--strategy", "naive", "--batch_size", "4"], tmp_path / "naive")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_reward_model.py")] + args +
                          ["--strategy", "ddp", "--batch_size", "2", "--save_path", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    la, lb = ([r["loss"] for r in rows if r["split"] == "train"] for rows in (naive, ddp))
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    wa, wb = load_file(tmp_path / "naive" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_a_length_head_trains_beside_the_adapters_of_a_4bit_model(tokenizer):
    """QLoRA with --length_head: both heads, the adapters and the ODIN terms get finite, non-zero gradients."""
    from coati.losses import length_head_loss

    rm = _build(tokenizer, load_in_4bit=True).train()
    head = rm.add_length_head()
    pairs = make_pairs(prompt=True)
    batch = collate_packed(pairs, tokenizer.pad_token_id, 0)
    both, overlap = rm(**batch.inputs)
    total = both.sum(-1)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    loss = log_sig_loss(total[:len(pairs)], total[len(pairs):]) + length_head_loss(both[:, 0], both[:, 1], lengths,
                                                                                    overlap)
    assert torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in rm.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "score" in n)
