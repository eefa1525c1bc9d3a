"""Weighted k-NN on hand-made toy sets."""

import math

import pytest
import torch

from dino_model.knn import knn_classify
from dino_model.koleo import koleo_loss


def test_knn_on_separable_clusters():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    out = knn_classify(bank, labels, query, torch.tensor([0, 1]), ks=[1, 2], temperature=0.07)
    assert out[1] == (100.0, 100.0)
    assert out[2][0] == 100.0


def test_knn_weighting_by_similarity():
    """k=3: two far neighbours of class 1 vs one very close neighbour of class 0. With
    exp(s/T) weighting and a small T the close one wins; with a large T the majority wins."""
    bank = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    sharp = knn_classify(bank, labels, query, torch.tensor([0]), ks=[3], temperature=0.07)
    flat = knn_classify(bank, labels, query, torch.tensor([0]), ks=[3], temperature=100.0)
    assert sharp[3][0] == 100.0
    assert flat[3][0] == 0.0
    assert flat[3][1] == 100.0  # still in the top-5


def test_knn_top1_counts_and_k_capped_at_bank_size():
    torch.manual_seed(0)
    bank = torch.randn(10, 4)
    labels = torch.arange(10) % 3
    out = knn_classify(bank, labels, bank[:4], torch.tensor([0, 2, 2, 0]), ks=[1, 200])
    # nearest neighbour of a bank point is itself: labels 0,1,2,0 vs targets 0,2,2,0 -> 3 of 4
    assert out[1][0] == pytest.approx(75.0)
    assert 200 in out
    with pytest.raises(ValueError):
        knn_classify(bank[:0], labels[:0], bank, labels)


def test_koleo_prefers_spread_features():
    tight = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.98, 0.02]])
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    assert float(koleo_loss(tight)) > float(koleo_loss(spread))
    assert float(koleo_loss(spread)) == pytest.approx(-math.log(math.sqrt(3)), rel=1e-3)


def test_bank_fed_in_chunks_gives_the_same_votes_as_the_whole_bank():
    from dino_model.knn import NeighbourVotes, knn_classify

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g)
    bank_y = torch.randint(0, 5, (700,), generator=g)
    bank = centers[bank_y] + 0.8 * torch.randn(700, 16, generator=g)
    val_y = torch.randint(0, 5, (90,), generator=g)
    val = centers[val_y] + 0.8 * torch.randn(90, 16, generator=g)
    whole = knn_classify(bank, bank_y, val, val_y, ks=(1, 10, 200), temperature=0.07)
    votes = NeighbourVotes(val, k_max=200)
    for start in range(0, 700, 97):  # uneven chunks, as Ray Data batches arrive
        votes.add(bank[start : start + 97], bank_y[start : start + 97], chunk=32)
    assert votes.bank_size == 700 and votes.sims.shape == (90, 200)  # memory: queries x k_max
    assert votes.classify(val_y, ks=(1, 10, 200), temperature=0.07, num_classes=5) == whole
    assert whole[10][0] > 60  # the blobs are separable: the vote is not noise


def _angles(degrees) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def test_top5_is_the_five_best_voted_classes_of_many():
    """Seven classes, one bank point each, at 0, 10, ..., 60 degrees from the query: the votes
    rank the classes by angle. A query of the 5th-ranked class is a top-5 hit, of the 6th not."""
    bank = _angles([0, 10, 20, 30, 40, 50, 60])
    labels = torch.arange(7)
    query = _angles([0, 0])
    out = knn_classify(bank, labels, query, torch.tensor([4, 5]), ks=[7], temperature=0.07)
    assert out[7] == (0.0, 50.0)  # neither is top-1; class 4 is in the top-5, class 5 is not


def _reference_top5(bank, bank_y, val, val_y, k, temperature, n_classes) -> tuple[float, float]:
    """DINO's eval_knn.knn_classifier, per query: cosine top-k, exp(s/T) votes, 5 best classes."""
    sims = torch.nn.functional.normalize(val, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top1 = top5 = 0
    for i in range(len(val)):
        s, idx = sims[i].topk(k)
        votes = torch.zeros(n_classes).index_add_(0, bank_y[idx], (s / temperature).exp())
        ranked = votes.argsort(descending=True).tolist()
        top1 += ranked[0] == int(val_y[i])
        top5 += int(val_y[i]) in ranked[:5]
    return 100.0 * top1 / len(val), 100.0 * top5 / len(val)


def test_top5_matches_a_direct_computation_on_twelve_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(12, 8, generator=g)
    bank_y = torch.randint(0, 12, (300,), generator=g)
    bank = centers[bank_y] + 1.5 * torch.randn(300, 8, generator=g)
    val_y = torch.randint(0, 12, (80,), generator=g)
    val = centers[val_y] + 1.5 * torch.randn(80, 8, generator=g)
    bank, val = (
        torch.nn.functional.normalize(bank, dim=1),
        torch.nn.functional.normalize(val, dim=1),
    )
    out = knn_classify(bank, bank_y, val, val_y, ks=[5, 20], temperature=0.07, num_classes=12)
    for k in (5, 20):
        top1, top5 = _reference_top5(bank, bank_y, val, val_y, k, 0.07, 12)
        assert out[k] == pytest.approx((top1, top5))
        assert top1 < top5 < 100.0  # the top-5 figure is informative here, not always 100%
