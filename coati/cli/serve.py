"""A reward server for RL pipelines: batched HTTP scoring that a policy trainer (PPO, GRPO, rejection sampling) or a
data-filtering job calls from another process or machine.

Usage::

    python -m coati.serve --model_path out/rm --host 127.0.0.1 --port 8000

The endpoints, limits and error bodies are described in :mod:`coati.serving.app`, dynamic batching in
:mod:`coati.serving.batcher`. SIGTERM (or Ctrl-C) stops accepting connections, answers the requests already accepted,
then exits 0. A bad ``--model_path`` (or any other option) fails with one ``error: ...`` line and exit code 2 before
the port is bound.
"""

import argparse
import logging
import math
import signal
import sys

import torch

from coati.cli.options import DefaultsOnceHelpFormatter, add_model_options, checked
from coati.config import COUNT, POSITIVE, Range
from coati.serving.app import ServeSettings, create_app
from coati.serving.connections import bounded_h11_protocol
from coati.serving.engine import RewardEngine

logger = logging.getLogger("coati.serve")

#: the flags' defaults
DEFAULTS = ServeSettings()


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m coati.serve`` argument parser (defaults from :class:`ServeSettings`)."""

    p = argparse.ArgumentParser(prog="python -m coati.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--model_path", required=True, help="exported reward model folder (or another trainer's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=checked(int, Range(0, 65535, integer=True)), default=8000, help="port to bind")
    p.add_argument("--normalize", choices=("auto", "true", "false"), default="auto",
                   help="serve (r - reward_mean) / reward_std: auto = when the export's config.json stores the "
                        "statistics (or --reward_mean/--reward_std are given)")
    p.add_argument("--reward_mean", type=checked(float, Range()), default=None, help="override the stored reward_mean")
    p.add_argument("--reward_std", type=checked(float, POSITIVE), default=None, help="override the stored reward_std")
    p.add_argument("--max_batch_tokens", type=checked(int, COUNT), default=DEFAULTS.max_batch_tokens,
                   help="token positions per forward pass (requests are merged up to this)")
    p.add_argument("--max_wait_ms", type=checked(float, Range(0)), default=DEFAULTS.max_wait_ms,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--max_queue", type=checked(int, COUNT), default=DEFAULTS.max_queue,
                   help="requests waiting at most; more are answered 503 with Retry-After")
    p.add_argument("--request_timeout", type=checked(float, POSITIVE), default=DEFAULTS.request_timeout,
                   help="seconds a request may wait for its scores before a 504")
    p.add_argument("--max_body_bytes", type=checked(int, COUNT), default=DEFAULTS.max_body_bytes,
                   help="largest request body")
    p.add_argument("--max_texts", type=checked(int, COUNT), default=DEFAULTS.max_texts,
                   help="texts per request at most")
    p.add_argument("--max_chars", type=checked(int, COUNT), default=DEFAULTS.max_chars,
                   help="characters per text at most")
    p.add_argument("--max_connections", type=checked(int, COUNT), default=1024,
                   help="open connections at most; a request on one more is answered 503")
    p.add_argument("--header_timeout", type=checked(float, POSITIVE), default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed")
    p.add_argument("--keep_alive_timeout", type=checked(int, COUNT), default=5,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--shutdown_timeout", type=checked(float, POSITIVE), default=120.0,
                   help="seconds SIGTERM waits for the accepted requests before closing their connections")
    p.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info")
    add_model_options(p)
    p.set_defaults(batch_size=16)
    return p


def load(args) -> tuple[RewardEngine, ServeSettings, dict]:
    """Load the model and resolve the options (everything before the port is bound).

    Raises:
        ValueError / OSError / ImportError: a bad model folder, device or option, ``--normalize true`` without
        statistics, FastAPI or uvicorn missing.
    """
    import importlib.util

    from coati.scoring import RewardScorer, resolve_device

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"python -m coati.serve needs {module}: pip install -e '.[serve]'")
    device = resolve_device(args.device)
    scorer = RewardScorer.from_pretrained(args.model_path, device=device, dtype=getattr(torch, args.dtype),
                                          max_len=args.max_len, batch_size=args.batch_size,
                                          reward_mean=args.reward_mean, reward_std=args.reward_std,
                                          load_in_4bit=args.load_in_4bit, layout=args.layout)
    normalize = args.normalize == "true" or (args.normalize == "auto" and scorer.reward_mean is not None)
    if normalize:
        scorer.normalize(torch.zeros(1))  # one line naming the missing statistics
    settings = ServeSettings(args.max_batch_tokens, args.max_wait_ms, args.max_queue, args.request_timeout,
                             args.max_body_bytes, args.max_texts, args.max_chars, normalize)
    info = {"model_path": args.model_path, "device": str(device), "dtype": args.dtype,
            "load_in_4bit": args.load_in_4bit}
    return RewardEngine(scorer, args.max_batch_tokens), settings, info


def main(argv: list[str] | None = None) -> int:
    """CLI entry: load, bind, serve until SIGTERM / SIGINT (then exit 0); user errors are one ``error: ...`` line
    with exit code 2, before the port is bound."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        engine, settings, info = load(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(engine, settings, info)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=math.ceil(args.shutdown_timeout),
                            http=bounded_h11_protocol(args.header_timeout), limit_concurrency=args.max_connections,
                            timeout_keep_alive=args.keep_alive_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; these handlers (which it
    # restores first) make that a no-op, so a SIGTERM that was served cleanly ends with exit code 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logger.info("model %s loaded (%s layout, max_len %d, %s, normalize %s)", args.model_path, engine.scorer.layout,
                engine.scorer.encoder.max_len, "packed groups" if engine.packed else "padded batches",
                settings.normalize)
    server.run()
    return 0 if server.started else 1
