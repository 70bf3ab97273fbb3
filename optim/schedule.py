"""The per-iteration learning-rate schedule of the released code."""
import math


def learning_rate(iteration: int, base_lr: float, warmup_iters: int, total_iters: int,
                  decay: str = "cos") -> float:
    """Linear warm-up from 0 over ``warmup_iters`` (``lr * it / warm``), then cosine decay
    ``lr * (1 + cos(pi * (it - warm) / (total - warm))) / 2`` to 0 at ``total_iters``
    (``decay="cos"``), or the constant ``lr`` (``decay="constant"``)."""
    if iteration < warmup_iters:
        return base_lr * iteration / warmup_iters
    if decay == "constant":
        return base_lr
    progress = (iteration - warmup_iters) / max(1, total_iters - warmup_iters)
    return base_lr * (1 + math.cos(math.pi * progress)) / 2
