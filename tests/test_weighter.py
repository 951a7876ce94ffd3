"""The weighting network's fast scoring path against its definition (weighter.py)."""
import math

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


def test_lookup_tables_passed_in_give_the_same_numbers():
    # score builds the tables P_j once and passes them to every chunk: the same scores, bit for bit,
    # as forward_by_lookup building its own
    torch.manual_seed(2)
    w = Weighter(dim=8, kernel=5, n_conv=2)
    x = torch.randint(0, 256, (9, 20), dtype=torch.uint8)
    tables = w.lookup_tables()
    assert tables.shape == (5 * 257, 8) and not tables.requires_grad
    assert torch.equal(tables.view(5, 257, 8)[:, 256], torch.zeros(5, 8))     # the padding row
    assert torch.equal(w.forward_by_lookup(x, tables), w.forward_by_lookup(x))
    expected = torch.cat([w.forward_by_lookup(x[i:i + 4]) for i in range(0, 9, 4)])
    assert torch.equal(score(w, x, chunk=4), expected)


def test_the_bias_row_gives_the_same_scores():
    # score on CUDA sums the convolution's bias in the lookup's bag (one more table row) instead of
    # adding it after: the same s(x; α) up to the summation order (checked here on the CPU, in float64)
    torch.manual_seed(5)
    w = Weighter(dim=12, kernel=7).double()
    for prm in w.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    x = torch.randint(0, 256, (7, 30), dtype=torch.uint8)
    x[0, 10:] = 0
    tables = w.lookup_tables(bias_row=True)
    assert tables.shape == (7 * 257 + 1, 12) and torch.equal(tables[-1], w.convs[0].bias.detach())
    with torch.no_grad():
        expected = w(x)
    assert torch.allclose(w.forward_by_lookup(x, tables), expected, atol=1e-10, rtol=1e-10)
    no_bias = tables.clone()
    no_bias[-1] = 0
    assert not torch.allclose(w.forward_by_lookup(x, no_bias), expected)       # the bias row is summed


def test_score_default_chunk_on_cpu_holds_2_to_the_20_activations(monkeypatch):
    # CPU: rows of ~2^20 (T, dim) activations, as before (an accelerator takes ~2^26)
    torch.manual_seed(3)
    w = Weighter(dim=8)
    x = torch.randint(0, 256, (300, 512), dtype=torch.uint8)        # chunk = 2^20 / (512·8) = 256
    expected = score(w, x, chunk=256)
    sizes, tables_seen = [], set()
    lookup = w.forward_by_lookup

    def spy(xc, tables=None):
        sizes.append(len(xc))
        tables_seen.add(id(tables))
        return lookup(xc, tables)
    monkeypatch.setattr(w, "forward_by_lookup", spy)
    assert torch.equal(score(w, x), expected)
    assert sizes == [256, 44]
    assert len(tables_seen) == 1 and id(None) not in tables_seen           # one set of tables, passed in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_score_on_cuda_matches_cpu():
    torch.manual_seed(4)
    w = Weighter(dim=16)
    x = torch.randint(0, 256, (3000, 64), dtype=torch.uint8)
    on_cpu = score(w, x)
    on_cuda = score(w.cuda(), x.cuda())
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), on_cpu, atol=1e-5)


def test_reference_init_follows_the_authors_rule():
    """--weighter_init=reference (the authors' code, Flax): each convolution Xavier-uniform, U(±a) with
    a = √(6 / (fan_in + fan_out)), fan = kernel · channels, so std a/√3; the head LeCun-normal (std √(1/fan_in),
    truncated at ±2 / 0.8796 of it); every bias zero; the embedding N(0, 1). Stds within ~5 standard errors."""
    dim, kernel = 64, 7
    torch.manual_seed(0)
    w = Weighter(dim=dim, kernel=kernel, init="reference")
    conv = w.convs[0].weight                                           # (dim, dim, kernel): 28672 draws
    a = math.sqrt(6 / (kernel * dim + kernel * dim))
    assert conv.abs().max() <= a and conv.abs().max() > 0.99 * a
    # the std of U(±a) is a/√3; the standard error of a sample std is about std/√(2n)
    assert abs(conv.std().item() / (a / math.sqrt(3)) - 1) < 5 / math.sqrt(2 * conv.numel())
    # the head: 64 weights per network, pooled over 100 draws (6400)
    heads = []
    for seed in range(100):
        torch.manual_seed(seed)
        heads.append(Weighter(dim=dim, kernel=kernel, init="reference").head.weight.flatten())
    head = torch.cat(heads)
    sigma = math.sqrt(1 / dim)
    # the truncated normal's kurtosis is < 3: its sample std's standard error is below std/√(2n)
    assert abs(head.std().item() / sigma - 1) < 5 / math.sqrt(2 * head.numel())
    assert head.abs().max() <= 2 * sigma / 0.87962566103423978
    assert abs(head.mean().item()) < 5 * sigma / math.sqrt(head.numel())
    assert not w.convs[0].bias.any() and not w.head.bias.any()
    assert abs(w.embed.weight.std().item() - 1) < 5 / math.sqrt(2 * w.embed.weight.numel())


def test_default_init_is_unchanged():
    """init="default" draws exactly what Weighter always drew (the runs' numbers stay bit for bit)."""
    torch.manual_seed(3)
    a = Weighter(dim=8, kernel=3).state_dict()
    torch.manual_seed(3)
    b = Weighter(dim=8, kernel=3, init="default").state_dict()
    torch.manual_seed(3)
    c = Weighter(dim=8, kernel=3, init="reference").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["embed.weight"], c["embed.weight"]) and not torch.equal(a["head.weight"], c["head.weight"])
