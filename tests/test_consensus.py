"""Consensus re-ranking (decoding.rerank_neighbours, models/consensus.py): neighbours by pooled image
features, beams re-ranked by CIDEr-D against their captions, the grid transformer's search with it,
the bank saved with the model, and the params that refuse it where it does not apply."""
import dataclasses

import pytest
import torch

from vlbench.config import DecodingConfig
from vlbench.errors import ParamError
from vlbench.metrics.cider_d import CiderD
from vlbench.metrics.decodings import decoding_name, decodings_to_compare
from vlbench.models.consensus import NeighbourCaptions, pooled_image_features, standard_scores

DOGS = ["a dog runs on the grass", "a brown dog runs", "a dog running on grass", "the dog runs in a field",
        "a dog is running"]
BIKES = ["a man rides a bike", "a man riding a bicycle", "a cyclist on a road", "a man on a bike",
         "a person rides a bike down the street"]
WATER = ["two children play in the water", "kids splash in a pool", "children swimming", "two kids in water",
         "a boy and a girl play in the water"]


def bank() -> NeighbourCaptions:
    return NeighbourCaptions(torch.eye(4)[:3].half(), [DOGS, BIKES, WATER])


def image_like(row: int) -> torch.Tensor:
    """A 1-image token grid [1, 2, 4] whose mean-pooled feature points at training image ``row``."""
    return torch.stack([torch.eye(4)[row] * 3, torch.eye(4)[row] + 0.1 * torch.eye(4)[3]])[None]


def test_neighbours_are_the_closest_pooled_features():
    grid = torch.randn(3, 7, 5)
    assert torch.allclose(pooled_image_features([grid[:2], grid[2:]]),
                          torch.nn.functional.normalize(grid.mean(1), dim=-1))
    assert bank().nearest(image_like(1), 1) == [BIKES]
    assert bank().nearest(image_like(2), 2)[0][:5] == WATER and len(bank().nearest(image_like(2), 2)[0]) == 10
    assert len(bank().nearest(image_like(0), 99)[0]) == 15  # k past the bank: all of it
    assert torch.equal(standard_scores(torch.tensor([[2.0, 2.0, 2.0]])), torch.zeros(1, 3))


def test_rerank_trades_the_search_score_against_agreement_with_the_neighbours():
    beams = ["a man rides a bike", "a dog runs on the grass", "a cat"]
    ranking = torch.tensor([[-0.10, -0.12, -0.50]])  # the search prefers the bike
    grid = image_like(0)  # the image looks like the dog photo
    assert bank().rerank(grid, beams, ranking, 1, 0.0) == ["a man rides a bike"]  # weight 0: the search's pick
    assert bank().rerank(grid, beams, ranking, 1, 5.0) == ["a dog runs on the grass"]
    # by hand: z(search) + w z(CIDEr-D against the dog captions, document frequencies of the whole bank)
    cider = CiderD([DOGS, BIKES, WATER])
    agree = torch.tensor([[cider.score(b, DOGS) for b in beams]])
    for w in (0.1, 0.5, 1.0, 2.0):
        expected = beams[int((standard_scores(ranking) + w * standard_scores(agree)).argmax())]
        assert bank().rerank(grid, beams, ranking, 1, w) == [expected]
    # an image's beams are its own: two images, item-major
    two = torch.cat([image_like(0), image_like(1)])
    assert bank().rerank(two, beams + beams, ranking.repeat(2, 1), 1, 5.0) == ["a dog runs on the grass",
                                                                                "a man rides a bike"]


