"""coati.serve against the reward server a user would write: Best-of-N requests of real responses, 1 to 64
concurrent clients, requests/s, responses/s and p50/p99 latency.

Both servers load the same SmolLM2-135M reward-model export, in the same dtype, behind FastAPI on uvicorn, each in its
own process, on 127.0.0.1 only:

- **coati**: ``python -m coati.serve --model_path M`` (dynamic batching across requests, packed rows, each prompt
  computed once for its N responses);
- **baseline**: ``AutoModelForSequenceClassification`` scoring each request alone: the N (prompt, response)
  conversations through the tokenizer's chat template, one padded batch per request, in FastAPI's default
  thread pool (a plain ``def`` endpoint).

Requests: ``/score`` bodies ``{"prompt", "responses"}`` with N in [4, 16] (seeded): a real prompt of hh-rlhf or of the
Chinese pair sets with its own chosen and rejected answers plus N - 2 real answers of other rows of the same data set.
Every concurrency level sends the same fixed list of requests (a bounded loop; loopback only). Both servers stay up
for the whole run and each level runs them back to back, so a drift of the machine's speed touches both alike.

    python benchmarks/bench_serve.py --json benchmarks/results_serve.json
    python benchmarks/bench_serve.py --device cuda --skeleton SKELETON --requests 64   # a GPU (device_serve.sh)

Without ``--model_path`` an export is made first: one training step from SmolLM2-135M-Instruct (the scores' values do
not matter here, only the work per request). With ``--skeleton`` (an export without its weights, made by
``--make_skeleton EXPORT OUT``) random weights of its config are written instead, for a machine without the
SmolLM2 package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
#: children import this repo first, then whatever PYTHONPATH held (packages installed with --target, say)
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
SOURCES = {"en": ["hh-rlhf"], "zh": ["dpo-zh-demo", "oaast-rm-zh", "medical-dpo-zh"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default=None, help="reward-model export (default: make one)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--min_n", type=int, default=4)
    p.add_argument("--max_n", type=int, default=16)
    p.add_argument("--max_len", type=int, default=512, help="tokens per scored text (both servers)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu", help="both servers' device (cpu, cuda)")
    p.add_argument("--skeleton", default=None,
                   help="an export folder without its weights (see --make_skeleton): random weights of its config "
                        "are written into a copy first; for a machine the weights cannot be carried to")
    p.add_argument("--make_skeleton", nargs=2, metavar=("EXPORT", "OUT"), default=None,
                   help="copy EXPORT (or, given 'new', an export made as without --model_path) without its weight "
                        "files to OUT, then exit")
    p.add_argument("--servers", nargs="+", default=["coati", "baseline"], choices=("coati", "baseline"))
    p.add_argument("--json", default=None)
    p.add_argument("--baseline_child", nargs=4, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the baseline

def baseline_app(model_path: str, dtype: str, max_len: int, device: str = "cpu"):
    """The server a user would write: transformers' classifier, each request scored alone."""
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ready"}

    @app.post("/score")
    def score(body: dict):
        prompt = body["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        texts = [tok.apply_chat_template(messages + [{"role": "assistant", "content": r}], tokenize=False)
                 for r in body["responses"]]
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                  add_special_tokens=False).to(device)
        with torch.no_grad():
            scores = model(**enc).logits[:, 0].float().tolist()
        return {"scores": scores, "best": scores.index(max(scores))}

    return app


# ------------------------------------------------------------------------------------------------ requests

