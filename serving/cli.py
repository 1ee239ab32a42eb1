"""``g2p serve``: start the Ray Serve application on host:port and keep it up until Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8000)")
    p.add_argument("--params", default="params.yaml", help="params file with the serve section")
    p.add_argument("--model-uri", default=None, help="registry URI (default: serve.model_uri, "
                                                     "models:/g2pdiffusion@champion)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the project's)")
    p.add_argument("--model-dir", default=None, help="serve a generator folder instead of the registry")
    p.add_argument("--judge-dir", default=None, help="with --model-dir: a judge folder for scores")
    p.add_argument("--records", default="outputs/validation/valid.parquet",
                   help="validated records whose test splits the page offers")
    p.add_argument("--data-root", default="data", help="dataset root holding the records' images")
    p.add_argument("--max-batch-size", type=int, default=None, help="override serve.max_batch_size (1 = unbatched)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")


def serve_main(args: argparse.Namespace) -> int:
    from serving.config import load_serve_section

    section = load_serve_section(args.params)
    if args.max_batch_size is not None:
        section = dataclasses.replace(section, max_batch_size=args.max_batch_size)
    from serving import ray_app
    from serving.core import ModelSource

    if args.model_dir is not None:
        if not Path(args.model_dir).exists():
            raise FileNotFoundError(f"--model-dir: {args.model_dir!r} not found")
        source = ModelSource(model_dir=args.model_dir, judge_dir=args.judge_dir)
    else:
        source = ModelSource(model_uri=args.model_uri or section.model_uri, tracking_uri=args.tracking_uri)
        print(f"g2p serve: {source.model_uri} is version {source.current_version()}", flush=True)  # fails early
    records = args.records if args.records and Path(args.records).exists() else None
    url = ray_app.start(source, section, host=args.host, port=args.port, valid_parquet=records,
                        data_root=args.data_root, num_cpus=args.num_cpus)
    print(f"g2p serve: {url}/ (page), {url}/docs (OpenAPI), POST {url}/v1/phenotypes; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_app.stop()
    return 0
