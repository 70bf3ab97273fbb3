"""Loss, accuracy and calibration accumulated on the device: adding a batch never waits
for the GPU; ``result()`` reads the sums once.

Calibration (of the predictive distribution ``p`` a batch is given with, the mean of the
L sampled networks' softmaxes, or a single network's softmax):
- NLL: the mean over images of -log p[label];
- Brier: the mean over images of the squared error over all classes,
  sum_c (p_c - [c = label])^2;
- ECE (percent): 15 equal-width bins of the top-1 confidence max_c p_c, each bin's
  |mean confidence - accuracy| weighted by its share of the images (the accuracy of the
  class p ranks first). Bins are [0, 1/15), [1/15, 2/15), ..., [14/15, 1], as
  torchmetrics' ``CalibrationError`` bins them.
The accuracy reported beside them is the released code's, from the averaged logits.
"""
import torch

ECE_BINS = 15


class Accumulator:
    def __init__(self, device):
        # [sum of per-image loss, top-1 hits, top-5 hits, images, sum of -log p[label],
        #  sum of Brier errors, images with probabilities]
        self.sums = torch.zeros(7 + 3 * ECE_BINS, dtype=torch.float64, device=device)
        self.boundaries = torch.linspace(0, 1, ECE_BINS + 1, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor = None):
        """``loss``: the batch's mean loss; ``logits``: (N, classes); ``labels``: (N,);
        ``log_probs``: (N, classes), the log of the predictive distribution, if any."""
        n = labels.numel()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels.view(-1, 1))
        self.sums[:3] += torch.stack([loss.detach().double() * n, hits[:, 0].sum().double(),
                                      hits.any(1).sum().double()])
        self.sums[3] += n  # a scalar argument, not a copy to the device
        if log_probs is None:
            return
        log_probs = log_probs.double()
        probs = log_probs.exp()
        onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
        confidence, predicted = probs.max(1)
        self.sums[4:6] += torch.stack([-log_probs.gather(1, labels.view(-1, 1)).sum(), ((probs - onehot) ** 2).sum()])
        self.sums[6] += n
        bins = (torch.bucketize(confidence.float(), self.boundaries, right=True) - 1).clamp(0, ECE_BINS - 1)
        per_bin = self.sums[7:].view(3, ECE_BINS)
        per_bin[0].index_add_(0, bins, torch.ones_like(confidence))
        per_bin[1].index_add_(0, bins, confidence)
        per_bin[2].index_add_(0, bins, predicted.eq(labels).double())

    def result(self, total=None) -> dict:
        """Loss, accuracies and, where probabilities were given, NLL, ECE (percent) and
        Brier; ``total`` first sums the counts over the processes that shared the work
        (each with its own shard)."""
        if total is not None:
            total(self.sums)
        values = self.sums.tolist()
        loss, top1, top5, n, nll, brier, with_probs = values[:7]
        n = max(n, 1.0)
        result = {"loss": loss / n, "prec1": 100.0 * top1 / n, "prec5": 100.0 * top5 / n}
        if with_probs:
            confidence, correct = values[7 + ECE_BINS:7 + 2 * ECE_BINS], values[7 + 2 * ECE_BINS:]
            ece = sum(abs(c - a) for c, a in zip(confidence, correct)) / with_probs
            result.update(nll=nll / with_probs, ece=100.0 * ece, brier=brier / with_probs)
        return result
