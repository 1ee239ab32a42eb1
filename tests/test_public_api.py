from __future__ import annotations


def test_public_surface() -> None:
    from g2p import G2PConfig, G2PDiffusionPipeline, KmerTokenizer

    tok = KmerTokenizer(k=4, stride=4)
    one = tok("ACGTACGTNNNN")
    many = tok(["ACGTACGT", "ACGTACGTACGTACGT"], padding=True)
    assert len(one["input_ids"]) == len(one["attention_mask"])
    assert len(many["input_ids"][0]) == len(many["input_ids"][1])
    assert many["attention_mask"][0][-1] == 0
    assert G2PConfig().sampling.steps > 0
    assert callable(G2PDiffusionPipeline.from_pretrained)
