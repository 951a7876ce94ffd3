"""
The weighting network w(x; α) and the filter of Algorithm 1.

Section 4 of the paper: a small network, much cheaper than the main model, that scores every
generic example; over a batch B the scores become a distribution,

    w(x; α) = exp(s(x; α)) / Σ_{x'∈B} exp(s(x'; α))          (softmax over the batch)

Architecture (paper Table 1: "convolutional network ... followed by mean pooling, latent dimension
128"; reference code: byte embedding 256→128, one causal Conv1D of kernel 7 with ReLU, a Dense(1)
per-byte score, masked mean over non-pad bytes, ~150k parameters). We follow the reference code
(one convolution; `n_conv` adds more) and let the latent width be set (`dim`): a narrower weighter
keeps the scoring of a big batch cheap on a CPU.

The filter (section 4.2, Algorithm 1, Table 7) turns w over the big batch B_generic^big into the
small batch the main model trains on:
  - `importance`:          b draws with replacement from w (unbiased for Σ w ℓ);
  - `without_replacement`: b distinct rows of B drawn ∝ w, by the Gumbel top-k trick
                           (top_k(log w + Gumbel noise)); the paper's default;
  - `top`:                 the b highest weights, deterministic.
"""

import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError, atomic_write, read_checkpoint


class Weighter(nn.Module):
    """s(x; α): one real score per byte sequence. Also the domain classifier's network (logit head)."""

    def __init__(self, dim=128, kernel=7, n_conv=1, init="default"):
        super().__init__()
        self.kernel = kernel
        self.embed = nn.Embedding(256, dim)
        self.convs = nn.ModuleList([nn.Conv1d(dim, dim, kernel) for _ in range(n_conv)])
        self.head = nn.Linear(dim, 1)
        # Anograd's head, w = softplus(a)·softmax(s) (reference code); unused by the other methods
        self.a = nn.Parameter(torch.zeros(()))
        # "default": PyTorch's initialisation; "reference": the authors' code's (drawn after PyTorch's)
        if init == "reference":
            self.reference_init()

    @torch.no_grad()
    def reference_init(self):
        """The authors' code's initialisation (Flax): the embedding N(0, 1), as PyTorch's already is;
        each convolution Xavier-uniform, the head LeCun-normal, every bias zero. (PyTorch's default:
        U(±1/√fan_in) for the weights and the biases of the convolutions and the head.)"""
        for conv in self.convs:
            # Xavier: U(±√(6 / (fan_in + fan_out))), fan_in = kernel·in, fan_out = kernel·out channels
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        # LeCun normal as Flax draws it: N(0, σ²) truncated at ±2σ, σ = √(1/fan_in) / 0.8796 (0.8796: the
        # std of a unit normal truncated at ±2), so that the weights' std is √(1/fan_in)
        sigma = math.sqrt(1.0 / self.head.in_features) / 0.87962566103423978
        nn.init.trunc_normal_(self.head.weight, std=sigma, a=-2 * sigma, b=2 * sigma)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        """x: (B, T) uint8 → s(x; α): (B,) one score per sequence."""
        h = self.embed(x.long()).transpose(1, 2)              # (B, dim, T)
        for conv in self.convs:
            h = F.relu(conv(F.pad(h, (self.kernel - 1, 0))))  # causal: left-pad by kernel-1, (B, dim, T)
        return self.pool(h, x)

    def pool(self, h, x):
        """h: (B, dim, T) features, x: (B, T) bytes → (B,) the masked mean of the per-byte scores."""
        per_byte = self.head(h.transpose(1, 2)).squeeze(-1)   # (B, T) a score per byte
        mask = (x != 0).float()                               # (B, T) non-pad bytes
        return (per_byte * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B,) masked mean

    @torch.no_grad()
    def lookup_tables(self, bias_row=False):
        """The tables P_j = E W_jᵀ of `forward_by_lookup`, stacked: (k·257, dim), no graph.

        P[j, v] = W_j E[v] for the byte v, and a zero row 256 for the positions before the sequence
        (the causal left padding: zero vectors in forward). Row 257·j + v holds P_j[v]. Built once
        per call of `score` (256·k·dim² multiply-adds), whatever the number of chunks. bias_row: one
        more row, the convolution's bias c, which every bag then sums too (`score` on CUDA: one pass
        over the (N, T, dim) activations fewer; another summation order, so not on the CPU)."""
        # P[j, v] = W_j E[v]
        P = torch.einsum("vi,oij->jvo", self.embed.weight, self.convs[0].weight)   # (k, 256, dim)
        P = F.pad(P, (0, 0, 0, 1)).flatten(0, 1)                                    # (k·257, dim)
        if bias_row:
            P = torch.cat([P, self.convs[0].bias[None]])                            # (k·257 + 1, dim)
        return P

    @torch.no_grad()
    def forward_by_lookup(self, x, tables=None):
        """The same s(x; α) as forward, computed faster (no graph): what `score` runs on a big batch.
        tables: `lookup_tables()`, built here when None (pass them to reuse them across chunks).

        The first convolution reads embedded bytes, and a convolution is linear, so with the
        kernel's taps W_j (dim × dim, j = 0 … k−1) and the embedding table E (256 × dim):
            conv(embed(x))_t = c + Σ_j W_j E[x_{t−k+1+j}] = c + Σ_j P_j[x_{t−k+1+j}],   P_j = E W_jᵀ
        k table lookups and adds per byte instead of k·dim² multiply-adds. The tables P_j
        (256 × dim each) cost 256·k·dim² once; F.embedding_bag sums the k rows without
        materialising them. The causal left padding (zero vectors in forward) looks up a zero row.
        tests/test_weighter.py checks it against forward."""
        k, conv = self.kernel, self.convs[0]
        P = self.lookup_tables() if tables is None else tables                      # (k·257, dim)
        x_pad = F.pad(x.int(), (k - 1, 0), value=256)                               # (B, T+k−1)
        # row of P for tap j at position t: 257·j + x_pad[t + j]
        taps = 257 * torch.arange(k, device=x.device, dtype=torch.int32)            # (k,)
        rows = x_pad.unfold(1, k, 1) + taps                                         # (B, T, k)
        bias_row = len(P) > 257 * k       # (CUDA) one more row in every bag: c summed with the taps
        if bias_row:
            rows = F.pad(rows, (0, 1), value=257 * k)                               # (B, T, k + 1)
        # conv(embed(x))_t = c + Σ_j P_j[x_{t−k+1+j}]
        h = F.embedding_bag(rows.flatten(0, 1), P, mode="sum")                     # (B·T, dim)
        if not bias_row:
            h = h + conv.bias
        h = h.relu_().view(*x.shape, -1).transpose(1, 2)                            # (B, dim, T)
        for conv in self.convs[1:]:
            h = F.relu(conv(F.pad(h, (k - 1, 0))))                                  # (B, dim, T)
        return self.pool(h, x)

    def weights(self, x, ranks=None):
        """w(x; α) over the batch x: softmax of the scores. (B,), sums to one (see batch_softmax)."""
        return batch_softmax(self(x), ranks)

    def anograd_weights(self, x, ranks=None):
        """Anograd's head (reference code): softplus(a)·softmax(s). Positive, scale learned."""
        return F.softplus(self.a) * self.weights(x, ranks)


