import math

import torch

from plugins.losses.lm import LMCrossEntropy, shifted_token_loss


def test_shifted_loss_predicts_the_next_token_and_skips_ignored_labels():
    # vocab 3; logits at position t predict labels[t+1]
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    labels = torch.tensor([[7, 0, -100]])  # label of position 0 is never predicted; the last one is ignored
    loss, count = shifted_token_loss(logits, labels)
    assert count.item() == 1
    assert abs(loss.item() - math.log(3)) < 1e-6  # position 0 predicts labels[1] = 0 from uniform logits


def test_lm_cross_entropy_plugin_reports_token_count():
    class Out:
        logits = torch.zeros(2, 4, 5)

    batch = {"labels": torch.tensor([[1, 2, 3, 4], [1, 2, -100, -100]])}
    loss, metrics = LMCrossEntropy()(Out(), batch)
    assert metrics["tokens"].item() == 4
    assert torch.isclose(loss, torch.tensor(math.log(5)))
