"""``g2p data synth``: a synthetic benchmark in the exact BIOSCAN-5M layout.

:func:`synthesise` writes, under ``out``:

- ``bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv``: every
  official column (:data:`g2p.data.layout.COLUMNS`, in order) with the real
  value conventions (see :mod:`g2p.data.names`), so the official
  ``bioscan-dataset`` package and :mod:`g2p.data.bioscan` read it as the real
  file;
- ``bioscan5m/images/cropped_256/{split}/{chunk}/{processid}.jpg``: one JPEG
  per record (``image_size`` square; none with ``metadata_only``);
- ``bioscan5m/metadata/synthetic_ground_truth.parquet``: what made each record.

Splits follow BIOSCAN-5M: ``pretrain`` (no species label; genus known for 30%,
family for 85%), ``train``/``val``/``test`` (seen species; val and test use
haplotypes that never occur in train; test and val are flat over species),
``key_unseen``/``val_unseen``/``test_unseen`` (unseen species, placeholder
names ``Genus sp. 4ZKM``, genus known) and ``other_heldout``. Which record
goes where: :mod:`g2p.data.records`; how barcodes, traits and images are
made: :mod:`g2p.data.genome`, :mod:`g2p.data.traits`, :mod:`g2p.data.render`.

Ground-truth columns (one row per record, same order as the CSV):

====================== ======================================================
``processid``          the record (joins the CSV)
``split``              its split
``species_id``         global species index (int32); ``species_kind`` 0 seen,
                       1 unseen, 2 held-out; ``order_id``/``family_id``/
                       ``genus_id`` its ancestors (even where the CSV hides them)
``haplotype_id``       which distinct haplotype its barcode was read from
``read_start``         template offset of the read's first base (reads are
                       windows of one template per haplotype, see genome.py)
``read_length``        raw read length (the CSV's barcode, before trimming)
``has_n``              the read carries N's
``lat``, ``lon``       place (also in the CSV)
``size_multiplier``    environment effect: ``1 + bergmann_coefficient * |lat|``
``pose_deg``           rotation of the specimen, degrees (per-image nuisance)
``offset_x/_y``        centre offset, fraction of the image side
``light_gain``         brightness factor; ``light_warmth`` red-vs-blue shift;
                       ``bg_tone`` background shade offset
``sex``                0 female, 1 male (``dimorphism``)
``damage``             0 intact, 1 a leg lost, 2 an antenna lost, 3 a torn
                       forewing (``traits.DAMAGE``); ``damage_part`` which
                       leg (0-5) or side (``% 2``)
``melanism_multiplier`` body-lightness factor from thermal melanism (1 outside
                       the melanic families)
``trait_<name>``       the decoded traits that drew the image: the species',
                       with the record's sex and melanism applied (names in
                       :data:`g2p.data.traits.TRAIT_NAMES`; hues in turns,
                       sizes in body lengths, counts, ``wing_type`` index into
                       ``traits.WING_TYPES``)
``trait_vector``       the species' latent trait vector (float32 list, same order)
``has_image``          an image was written
====================== ======================================================

Determinism: every random number comes from ``numpy.random.SeedSequence
(seed)`` children and images are pure functions of their parameters, so the
same config gives byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from g2p.config import DataConfig
from g2p.data import genome
from g2p.data.layout import COLUMNS, IMAGES_RELDIR, IMAGE_TYPE, METADATA_RELPATH, TRUTH_RELPATH
from g2p.data.records import (SPLIT_CODES, drawing_parameters, make_world_and_records, metadata_columns,
                              truth_columns)
from g2p.data.render import draw_specimen

CHUNK_ROWS = 200_000  # rows per CSV block / parquet row group (memory-lean at 5 M rows)
JPEG_QUALITY = 90
IMAGE_BATCH = 64  # images per task handed to a worker


def synthesise(out: Path, cfg: DataConfig, progress: bool = False) -> dict:
    """Write the benchmark under ``out`` (see the module docstring); returns a summary."""
    t0 = time.perf_counter()
    out = Path(out)
    world, rec = make_world_and_records(cfg)
    n = rec["species"].size
    meta_path, truth_path = out / METADATA_RELPATH, out / TRUTH_RELPATH
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, dict[str, float]]] = []
    csv_writer = pq_writer = None
    try:
        for c0 in range(0, n, CHUNK_ROWS):
            sl = slice(c0, min(n, c0 + CHUNK_ROWS))
            meta = metadata_columns(world, rec, sl)
            table = pa.table({c: meta[c] for c in COLUMNS})
            if csv_writer is None:  # unquoted, like pandas' to_csv of the real file (no value has a comma)
                options = pacsv.WriteOptions(quoting_style="none", quoting_header="none",
                                             batch_size=CHUNK_ROWS)
                csv_writer = pacsv.CSVWriter(str(meta_path), table.schema, write_options=options)
            csv_writer.write_table(table)
            truth = pa.table(truth_columns(world, rec, sl, meta, has_image=not cfg.metadata_only))
            if pq_writer is None:
                pq_writer = pq.ParquetWriter(str(truth_path), truth.schema, compression="zstd")
            pq_writer.write_table(truth)
            if not cfg.metadata_only:
                jobs += zip(_image_paths(out, meta), drawing_parameters(world, rec, sl))
    finally:
        if csv_writer is not None:
            csv_writer.close()
        if pq_writer is not None:
            pq_writer.close()
    n_images = _render_all(jobs, cfg.image_size, progress)
    kinds = world.tax.species_kind
    return {
        "root": str(out), "metadata": str(meta_path), "ground_truth": str(truth_path), "records": int(n),
        "images": n_images, "splits": {s: int((rec["split"] == i).sum()) for i, s in enumerate(SPLIT_CODES)},
        "species": {"seen": int((kinds == genome.KIND_SEEN).sum()),
                    "unseen": int((kinds == genome.KIND_UNSEEN).sum()),
                    "heldout": int((kinds == genome.KIND_HELDOUT).sum())},
        "haplotypes": int(world.haplotypes.shape[0]), "seed": cfg.seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _image_paths(out: Path, meta: dict[str, pa.Array]) -> list[str]:
    base = out / IMAGES_RELDIR / IMAGE_TYPE
    return [str(base / s / ch / f"{pid}.jpg") if ch else str(base / s / f"{pid}.jpg")
            for pid, s, ch in zip(meta["processid"].to_pylist(), meta["split"].to_pylist(),
                                  meta["chunk"].to_pylist())]


def _render_batch(args: tuple[list[tuple[str, dict[str, float]]], int]) -> int:
    jobs, size = args
    for path, p in jobs:
        draw_specimen(p, size).save(path, format="JPEG", quality=JPEG_QUALITY)
    return len(jobs)


def _render_all(jobs: list[tuple[str, dict[str, float]]], size: int, progress: bool) -> int:
    """Draw and save every image: two worker processes when there are many.

    Images are pure functions of their parameters, so the bytes do not depend
    on which worker draws which image or in what order.
    """
    if not jobs:
        return 0
    for d in sorted({os.path.dirname(p) for p, _ in jobs}):
        os.makedirs(d, exist_ok=True)
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not progress)
    batches = [(jobs[i: i + IMAGE_BATCH], size) for i in range(0, len(jobs), IMAGE_BATCH)]
    workers = min(2, os.cpu_count() or 1)
    if workers > 1 and len(jobs) >= 4 * IMAGE_BATCH:
        ctx = mp.get_context("spawn")  # no fork of a process that runs Arrow threads
        with ctx.Pool(workers) as pool:
            for k in pool.imap_unordered(_render_batch, batches):
                bar.update(k)
    else:
        for b in batches:
            bar.update(_render_batch(b))
    bar.close()
    return len(jobs)