def test_grid_transformer_reranks_its_beams(trained_grid_captioner, tmp_path):
    from vlbench.models.consensus import NeighbourCaptions
    from vlbench.models.decoding import CachedDecoding, beam_search_all
    from vlbench.models.tokenizers import BOS, EOS
    from vlbench.models.trained import load_trained, save_trained

    model, grid = trained_grid_captioner
    plain = DecodingConfig(strategy="beam", beam_size=4, max_len=12)
    reranked = DecodingConfig(strategy="beam", beam_size=4, max_len=12, rerank_neighbours=3, rerank_weight=50.0)
    with pytest.raises(RuntimeError, match="rerank_neighbours needs the training images' captions"):
        model.generate(grid, reranked)
    references = [[c] * 5 for c in model.generate(grid, DecodingConfig(strategy="greedy", max_len=12))]
    model.neighbours = NeighbourCaptions(pooled_image_features([grid]).half(), references)
    try:
        assert model.generate(grid, dataclasses.replace(reranked, rerank_weight=0.0)) \
            == model.generate(grid, plain)
        memory = model.encode(grid).repeat_interleave(4, 0)
        ids, _ = beam_search_all(CachedDecoding(model, memory), len(grid), BOS, EOS, 4, 12)
        beams = [model.vocab.decode(row[1:]) for row in ids]
        near = model.neighbours.nearest(grid, 3)
        best = [max(beams[4 * i: 4 * i + 4], key=lambda b: model.neighbours.cider.score(b, near[i])) for i in range(len(grid))]
        got = model.generate(grid, reranked)
        cider = model.neighbours.cider
        assert [cider.score(g, n) for g, n in zip(got, near)] == pytest.approx([cider.score(b, n) for b, n in zip(best, near)])
        assert got != model.generate(grid, plain)  # the weight moved some picks

        vocab = model.vocab.itos
        save_trained(model, tmp_path, "t", dataclasses.asdict(model.cfg) | {"decoding": dataclasses.asdict(reranked)},
                     {"image_dim": grid.shape[2], "n_grid": grid.shape[1], "vocab": vocab})
    finally:
        model.neighbours = None
    loaded, cfg, _ = load_trained(tmp_path)
    assert cfg.decoding.rerank_neighbours == 3 and loaded.neighbours.captions == references
    assert loaded.generate(grid, cfg.decoding) == got


def test_decodings_compare_the_plain_search_beside_the_reranked_one():
    configured = DecodingConfig(strategy="beam", beam_size=5, length_penalty=1.0, block_trigrams=True,
                                rerank_neighbours=5, rerank_weight=1.0)
    assert decoding_name(configured) == "beam5_lp1_block_trigrams_rerank5x1"
    runs, head = decodings_to_compare(configured, ["greedy", "beam_block_trigrams"])
    assert list(runs) == ["greedy", "beam5_lp1_block_trigrams", "beam5_lp1_block_trigrams_rerank5x1"]
    assert head == "beam5_lp1_block_trigrams_rerank5x1" and runs[head] is configured
    assert runs["beam5_lp1_block_trigrams"].rerank_neighbours == 0


@pytest.mark.parametrize("model", ["vision_prefix", "cross_attention_lm"])
def test_rerank_is_refused_where_it_does_not_apply(model):
    from vlbench.models.variants import build_variant

    beam = {"strategy": "beam", "rerank_neighbours": 5}
    with pytest.raises(ParamError, match=r"^variants\.t\.decoding\.rerank_neighbours: implemented for the grid transformer"):
        build_variant("t", {"model": model, "image_encoder": "efficientnet_lite0", "decoding": beam})
    grid = {"model": "grid_transformer", "image_encoder": "efficientnet_lite0"}
    assert build_variant("t", {**grid, "decoding": beam}).decoding.rerank_neighbours == 5
    with pytest.raises(ParamError, match=r"^variants\.t\.decoding\.rerank_neighbours: re-ranks the beams of a beam search"):
        build_variant("t", {**grid, "decoding": {"rerank_neighbours": 5}})  # greedy
    with pytest.raises(ParamError, match=r"^variants\.t\.decoding\.rerank_neighbours: must be >= 0"):
        build_variant("t", {**grid, "decoding": {"strategy": "beam", "rerank_neighbours": -1}})
    with pytest.raises(ParamError, match=r"^variants\.t\.decoding\.rerank_weight: must be in"):
        build_variant("t", {**grid, "decoding": {**beam, "rerank_weight": -1.0}})


def test_the_cross_entropy_steps_do_not_depend_on_scst_or_reranking():
    from vlbench.stages.train import cross_entropy_params

    base = {"model": "grid_transformer", "optim": {"lr": 1e-3}, "decoding": {"strategy": "beam", "beam_size": 5}}
    reranked = {**base, "decoding": {**base["decoding"], "rerank_neighbours": 5, "rerank_weight": 2.0},
                "scst": {"steps": 10}}
    assert cross_entropy_params(reranked) == cross_entropy_params(base) == base
    assert cross_entropy_params({**base, "decoding": {"strategy": "beam", "beam_size": 3}}) != cross_entropy_params(base)
    assert cross_entropy_params({**base, "optim": {"lr": 1e-4}}) != cross_entropy_params(base)
