"""The weighting network's fast scoring path against its definition (weighter.py)."""
import pytest
import torch

from weighter import Weighter, score


@pytest.mark.parametrize("dim,kernel,n_conv,T", [(16, 7, 1, 40), (8, 3, 2, 25), (12, 7, 1, 4)])
def test_forward_by_lookup_equals_the_convolution(dim, kernel, n_conv, T):
    # s(x; α) by table lookups (P_j = E W_jᵀ) must equal embed → causal conv1d → pool, for any
    # weights (not just the init), with padding bytes (0) inside and at the end, and for sequences
    # shorter than the kernel (T = 4 < 7: every position sees the causal zero padding)
    torch.manual_seed(0)
    w = Weighter(dim=dim, kernel=kernel, n_conv=n_conv).double()
    for prm in w.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    x = torch.randint(0, 256, (6, T), dtype=torch.uint8)
    x[0, T // 2:] = 0                                      # a padded tail
    x[1, 1] = 0                                            # a 0 byte inside
    with torch.no_grad():
        expected = w(x)                                    # (6,) the definition
    got = w.forward_by_lookup(x)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-10)
    assert not got.requires_grad


def test_score_in_chunks_equals_forward():
    torch.manual_seed(1)
    w = Weighter(dim=8)
    x = torch.randint(0, 256, (11, 30), dtype=torch.uint8)
    with torch.no_grad():
        expected = w(x)
    assert torch.allclose(score(w, x, chunk=4), expected, atol=1e-5)
