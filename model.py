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
`second_order()` below switches the path (`--hvp=finite_difference` avoids it: two first-order
gradients, on the fused kernels).

torch.compile: `compile_model(model)` compiles the forward in place (`nn.Module.compile`; the
parameters, state_dict keys and checkpoints stay those of the plain model). `second_order(model)`
also runs a compiled model uncompiled for its duration: the double backward and forward-mode
derivatives go through the eager graph, never the compiled one.

The model is built from a train.py config dict (the presets live in train.py only):
`ByteLM.from_config(cfg)`.

This file is the model only: devices, processes and checkpoints are train.py's.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256      # residual dimension d
    n_hidden: int = 1024   # feed-forward latent dimension
    seq_len: int = 256     # maximum length (positions)
    dropout: float = 0.1


# the train.py config keys that define the model (ModelConfig's fields)
CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "n_hidden", "seq_len", "dropout")


@contextlib.contextmanager
def uncompiled(*modules):
    """Run modules compiled by `compile_model` (nn.Module.compile) eagerly inside the block.

    nn.Module.__call__ runs `_compiled_call_impl` when it is set; this sets it to None on every
    given module and its submodules, and restores it on exit. A module never compiled is left as
    it is (a no-op)."""
    saved = [(m, m._compiled_call_impl) for mod in modules for m in mod.modules()
             if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl


@contextlib.contextmanager
def second_order(*models):
    """Run attention on the math path, which supports double backward and forward-mode AD, and run
    the given models uncompiled (see `uncompiled`; torch.compile's graphs are first-order).

    Use it around any computation whose graph is differentiated twice (create_graph=True) or
    through which a Jacobian-vector product is taken; pass the models that computation calls."""
    with sdpa_kernel(SDPBackend.MATH), uncompiled(*models):
        yield


def compile_model(model):
    """torch.compile the model's forward in place (nn.Module.compile) and return it. Parameters,
    buffers and state_dict keys are unchanged (the compiled call wraps the module, it is not a new
    module); compilation happens at the first call. `second_order(model)` runs it uncompiled."""
    model.compile()
    return model


# ----------------------------------------------------------------------------------------------
# the transformer

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

    @classmethod
    def from_config(cls, cfg):
        """The ByteLM of a train.py config dict (or any mapping holding CONFIG_KEYS; other keys are
        ignored): n_layer, n_head, n_embd, n_hidden, seq_len, dropout."""
        return cls(ModelConfig(**{k: cfg[k] for k in CONFIG_KEYS}))

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
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))         # (B, T, 256)
        nll = F.cross_entropy(logits.flatten(0, 1), x.long().flatten(),
                              reduction="none").view(x.shape)                  # (B, T)
        mask = (x != 0).float()                                                # (B, T)
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)                # (B,)

    per_example_loss = forward

    @torch.no_grad()
    def nats_per_byte(self, x_all, batch_size=256, autocast=contextlib.nullcontext, desc=None):
        """The evaluation metric: mean nats per byte over a set x_all (N, T), Σ nats / Σ non-pad
        bytes (bytes, not examples, weigh equally), in eval mode; autocast: the caller's precision."""
        was_training = self.training
        self.eval()
        nats = torch.zeros((), dtype=torch.float64, device=x_all.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=x_all.device)
        for i in tqdm(range(0, len(x_all), batch_size), desc=desc, leave=False, disable=None):
            x = x_all[i:i + batch_size]                                # (B, T)
            with autocast():
                losses = self(x).float()                               # (B,) nats per byte
            n = (x != 0).sum(1).float()                                # (B,) bytes
            # accumulated in float64 on the device: one synchronisation per evaluated set
            nats += (losses * n).sum()
            nbytes += n.sum()
        self.train(was_training)
        return (nats / nbytes).item()

