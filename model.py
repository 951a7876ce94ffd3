"""
The main model θ: a byte-level, decoder-only, pre-LayerNorm transformer.

Paper, Table 1 (language model): 12 layers, 8 heads, residual dimension 256, feed-forward 1024,
~9.5M parameters. Reference code: ReLU MLP, dropout 0.1, sinusoidal positions, tied output
embedding, vocabulary = the 256 byte values with byte 0 as padding.

The one thing this file does that nanoGPT does not: SOBA's Hessian-vector product differentiates
*through* a gradient (a double backward). PyTorch's fused scaled-dot-product attention kernels have
no double backward (nor a forward-mode derivative), so that step runs attention on the "math" path
(an explicit softmax(QKᵀ/√d)V built from differentiable ops). Everything else (the plain training
step, DDS and Anograd, which need only first-order passes, evaluation) keeps the fast fused kernel.
`second_order()` below switches the path.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256      # residual dimension d
    n_hidden: int = 1024   # feed-forward latent dimension
    seq_len: int = 256     # maximum length (positions)
    dropout: float = 0.1


# Presets. `paper`: Table 1 / Table 9 "Large" (9.53M parameters). `small`: Table 9 "Small" (0.82M),
# the model whose weighter the paper transfers to the large one (section 6.4). `cpu`: what a 2-core
# laptop trains in minutes.
PRESETS = {
    "paper": dict(n_layer=12, n_head=8, n_embd=256, n_hidden=1024),
    "small": dict(n_layer=4, n_head=4, n_embd=128, n_hidden=512),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, n_hidden=512),
}


@contextlib.contextmanager
def second_order():
    """Run attention on the math path, which supports double backward and forward-mode AD.

    Use it around any computation whose graph is differentiated twice (create_graph=True) or
    through which a Jacobian-vector product is taken."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def sinusoidal_positions(seq_len, d):
    # Vaswani et al. (2017): PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d))
    pos = torch.arange(seq_len, dtype=torch.float32)[:, None]                # (T, 1)
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2).float() / d)  # (d/2,)
    pe = torch.zeros(seq_len, d)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe                                                                # (T, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q kᵀ / √hs) v with a causal mask; fused kernel unless inside second_order()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_hidden), nn.ReLU(),
                                 nn.Linear(cfg.n_hidden, cfg.n_embd), nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class ByteLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(256, cfg.n_embd)   # byte embedding, tied with the output layer
        self.register_buffer("wpe", sinusoidal_positions(cfg.seq_len, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        # the output layer shares the byte embedding (tied, as in nanoGPT). It is a module of its own
        # so that every parameter enters the model through a module (bilevel.per_example_dot hooks
        # them); skip_init: no random init (and no RNG draw), its weight is replaced right away.
        self.head = nn.utils.skip_init(nn.Linear, cfg.n_embd, 256, bias=False)
        self.head.weight = self.wte.weight
        self.register_load_state_dict_pre_hook(self._tie_on_load)

    @staticmethod
    def _tie_on_load(module, state_dict, prefix, *args):
        # a θ dict (named_parameters lists a tied tensor once) or an older checkpoint has no head.weight
        if prefix + "wte.weight" in state_dict:
            state_dict.setdefault(prefix + "head.weight", state_dict[prefix + "wte.weight"])

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def logits(self, x):
        """x: (B, T) uint8 bytes → logits (B, T, 256) predicting x itself, one byte ahead.

        The input is x shifted right by one with byte 0 in front (0 doubles as beginning-of-text),
        so every byte of the example is predicted, the first one included."""
        x = x.long()
        inp = F.pad(x[:, :-1], (1, 0), value=0)                   # (B, T)
        h = self.drop(self.wte(inp) + self.wpe[: x.shape[1]])     # (B, T, d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))                            # (B, T, 256) = ln_f(h) Eᵀ, tied

    def forward(self, x):
        """ℓ(x; θ) for each example: mean nats per predicted byte, padding (byte 0) ignored. (B,)

        The forward pass returns per-example losses (not logits) so that the bilevel updates can
        write ℓ(x; θ') as `functional_call(model, θ', (x,))` for any parameters θ'."""
        logits = self.logits(x)                                                     # (B, T, 256)
        # at least float32 (bf16 under autocast is upcast), but a float64 model stays float64
        nll = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), x.long().flatten(),
                              reduction="none").view(x.shape)                  # (B, T)
        mask = (x != 0).float()                                                # (B, T)
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)                # (B,)

    per_example_loss = forward


def build_model(preset=None, **overrides):
    """A ByteLM from a preset name ('paper', 'small', 'cpu') and/or explicit ModelConfig fields."""
    kw = dict(PRESETS[preset]) if preset else {}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ByteLM(ModelConfig(**kw))
