"""Telling the test set of a network's own dataset (in-distribution) from another
dataset's (out-of-distribution) by a per-image score where higher means "more like the
training data" (a confidence: the negative predictive entropy, the negative mutual
information, the maximum probability).

- AUROC (percent): the probability that an in-distribution image scores higher than an
  out-of-distribution one, ties counting half.
- FPR at 95% TPR (percent): at the highest threshold that keeps at least 95% of the
  in-distribution images (score >= threshold), the share of out-of-distribution images
  kept too.
"""
import math

import torch


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """AUROC in percent of the scores of in- and out-of-distribution images, exactly (by
    the mean rank of the in-distribution scores among all, ties given their mean rank)."""
    scores = torch.cat([inside, outside]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # ascending
    first = torch.cumsum(counts, 0) - counts + 1                   # the first rank of each distinct score
    ranks = (first + (counts - 1) / 2.0)[inverse].double()         # ties: their mean rank
    n_in, n_out = len(inside), len(outside)
    return 100.0 * (ranks[:n_in].sum().item() - n_in * (n_in + 1) / 2) / (n_in * n_out)


def fpr_at_tpr(inside: torch.Tensor, outside: torch.Tensor, tpr: float = 0.95) -> float:
    """The false-positive rate in percent at the highest threshold whose true-positive rate
    is at least ``tpr``."""
    ranked = inside.double().sort(descending=True).values
    threshold = ranked[math.ceil(tpr * len(ranked)) - 1]
    return 100.0 * (outside.double() >= threshold).double().mean().item()
