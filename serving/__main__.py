"""Container entry point of the predictor (what the InferenceService runs).

    python -m flashops.serving --model s3://models/team-a/models/chat/v1 --quantization int4 --mtp-tokens 3
    python -m flashops.serving --model file:///tmp/store/models/chat/v1 --host 127.0.0.1 --port 8080

KServe's conventions: HTTP on 8080 by default, the model name on the v1/v2 paths is --name (default: the
export's name). Exit code 2 for bad arguments or a model that cannot be served as asked.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashops.serving", allow_abbrev=False,
                                description="Serve a flashops model export with KServe's protocols and OpenAI routes.")
    p.add_argument("--model", required=True, help="model export URI: s3://bucket/prefix/models/<name>/<version> or file://...")
    p.add_argument("--name", default=None, help="served model name (default: the export's name)")
    p.add_argument("--quantization", choices=["none", "int4"], default="none")
    p.add_argument("--mtp-tokens", type=int, default=0, choices=[0, 1, 2, 3], help="MTP draft tokens per step (0 = off)")
    p.add_argument("--thinking", action="store_true", help="chat template's thinking mode by default")
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together; more queue, then 429")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a slot (default 4 x concurrency)")
    p.add_argument("--max-len", type=int, default=None, help="context length per sequence")
    p.add_argument("--host", default="0.0.0.0", help="bind address (the container default; flashops serve uses 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from flashops.serving.loading import LoadError, ServeOptions, load_predictor
    from flashops.serving.server import run
    from flashops.storage import StoreError

    try:
        options = ServeOptions(model_uri=args.model, name=args.name, quantization=args.quantization,
                               mtp_tokens=args.mtp_tokens, thinking=args.thinking,
                               max_concurrency=args.max_concurrency, max_queue=args.max_queue, max_len=args.max_len)
        predictor = load_predictor(options)
    except (LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run([predictor], host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
