"""Loss and accuracy accumulated on the device: adding a batch never waits for the
GPU; ``result()`` reads the sums once."""
import torch


class Accumulator:
    def __init__(self, device):
        # [sum of per-image loss, top-1 hits, top-5 hits, images]
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
        """``loss``: the batch's mean loss; ``logits``: (N, classes); ``labels``: (N,)."""
        n = labels.numel()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels.view(-1, 1))
        self.sums[:3] += torch.stack([loss.detach().double() * n, hits[:, 0].sum().double(),
                                      hits.any(1).sum().double()])
        self.sums[3] += n

    def result(self, total=None) -> dict:
        """Loss and accuracies; ``total`` first sums the counts over the processes that
        shared the work (each with its own shard)."""
        if total is not None:
            total(self.sums)
        loss, top1, top5, n = self.sums.tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "prec1": 100.0 * top1 / n, "prec5": 100.0 * top5 / n}
