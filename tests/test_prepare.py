"""prepare's block sizing comes from what the validated records hold, not from a constant."""

from __future__ import annotations

from pipelines import shards
from pipelines.prepare import bytes_per_input_row


def test_blocks_follow_the_bytes_the_records_write() -> None:
    size = 64
    image_row, meta_row = shards.row_bytes(size), shards.row_bytes(None)
    # BIOSCAN-5M's pretrain split alone: barcodes only, no image is decoded or written
    assert bytes_per_input_row({"pretrain": 4_677_756}, size) == meta_row
    assert shards.num_blocks(4_677_756, meta_row, 2) == -(-4_677_756 * meta_row // shards.TARGET_BLOCK_BYTES)
    # a val record writes an image row; a train record an image row plus its barcode in the pretrain group
    assert bytes_per_input_row({"val": 10}, size) == image_row
    assert bytes_per_input_row({"train": 10}, size) == image_row + meta_row
    mixed = bytes_per_input_row({"pretrain": 900, "train": 100}, size)
    assert mixed == -(-(900 * meta_row + 100 * (image_row + meta_row)) // 1000)
    # an image split needs ~16x the blocks of the same rows without images at 64 px
    assert shards.num_blocks(10**6, image_row, 2) > 10 * shards.num_blocks(10**6, meta_row, 2)
    # never fewer than two blocks per CPU, never more blocks than rows
    assert shards.num_blocks(1000, meta_row, 8) == 16 and shards.num_blocks(3, image_row, 8) == 3


def test_load_arrays_reads_rows_in_processid_order_whatever_the_files_hold(tmp_path) -> None:
    """Ray Data may write a partitioned group's blocks out of order: readers sort by processid."""
    import numpy as np
    import torch

    from g2p.data.dataset import Arrays

    pids = ["C3", "A1", "B2"]
    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 4, 4).contiguous()
    arrays = Arrays(processid=np.array(pids), barcode=["CCCC", "AAAA", "GGGG"], lat=torch.tensor([3.0, 1.0, 2.0]),
                    lon=torch.zeros(3), has_place=torch.ones(3, dtype=torch.bool),
                    species=np.array(["s3", "s1", "s2"], dtype=object), images=images)
    shards.write_arrays(arrays, tmp_path / "g")
    back = shards.load_arrays(tmp_path / "g", 4)
    assert list(back.processid) == ["A1", "B2", "C3"]
    assert back.barcode == ["AAAA", "GGGG", "CCCC"] and back.lat.tolist() == [1.0, 2.0, 3.0]
    assert list(back.species) == ["s1", "s2", "s3"] and back.images[:, 0, 0, 0].tolist() == [1, 2, 0]
