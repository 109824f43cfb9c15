"""``inference-core`` (the gateway), ``inference-core simulate`` (the backend simulator) and
``inference-core batch`` (a client of the gateway's Batch API).

Every setting is also a flag (``--base-url`` for ``INFERENCE_BASE_URL``); flags win over the
environment.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import uvicorn

from inference_core.config import ENV_PREFIX, Settings


def _gateway_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-core",
        description="OpenAI-compatible gateway in front of vLLM or OpenAI. "
        "Run 'inference-core simulate --help' for the backend simulator, "
        "'inference-core batch --help' for the Batch API's client.",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "****" if name == "api_key" else info.default
        parser.add_argument(
            flag,
            dest=name,
            metavar=name.upper(),
            help=f"{info.description} [env {ENV_PREFIX}{name.upper()}, default {default}]",
        )
    return parser


def _simulator_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-core simulate", description="A fast, deterministic stand-in for vLLM or OpenAI."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", choices=("vllm", "openai"), default="vllm", help="which API to imitate")
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B-Instruct", help="served model name")
    parser.add_argument("--lora", action="append", default=[], help="a LoRA adapter name (repeatable)")
    parser.add_argument("--vllm-version", default="0.12.0", help="version reported at /version")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between stream tokens")
    parser.add_argument("--dimensions", type=int, default=384, help="embedding size")
    parser.add_argument("--fault", default="", help="faults for every request, as in the x-sim-fault header")
    parser.add_argument("--reported-waiting", type=int, default=0, help="queue depth to report at /metrics")
    cache = parser.add_argument_group("prefix cache and KV events (a vLLM replica's, for cache-aware routing)")
    cache.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=0,
        metavar="N",
        help="model a prefix cache of N blocks, evicted least recently used (vLLM's --num-gpu-blocks-override); "
        "0: none (default)",
    )
    cache.add_argument("--block-size", type=int, default=16, help="tokens per cache block (vLLM's --block-size)")
    cache.add_argument(
        "--prefill-per-token",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="prefill time per uncached prompt token, added to --ttft; prefills run one at a time, in arrival order",
    )
    cache.add_argument(
        "--enable-prompt-tokens-details",
        dest="prompt_tokens_details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens, as vLLM with this flag",
    )
    cache.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="a tokenizer directory (Hugging Face's tokenizer and chat template, as a gateway backend's "
        "'tokenizer'): /tokenize and the prefix cache use its token ids (default: the text's UTF-8 bytes)",
    )
    cache.add_argument(
        "--kv-events",
        default="",
        metavar="ENDPOINT",
        help="publish vLLM's KV-cache events on a ZMQ PUB socket bound here, e.g. tcp://127.0.0.1:5557 "
        "(port 0: any free port, as /_sim/stats tells)",
    )
    cache.add_argument(
        "--kv-replay",
        default="",
        metavar="ENDPOINT",
        help="serve replays of the last 10,000 event batches on a ZMQ ROUTER socket bound here (needs --kv-events)",
    )
    cache.add_argument("--kv-topic", default="kv", help="topic of the KV event messages (default: kv)")
    return parser


def simulate(argv: Sequence[str]) -> None:
    from inference_core.api import tune_garbage_collector
    from inference_core.simulator import SimulatorConfig, create_simulator

    parser = _simulator_parser()
    args = parser.parse_args(argv)
    if args.kv_replay and not args.kv_events:
        parser.error("--kv-replay needs --kv-events")
    config = SimulatorConfig(
        mode=args.mode, model=args.model, lora=tuple(args.lora), vllm_version=args.vllm_version,
        ttft=args.ttft, itl=args.itl, dimensions=args.dimensions, fault=args.fault,
        reported_waiting=args.reported_waiting, prefix_cache_blocks=args.prefix_cache_blocks,
        block_size=args.block_size, prefill_per_token=args.prefill_per_token,
        prompt_tokens_details=args.prompt_tokens_details, tokenizer=args.tokenizer, kv_events=args.kv_events,
        kv_replay=args.kv_replay, kv_topic=args.kv_topic,
    )  # fmt: skip
    app = create_simulator(config)
    # As for the gateway: else its first full collection, a hundred requests in, holds every stream ~45 ms.
    tune_garbage_collector()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def serve(argv: Sequence[str]) -> None:
    from inference_core.api import ready_app

    settings, app = ready_app(**vars(_gateway_parser().parse_args(argv)))
    # uvicorn re-raises SIGTERM once it has shut down gracefully: exit 0 for it, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.value,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=1,
        # Nothing reads the client's address, so X-Forwarded-* need no rewriting on every request.
        proxy_headers=False,
        server_header=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "simulate":
        simulate(argv[1:])
    elif argv and argv[0] == "batch":
        from inference_core.batch import command

        command.main(argv[1:])
    else:
        serve(argv)


if __name__ == "__main__":
    main()
