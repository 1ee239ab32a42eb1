"""The ``g2p`` command line: one entry point, a thin edge over ``g2p`` and ``pipelines``.

Every command parses its arguments and calls one importable function; heavy
imports happen inside the handlers so ``g2p --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args: argparse.Namespace):
    """The typed config: ``--params`` (default ``params.yaml`` if present) over ``--preset``."""
    from g2p.config import load_params, preset

    params = getattr(args, "params", None)
    name = getattr(args, "preset", None)
    if params and Path(params).exists():
        return load_params(params, preset_name=name)
    if params and params != "params.yaml":
        raise SystemExit(f"--params: file {params!r} not found")
    return preset(name or "default")


def _add_config_args(p: argparse.ArgumentParser, preset_default: str | None = None) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml if present)")
    p.add_argument("--preset", default=preset_default, choices=["tiny", "default", "paper"],
                   help="preset the params file is applied on top of (default: default)")


# ----------------------------------------------------------------------------
# handlers
# ----------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from g2p.config import preset
    from g2p.data.synth import synthesise

    cfg = preset(args.preset).data if args.params is None else _config(args).data
    if args.seed is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, seed=args.seed)
    summary = synthesise(Path(args.out), cfg, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from g2p.data.bioscan import import_bioscan

    summary = import_bioscan(
        Path(args.root), Path(args.out), splits=args.splits, max_per_species=args.max_per_species,
        limit=args.limit, mode=args.mode, seed=args.seed, progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    cfg = _config(args).validate  # a bad params file fails before the slow GX import
    from pipelines.validation import ValidationFailed, validate_root

    try:
        summary = validate_root(Path(args.root), Path(args.out), cfg, progress=not args.quiet)
    except ValidationFailed as e:
        print(f"validation failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("records_in", "valid", "quarantined")}, indent=2))
    return 0


def cmd_config_dump(args: argparse.Namespace) -> int:
    """The model sections of a preset, then the pipeline's own sections (their defaults)."""
    import dataclasses

    import yaml

    from g2p.config import preset
    from pipelines.ray_train import RaySection

    cfg = _config(args) if args.params else preset(args.preset)
    print("# Every knob of the run, stated in full. Regenerate with:")
    print(f"#   g2p config dump --preset {args.preset} > params.yaml")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print("# Pipeline sections (validated by pipelines/, not part of the model config).")
    print(yaml.safe_dump({"ray": dataclasses.asdict(RaySection())}, sort_keys=False), end="")
    from pipelines.predict import PredictSection

    print(yaml.safe_dump({"predict": dataclasses.asdict(PredictSection())}, sort_keys=False), end="")
    from pipelines.registry import default_sections

    print(yaml.safe_dump(default_sections(), sort_keys=False), end="")
    from serving.config import ServeSection

    print(yaml.safe_dump({"serve": dataclasses.asdict(ServeSection())}, sort_keys=False), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.cli import serve_main

    return serve_main(args)


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.registry import cmd_promote as run

    return run(args)


def _knobs(args: argparse.Namespace) -> dict:
    """The pipeline's sampling knobs from the CLI (None: the model's saved defaults)."""
    return {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
            "aligner_guidance_scale": args.aligner_guidance_scale}


def _pipeline(path: str, scheduler: str | None):
    from g2p.pipeline import load_pipeline

    pipe = load_pipeline(path)
    return pipe.with_scheduler(scheduler) if scheduler else pipe


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from g2p.images import save_grid
    from g2p.pipeline import images_uint8

    pipe = _pipeline(args.checkpoint, args.scheduler)
    out = pipe(args.barcode, args.lat, args.lon, num_images_per_barcode=args.n,
               generator=torch.Generator().manual_seed(args.seed), output_type="pt", **_knobs(args))
    save_grid(images_uint8(out.images), Path(args.out))
    print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipelines.predict import load_section, parse_columns, predict

    section = load_section(args.params)
    if args.concurrency is not None:
        import dataclasses

        section = dataclasses.replace(section, concurrency=args.concurrency)
    try:
        summary = predict(model=args.model, input=args.input, output=args.output, num_images=args.num_images,
                          steps=args.steps or None, guidance_scale=args.guidance_scale,
                          aligner_guidance_scale=args.aligner_guidance_scale, scheduler=args.scheduler,
                          seed=args.seed, judge=args.judge, columns=parse_columns(args.column), section=section,
                          overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from g2p.pipeline import convert_checkpoint

    convert_checkpoint(args.old, args.new)
    print(f"wrote {args.new} (G2PDiffusionPipeline layout: model_index.json + one folder per component)")
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    """Section 4.4 grids: one barcode mutated at each rate, and placed at each latitude."""
    from g2p.images import save_grid
    from g2p.variation import variation_images

    pipe = _pipeline(args.model, args.scheduler)
    barcode, lat, lon = args.barcode, args.lat, args.lon
    if args.processid:
        import pandas as pd

        df = pd.read_parquet(args.valid)
        rows = df[df["processid"].astype(str) == args.processid]
        if rows.empty:
            raise ValueError(f"--processid: {args.processid!r} not found in {args.valid}")
        r = rows.iloc[0]
        col = "dna_barcode_normalised" if "dna_barcode_normalised" in rows else "dna_barcode"
        barcode = str(r[col])
        lat = None if pd.isna(r["coord-lat"]) else float(r["coord-lat"])
        lon = None if pd.isna(r["coord-lon"]) else float(r["coord-lon"])
    if not barcode:
        raise ValueError("--barcode: give a barcode or --processid")
    out = Path(args.out)
    v = variation_images(pipe, [barcode], [lat], [lon], rates=args.rates, sweep=args.latitudes,
                         num_images=args.n, seed=args.seed, **_knobs(args))
    mut, lats = v.mutation, v.latitude  # (1, R, n, 3, H, W), (1, L, n, 3, H, W)
    # rows: samples, columns: mutation rates / latitudes
    save_grid(mut[0].transpose(0, 1).reshape(-1, *mut.shape[3:]), out / "mutation.png", ncols=len(v.rates))
    save_grid(lats[0].transpose(0, 1).reshape(-1, *lats.shape[3:]), out / "latitude.png", ncols=len(v.latitudes))
    scores = None
    if args.judge:
        from g2p.judge import Judge

        judge = Judge.from_pretrained(args.judge)
        emb = judge.embed_images(mut[0].reshape(-1, *mut.shape[3:])).reshape(len(v.rates), args.n, -1)
        scores = (emb * judge.embed_barcodes([barcode])[0]).sum(-1).mean(1).tolist()
    summary = {"mutation_grid": str(out / "mutation.png"), "latitude_grid": str(out / "latitude.png"),
               "rates": v.rates, "latitudes": v.latitudes}
    if scores is not None:
        summary["score_by_rate"] = [round(s, 4) for s in scores]
    print(json.dumps(summary, indent=2))
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from g2p.config import SCHEDULER_NAMES

    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sampling.steps)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance, 1 = off (default: the model's sampling.guidance_scale)")
    p.add_argument("--aligner-guidance-scale", type=float, default=None,
                   help="the paper's aligner guidance w, 0 = off (default: the model's sampling.aligner_guidance_scale)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                   help="sampling scheduler (default: the model's sampling.scheduler)")
    p.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="g2p", description="G2PDiffusion: DNA barcode + place -> phenotype images.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets: synthesise, import BIOSCAN-5M, validate")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="write the synthetic benchmark in the BIOSCAN-5M layout")
    s.add_argument("--out", required=True, help="output root (gets bioscan5m/...)")
    s.add_argument("--preset", default="default", choices=["tiny", "default", "paper", "large"])
    s.add_argument("--params", default=None, help="take the data section from this params file instead")
    s.add_argument("--seed", type=int, default=None, help="override data.seed")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_data_synth)

    i = dsub.add_parser("import-bioscan", help="take a subset of a local BIOSCAN-5M download into the layout")
    i.add_argument("--root", required=True, help="BIOSCAN-5M root (holds bioscan5m/metadata and bioscan5m/images)")
    i.add_argument("--out", required=True, help="output root")
    i.add_argument("--splits", nargs="+", default=None, help="splits to take (default: all)")
    i.add_argument("--max-per-species", type=int, default=None, help="cap records per species (per split)")
    i.add_argument("--limit", type=int, default=None, help="cap total records")
    i.add_argument("--mode", choices=["copy", "link", "symlink"], default="link",
                   help="how images come across: copy, hard link (falls back to copy), or symlink")
    i.add_argument("--seed", type=int, default=0, help="seed for subsampling")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(func=cmd_data_import)

    v = dsub.add_parser("validate", help="Great Expectations checks; writes valid/quarantine/summary/Data Docs")
    v.add_argument("--root", required=True, help="dataset root in the BIOSCAN-5M layout")
    v.add_argument("--out", required=True, help="output folder")
    _add_config_args(v)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_data_validate)

    c = sub.add_parser("config", help="show the typed configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    d = csub.add_parser("dump", help="print a preset (or params.yaml over it) as YAML")
    d.add_argument("--preset", default="default", choices=["tiny", "default", "paper"])
    d.add_argument("--params", default=None, help="apply this params file on top of the preset")
    d.set_defaults(func=cmd_config_dump)

    g = sub.add_parser("generate", help="generate phenotype images for one barcode and place")
    g.add_argument("--checkpoint", required=True, help="model folder (models/g2pdiffusion)")
    g.add_argument("--barcode", required=True)
    g.add_argument("--lat", type=float, default=None)
    g.add_argument("--lon", type=float, default=None)
    g.add_argument("--n", type=int, default=4, help="number of images")
    _add_sampling_args(g)
    g.add_argument("--out", required=True, help="PNG grid to write")
    g.set_defaults(func=cmd_generate)

    pd_ = sub.add_parser("predict", help="images for a whole table of barcodes (Ray Data actors; resumable)")
    pd_.add_argument("--model", required=True, help="pipeline folder, or models:/NAME@ALIAS or models:/NAME/VERSION")
    pd_.add_argument("--input", required=True, help="Parquet file or folder, or CSV, at a path or URI: a barcode "
                     "column; optional latitude, longitude, seed; other columns carried through")
    pd_.add_argument("--output", required=True, help="folder or URI (s3://...) for the part-NNNNNN.parquet files")
    pd_.add_argument("--num-images", type=int, default=1, help="images per row (default 1; --steps 0: the model's)")
    pd_.add_argument("--judge", default=None, help="Judge folder for scores (a registered model brings its own)")
    pd_.add_argument("--column", action="append", metavar="ROLE=NAME",
                     help="input column for a role (barcode, latitude, longitude, seed), e.g. barcode=dna_barcode")
    pd_.add_argument("--concurrency", type=int, default=None, help="actors (default: params.yaml predict.concurrency)")
    pd_.add_argument("--overwrite", action="store_true", help="replace a different earlier prediction at --output")
    pd_.add_argument("--params", default="params.yaml", help="its predict section (defaults if absent)")
    pd_.add_argument("--quiet", action="store_true")
    _add_sampling_args(pd_)
    pd_.set_defaults(func=cmd_predict)

    from g2p.variation import LATITUDES, MUTATION_RATES

    vy = sub.add_parser("vary", help="section 4.4 grids: barcode mutation rates and a latitude sweep")
    vy.add_argument("--model", default="models/g2pdiffusion", help="model folder")
    vy.add_argument("--judge", default=None, help="judge folder: also print CLIBDScore per mutation rate")
    src = vy.add_mutually_exclusive_group(required=True)
    src.add_argument("--processid", default=None, help="take barcode and place of this record (from --valid)")
    src.add_argument("--barcode", default=None)
    vy.add_argument("--valid", default="outputs/validation/valid.parquet", help="records file for --processid")
    vy.add_argument("--lat", type=float, default=None)
    vy.add_argument("--lon", type=float, default=None)
    vy.add_argument("--rates", type=float, nargs="+", default=list(MUTATION_RATES))
    vy.add_argument("--latitudes", type=float, nargs="+", default=list(LATITUDES))
    vy.add_argument("--n", type=int, default=2, help="images per variant (grid rows)")
    _add_sampling_args(vy)
    vy.add_argument("--out", required=True, help="folder for mutation.png and latitude.png")
    vy.set_defaults(func=cmd_vary)

    cc = sub.add_parser("convert-checkpoint",
                        help="convert a model folder of the training layout into the G2PDiffusionPipeline layout")
    cc.add_argument("old", help="folder with denoiser.safetensors, conditioner.safetensors, ... (before the pipeline)")
    cc.add_argument("new", help="folder to write (model_index.json + one folder per component)")
    cc.set_defaults(func=cmd_convert_checkpoint)

    from pipelines.registry import add_promote_args

    pr = sub.add_parser("promote", help="MLflow registry gate: move alias champion to challenger if better; rollback")
    add_promote_args(pr)
    pr.set_defaults(func=cmd_promote)

    from serving.cli import add_serve_args

    sv = sub.add_parser("serve", help="Ray Serve endpoint + page: POST /v1/phenotypes, GET /v1/model, /healthz, /docs, /")
    add_serve_args(sv)
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
