"""FLOPs per image (benchmarks/flops.py) on a random-weight tiny pipeline: what the counts must obey.

The UNet runs once per step on 1 row, or on 2 (conditional + null) with
classifier-free guidance; the aligner runs only with aligner guidance, and
its backward must be counted; the conditioner and the VAE run once per image.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.flops import (
    PARTS,
    flop_counter,
    image_flops,
    model_evaluations,
    projected_seconds,
    random_pipeline,
    scaled_to_steps,
)
from g2p.config import preset
from g2p.pipeline import G2PDiffusionPipeline


@pytest.fixture(scope="module")
def pipe() -> G2PDiffusionPipeline:
    p = random_pipeline(preset("tiny"))
    p.set_micro_batch_size(3)  # image_flops must count one image, not a padded chunk of 3
    return p


@pytest.fixture(scope="module")
def counts(pipe) -> dict[tuple[int, float, float], dict[str, float]]:
    """image_flops at (steps, guidance_scale, aligner_guidance_scale)."""
    keys = [(1, 5.0, 5.0), (2, 5.0, 5.0), (2, 1.0, 5.0), (2, 5.0, 0.0), (3, 5.0, 5.0)]
    return {k: image_flops(pipe, *k) for k in keys}


def test_every_part_counts_and_total_is_their_sum(counts) -> None:
    f = counts[(2, 5.0, 5.0)]
    assert set(f) == {*PARTS, "total"}
    assert all(f[k] > 0 for k in PARTS), f
    assert f["total"] == sum(f[k] for k in PARTS)


def test_classifier_free_guidance_doubles_the_unet(counts) -> None:
    on, off = counts[(2, 5.0, 5.0)], counts[(2, 1.0, 5.0)]
    assert on["unet"] == 2 * off["unet"]
    assert all(on[k] == off[k] for k in ("conditioner", "aligner", "vae_decode"))


def test_aligner_counts_only_with_aligner_guidance_and_includes_its_backward(pipe, counts) -> None:
    on, off = counts[(2, 5.0, 5.0)], counts[(2, 5.0, 0.0)]
    assert off["aligner"] == 0 and on["aligner"] > 0
    assert all(on[k] == off[k] for k in ("conditioner", "unet", "vae_decode"))
    # the aligner's forward alone: a step's guidance (forward + gradient to x_t) must cost well over it
    with flop_counter() as fc, torch.no_grad():
        pipe.aligner(torch.zeros(1, *pipe.latent_shape), torch.tensor([999]))
    assert on["aligner"] / 2 > 1.5 * fc.get_total_flops() > 0


def test_flops_are_linear_in_steps(pipe, counts) -> None:
    one, two, three = counts[(1, 5.0, 5.0)], counts[(2, 5.0, 5.0)], counts[(3, 5.0, 5.0)]
    for k in ("unet", "aligner"):
        assert two[k] == 2 * one[k] and three[k] == 3 * one[k], k
    for k in ("conditioner", "vae_decode"):
        assert one[k] == two[k] == three[k], k
    assert model_evaluations(pipe, 3) == 3
    assert scaled_to_steps(pipe, one, 1, 3) == three


def test_one_image_counts_no_padded_rows_and_the_micro_batch_size_is_restored(pipe, counts) -> None:
    # a step without CFG is one UNet pass over exactly one row, though the pipeline's chunks hold 3
    cond = pipe.encode_condition(["ACGT" * 100], [(None, None)])
    with flop_counter() as fc, torch.no_grad():
        pipe.predict_noise(torch.zeros(1, *pipe.latent_shape), torch.tensor([999]), cond.context,
                           cond.context_mask.bool())
    assert counts[(2, 1.0, 5.0)]["unet"] == 2 * fc.get_total_flops()
    assert pipe.micro_batch_size == 3


def test_projected_seconds() -> None:
    # 1e12 FLOPs x 1000 images / (4 GPUs x 1e15 FLOP/s x 0.5) = 0.5 s
    assert projected_seconds(1e12, 1000, 4, 1e15, 0.5) == pytest.approx(0.5)
    assert projected_seconds(1e12, 1000, 8, 1e15, 0.5) == pytest.approx(0.25)
    for bad in ({"gpus": 0}, {"mfu": 0.0}, {"mfu": 1.5}, {"peak_flops": 0.0}, {"images": -1}):
        with pytest.raises(ValueError):
            projected_seconds(**{"flops_per_image": 1e12, "images": 1, "gpus": 1, "peak_flops": 1e15, "mfu": 0.5,
                                 **bad})