class LossWeighter(nn.Module):
    """Meta-Weight-Net (Shu et al. 2019): the weight is an MLP of the example's loss only,
    w(x; α) = mlp(ℓ(x; θ); α), 100 hidden units; normalised over the batch like `Weighter`."""

    def __init__(self, hidden=100):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, losses):
        """losses: (B,) per-example losses ℓ(x; θ), treated as data (detached), read in the MLP's own
        precision → scores (B,). Autocast off: bf16 would round ℓ ≈ 2 to steps of 0.016."""
        with torch.autocast(losses.device.type, enabled=False):
            return self.mlp(losses.detach()[:, None].to(self.mlp[0].weight.dtype)).squeeze(-1)

    def weights(self, losses, ranks=None):
        return batch_softmax(self(losses), ranks)


def batch_softmax(s, ranks=None):
    """w = softmax of the scores s over the batch: (n,) → (n,). Under torchrun (ranks: bilevel.Ranks) s is
    this rank's rows of a batch and the softmax is over the WHOLE batch: the rows gathered (with their
    graph), normalised, this rank's returned."""
    if ranks is None:
        return torch.softmax(s, dim=0)
    return ranks.mine(torch.softmax(ranks.rows(s), dim=0))


@torch.no_grad()
def score(weighter, x, chunk=None):
    """s(x; α) for a big batch, without a graph, in chunks that bound memory. x: (N, T) → (N,)
    float32. Runs `Weighter.forward_by_lookup` with the tables P_j built once for all chunks (the
    convolution itself, `Weighter.forward`, is the differentiable path training uses).

    Default chunk, by x's device. CPU: rows holding ~2^20 (T, dim) activations (~4 MB a tensor):
    256 rows at the `cpu` preset, 32 at the paper's size. On our CPU they are also faster than one
    big chunk (they stay in cache): 2 threads, |B| = 4096 at the `cpu` preset 65 against 77 ms, the
    paper's weighter on |B| = 2048 128–140 against 296–307 ms (README, "Step cost"). An accelerator
    (CUDA): ~2^26 activations, 2048 rows at the paper's size (T = 256, dim = 128): few launches."""
    if chunk is None:
        budget = 2 ** 20 if torch.device(x.device).type == "cpu" else 2 ** 26   # activations a chunk
        chunk = max(1, budget // (x.shape[1] * weighter.embed.embedding_dim))
    tables = weighter.lookup_tables(bias_row=torch.device(x.device).type == "cuda")   # once
    return torch.cat([weighter.forward_by_lookup(x[i:i + chunk], tables).float()
                      for i in range(0, len(x), chunk)])                        # (N,)


def filter_batch(s, b, how, generator=None):
    """filter(B, α, b) of Algorithm 1: indices of the b examples (of |B| = len(s)) to train on.

    s: (|B|,) scores on any device, so that log w = s − logsumexp(s); returns (b,) long indices
    into B, on s.device. generator: a CPU torch.Generator (or None: the global CPU generator).
    Every random draw is made on the CPU and then moved to s.device (a CPU generator cannot drive
    a CUDA draw): a seed consumes the generator the same way, and given the same scores selects the
    same examples, whatever the device of s."""
    if how == "importance":
        # b i.i.d. draws from w (with replacement): unbiased for Σ_B w ℓ, but repeats examples
        w = torch.softmax(s.cpu(), 0)                              # (|B|,) w, computed on the CPU
        return to_device(torch.multinomial(w, b, replacement=True, generator=generator), s.device)
    if how == "without_replacement":
        # Gumbel top-k: top_k(log w + G), G = −log(−log U), U ~ Uniform(0, 1), is a draw of b
        # distinct rows of B, each next one ∝ w among those not yet drawn (B itself is drawn with
        # replacement, so two rows may hold the same example). U and G: float32, CPU
        u = torch.rand(s.shape, generator=generator).clamp_(1e-20, 1.0)       # (|B|,) U
        # −G = log(−log U), computed on the CPU, then moved to s.device
        minus_g = to_device(torch.log(-torch.log(u)), s.device)                 # (|B|,)
        # log w + G = s + G − logsumexp(s): the constant does not change the top-k
        return torch.topk(s - minus_g, b).indices
    if how == "top":
        return torch.topk(s, b).indices
    raise ValueError(f"unknown filter {how!r}")


def to_device(t, device):
    """A tensor drawn on the CPU, moved to device without a host stall: on CUDA a pinned copy, sent with
    non_blocking (the host allocator keeps each pinned buffer until its copy is done, so the next draw
    never overwrites one in flight); elsewhere `.to(device)`."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def effective_sample_size(w):
    """ESS = (Σ w)² / Σ w² of a weight vector: |B| for uniform weights, 1 for a one-hot."""
    return (w.sum() ** 2 / (w ** 2).sum()).detach()         # a 0-dim tensor: no host synchronisation


# ---------------------------------------------------------------------------------------------------
# weighting networks saved by a run, for the section-6 experiments (train.py's frozen and shuffled)

def load_weighter(path, flag="--weighter_ckpt"):
    """The text-scoring α a run saved (a run dir, its ckpt.pt or a weighters/step_N.pt snapshot) →
    (Weighter in eval mode, checkpoint dict). Its size is read from that run's config."""
    st = read_checkpoint(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path, flag)
    sd, c = st.get("weighter"), st.get("config", {})
    if sd is None or "embed.weight" not in sd:
        raise DataError(f"{flag}: {path} has no weighting network that scores text "
                        f"(method {c.get('method')!r})")
    n_conv = sum(1 for k in sd if k.startswith("convs.") and k.endswith(".weight"))
    w = Weighter(c.get("weighter_dim", 128), c.get("weighter_kernel", 7), n_conv)
    try:
        w.load_state_dict(sd)
    except RuntimeError:
        raise DataError(f"{flag}: {path}: its weighting network does not match its config") from None
    return w.requires_grad_(False).eval(), st


def save_snapshot(weighter, step, cfg):
    """α_t to out_dir/weighters/step_t.pt (a few 100 kB), with what load_weighter needs of the config,
    for `shuffled` replays (section 6.1). The training loop decides when one is due."""
    os.makedirs(os.path.join(cfg["out_dir"], "weighters"), exist_ok=True)
    snap = {"step": step, "weighter": weighter.state_dict(),
            "config": {k: cfg[k] for k in ("method", "weighter_dim", "weighter_kernel", "seq_len")}}
    # atomic: a snapshot is whole or absent
    atomic_write(os.path.join(cfg["out_dir"], "weighters", f"step_{step}.pt"), lambda p: torch.save(snap, p))


class Replay:
    """Section 6.1's shuffled weighting: the α_t a run saved, replayed in a random order σ (by seed).
    The run's n_steps are cut into K equal segments, one per snapshot; segment j uses α_{t_σ(j)}."""

    def __init__(self, path, seed):
        d = os.path.join(path, "weighters") if os.path.isdir(os.path.join(path, "weighters")) else path
        files = [f for f in os.listdir(d) if re.fullmatch(r"step_\d+\.pt", f)] if os.path.isdir(d) else []
        if not files:
            raise DataError(f"--weighter_trajectory: no weighters/step_N.pt snapshots in {path}")
        # the snapshots sorted by their step t
        self.files = [os.path.join(d, f) for f in sorted(files, key=lambda f: int(f[5:-3]))]
        self.sigma = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(seed))   # σ
        self.segment = None          # the segment whose α is loaded: none yet (also after a resume)

    def load(self, weighter, step, n_steps):
        """Load α_{t_σ(j)} into weighter when step enters segment j of K equal segments of n_steps."""
        K = len(self.files)
        j = min(K - 1, step * K // n_steps)
        if j != self.segment:
            st = torch.load(self.files[int(self.sigma[j])], map_location="cpu", weights_only=True)
            weighter.load_state_dict(st["weighter"])
            self.segment = j