def make_requests(n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``n`` Best-of-N bodies, alternating English and Chinese prompts (see the module docstring)."""
    from coati.data.sources import default_data_dir, load_pairs

    rng = random.Random(seed)
    pools = {}
    for lang, names in SOURCES.items():
        pairs, _ = load_pairs(names, default_data_dir(), seed=None, max_samples=400)
        pools[lang] = pairs
    out = []
    for i in range(n):
        pairs = pools["en" if i % 2 == 0 else "zh"]
        row = pairs[rng.randrange(len(pairs))]
        k = rng.randint(lo, hi)
        own = row.responses
        others = [r for p in rng.sample(pairs, min(len(pairs), 3 * k)) for r in p.responses if r not in own]
        responses = (own + others)[:k]
        out.append({"prompt": row.prompt, "responses": responses})
    return out


# ------------------------------------------------------------------------------------------------ load

async def load(url: str, requests: list[dict], clients: int) -> dict:
    import httpx

    latencies, queue = [], list(enumerate(requests))
    errors = 0

    async def worker(http):
        nonlocal errors
        while queue:
            _, body = queue.pop(0)
            t = time.perf_counter()
            r = await http.post(url + "/score", json=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    responses = sum(len(b["responses"]) for b in requests)
    return {"clients": clients, "requests": len(requests), "responses": responses, "errors": errors,
            "seconds": wall, "requests_per_s": len(requests) / wall, "responses_per_s": responses / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]}


def start(cmd: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_name(device: str) -> str | None:
    """The GPU's name when ``device`` is a CUDA device, else None."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def make_export(folder: str) -> str:
    out = os.path.join(folder, "rm")
    cmd = [sys.executable, os.path.join(REPO, "train_reward_model.py"), "--pretrain", "smollm2-135m", "--lora_rank",
           "16", "--dataset", "hh-rlhf", "--max_samples", "16", "--max_steps", "1", "--max_len", "256",
           "--save_path", out, "--disable_tqdm"]
    subprocess.run(cmd, check=True, cwd=REPO, env=CHILD_ENV, capture_output=True)
    return out


WEIGHTS = (".safetensors", ".bin", ".pt")


def make_skeleton(export: str, out: str) -> None:
    """Copy an export folder without its weight files (config, tokenizer, train_config.json...)."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(export):
        src = os.path.join(export, name)
        if os.path.isfile(src) and not name.endswith(WEIGHTS) and not name.endswith(".index.json"):
            shutil.copy(src, os.path.join(out, name))


def fill_skeleton(skeleton: str, folder: str) -> str:
    """A copy of ``skeleton`` with random weights of its config (seeded; the scores' values do not matter here, only
    the work per request)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = os.path.join(folder, "rm")
    shutil.copytree(skeleton, out)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_skeleton:
        export, out = args.make_skeleton
        make_skeleton(make_export(tempfile.mkdtemp(prefix="bench-serve-")) if export == "new" else export, out)
        return 0
    if args.baseline_child:
        import uvicorn

        model_path, port, dtype, device = args.baseline_child
        uvicorn.run(baseline_app(model_path, dtype, args.max_len, device), host="127.0.0.1", port=int(port),
                    log_level="warning")
        return 0
    folder = tempfile.mkdtemp(prefix="bench-serve-")
    model = args.model_path or (fill_skeleton(args.skeleton, folder) if args.skeleton else make_export(folder))
    requests = make_requests(args.requests, args.min_n, args.max_n)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "baseline_child"}, "model": model,
               "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                            if line.startswith("model name")), "?"),
               "responses_per_request": statistics.mean(len(b["responses"]) for b in requests)}
    results["gpu"] = gpu_name(args.device)
    servers = {}  # both up at once, idle between turns; each concurrency level runs them back to back, so a
    try:          # drift of the machine's speed moves both alike
        for name in args.servers:
            port = free_port()
            if name == "coati":
                cmd = [sys.executable, "-m", "coati.serve", "--model_path", model, "--port", str(port), "--device",
                       args.device, "--dtype", args.dtype, "--max_len", str(args.max_len), "--log_level", "warning"]
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--max_len", str(args.max_len), "--baseline_child",
                       model, str(port), args.dtype, args.device]
            servers[name] = (start(cmd, port), f"http://127.0.0.1:{port}")
            asyncio.run(load(servers[name][1], requests[:2], 1))  # warm-up
        for c in args.clients:
            for name, (_, url) in servers.items():
                row = asyncio.run(load(url, requests, c))
                results.setdefault(name, []).append(row)
                print(f"{name}: {c:>2} clients: {row['requests_per_s']:.2f} req/s, {row['responses_per_s']:.1f} "
                      f"responses/s, p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s, errors {row['errors']}",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
