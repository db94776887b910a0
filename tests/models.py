"""The registry of ``test_any_model.py`` (like torch's ``common_optimizers.py``): small models written
for ordinary batches, and ``CASES``, every supported layer type and these models with their inputs.

None of the models knows about populations: ``x.view(x.size(0), -1)``, ``pos(torch.arange(T))``, a
class token used directly and RNN policies are exactly the code a population must run unchanged.
Shapes: ``B`` batch, ``T`` time/sequence, ``E`` embedding width; every case is small and float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CASES", "N", "ActorCritic", "CNN", "Case", "GRUPolicy", "LSTMPolicy", "MLP", "PatchClassifier",
    "TiedEmbeddingLM", "TransformerLM", "randn", "tokens",
]

N = 4  # the population the cases are written for: per-member inputs (N, ...), an MLP batch of N


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    """The classic small CNN: conv, BatchNorm2d, pooling, then ``x.view(x.size(0), -1)``."""

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (size // 2) ** 2, classes)

    def forward(self, x):  # (B, C, H, W) -> (B, classes)
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)  # (B, 4, H/2, W/2)
        return self.fc(x.view(x.size(0), -1))


class TransformerLM(nn.Module):
    """A causal language model: token + position embeddings (``pos(arange(T))``, batch-less)."""

    def __init__(self, vocab: int = 11, E: int = 16, T: int = 7, heads: int = 2, layers: int = 2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, E), nn.Embedding(T, E)
        layer = nn.TransformerEncoderLayer(E, heads, dim_feedforward=2 * E, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(E), nn.Linear(E, vocab)

    def forward(self, idx):  # (B, T) int -> (B, T, vocab)
        T = idx.size(1)
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, E) + (T, E)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device, dtype=h.dtype)
        h = self.encoder(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class PatchClassifier(nn.Module):
    """ViT-style: a class token and a positional table, plain ``nn.Parameter``s used directly."""

    def __init__(self, patch_dim: int = 6, T: int = 4, E: int = 8, classes: int = 3):
        super().__init__()
        self.proj = nn.Linear(patch_dim, E)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, E))
        self.pos = nn.Parameter(0.5 * torch.randn(1, T + 1, E))
        self.norm, self.head = nn.LayerNorm(E), nn.Linear(E, classes)

    def forward(self, patches):  # (B, T, patch_dim) -> (B, classes)
        h = self.proj(patches)  # (B, T, E)
        h = torch.cat([self.cls.expand(h.size(0), -1, -1), h], dim=1) + self.pos  # (B, T+1, E)
        return self.head(self.norm(h)[:, 0])


class GRUPolicy(nn.Module):
    def __init__(self, obs: int = 3, hidden: int = 8, actions: int = 2):
        super().__init__()
        self.gru, self.head = nn.GRU(obs, hidden, batch_first=True), nn.Linear(hidden, actions)

    def forward(self, obs):  # (B, T, obs) -> (B, actions), from the last step
        out, _ = self.gru(obs)
        return self.head(out[:, -1])


class LSTMPolicy(nn.Module):
    """One step of a recurrent policy: returns its action logits and the next state."""

    def __init__(self, obs: int = 3, hidden: int = 8, actions: int = 2):
        super().__init__()
        self.lstm, self.head = nn.LSTM(obs, hidden, batch_first=True), nn.Linear(hidden, actions)

    def forward(self, obs, state=None):  # (B, T, obs) -> (B, actions), ((1, B, H), (1, B, H))
        out, state = self.lstm(obs, state)
        return self.head(out[:, -1]), state


class TiedEmbeddingLM(nn.Module):
    """The output head shares the token embedding's weight (one parameter, two layers)."""

    def __init__(self, vocab: int = 10, E: int = 6):
        super().__init__()
        self.tok, self.norm = nn.Embedding(vocab, E), nn.LayerNorm(E)
        self.head = nn.Linear(E, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):  # (B, T) int -> (B, T, vocab)
        return self.head(self.norm(self.tok(idx)))


class ActorCritic(nn.Module):
    """A dict output with a non-tensor entry: ``{"logits": (B, A), "value": (B,), "actions": A}``."""

    def __init__(self, obs: int = 4, hidden: int = 8, actions: int = 3):
        super().__init__()
        self.trunk = nn.Linear(obs, hidden)
        self.pi, self.v = nn.Linear(hidden, actions), nn.Linear(hidden, 1)

    def forward(self, obs):  # (B, obs)
        h = torch.tanh(self.trunk(obs))
        return {"logits": self.pi(h), "value": self.v(h).squeeze(-1), "actions": self.pi.out_features}


# ------------------------------------------------------------------------------------ registry


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def tokens(*shape, vocab: int = 10) -> torch.Tensor:
    idx = torch.randint(0, vocab, shape)
    idx.view(-1)[:2] = 0  # so that an embedding's padding_idx 0 is read
    return idx


def call(*args, **kwargs) -> tuple[tuple, dict]:
    return args, kwargs


@dataclass(frozen=True)
class Case:
    """``model()`` builds the module, ``inputs()`` its ``(args, kwargs)``; ``shapes``: one member's
    output leaves; ``per_member``: ``args[0]`` has a leading dim ``N``, one row per member;
    ``train``: the mode the model runs in (BatchNorm: per-member batch statistics)."""

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    shapes: list = field(default_factory=list)
    per_member: bool = False
    train: bool = False


def _resnet18():
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def _mobilenet():
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=10)  # run in eval mode: its classifier's Dropout is off


def _conv2d(c_in=3, c_out=4, k=3, **kw):
    return lambda: nn.Conv2d(c_in, c_out, k, **kw)


LAYERS = [
    # ---- Linear
    Case("linear", lambda: nn.Linear(5, 3), lambda: call(randn(2, 5)), [(2, 3)]),
    Case("linear_no_bias", lambda: nn.Linear(5, 3, bias=False), lambda: call(randn(2, 5)), [(2, 3)]),
    Case("linear_3d", lambda: nn.Linear(5, 3), lambda: call(randn(2, 4, 5)), [(2, 4, 3)]),
    Case("linear_unbatched", lambda: nn.Linear(5, 3), lambda: call(randn(5)), [(3,)]),
    # ---- Conv
    Case("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: call(randn(2, 3, 8)), [(2, 4, 8)]),
    Case("conv1d_unbatched", lambda: nn.Conv1d(3, 4, 3), lambda: call(randn(3, 8)), [(4, 6)]),
    Case("conv2d_groups_stride_dilation", _conv2d(c_in=4, c_out=6, stride=2, dilation=2, groups=2),
         lambda: call(randn(2, 4, 9, 9)), [(2, 6, 3, 3)]),
    Case("conv2d_same_reflect", _conv2d(padding="same", padding_mode="reflect"),
         lambda: call(randn(2, 3, 6, 6)), [(2, 4, 6, 6)]),
    Case("conv2d_circular", _conv2d(k=(3, 2), padding=1, padding_mode="circular"),
         lambda: call(randn(2, 3, 6, 6)), [(2, 4, 6, 7)]),
    Case("conv2d_unbatched", _conv2d(), lambda: call(randn(3, 6, 6)), [(4, 4, 4)]),
    Case("conv2d_per_member", _conv2d(), lambda: call(randn(N, 2, 3, 6, 6)), [(2, 4, 4, 4)], per_member=True),
    Case("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), lambda: call(randn(2, 2, 4, 4, 4)), [(2, 3, 4, 4, 4)]),
    Case("conv_transpose1d", lambda: nn.ConvTranspose1d(3, 4, 3, stride=2),
         lambda: call(randn(2, 3, 5)), [(2, 4, 11)]),
    Case("conv_transpose1d_unbatched", lambda: nn.ConvTranspose1d(3, 4, 3, dilation=2),
         lambda: call(randn(3, 5)), [(4, 9)]),
    Case("conv_transpose2d_groups_output_padding",
         lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
         lambda: call(randn(2, 4, 4, 4)), [(2, 6, 8, 8)]),
    Case("conv_transpose3d", lambda: nn.ConvTranspose3d(2, 3, 2, stride=2),
         lambda: call(randn(2, 2, 2, 2, 2)), [(2, 3, 4, 4, 4)]),
    # ---- Embedding
    Case("embedding_padding_idx", lambda: nn.Embedding(10, 4, padding_idx=0),
         lambda: call(tokens(2, 5)), [(2, 5, 4)]),
    Case("embedding_unbatched", lambda: nn.Embedding(10, 4), lambda: call(tokens(5)), [(5, 4)]),
    Case("embedding_per_member", lambda: nn.Embedding(10, 4), lambda: call(tokens(N, 2, 5)), [(2, 5, 4)],
         per_member=True),
    # ---- MultiheadAttention: returns (out, weights)
    Case("mha_batch_first_self", lambda: nn.MultiheadAttention(8, 2, batch_first=True),
         lambda: (lambda x: call(x, x, x))(randn(2, 5, 8)), [(2, 5, 8), (2, 5, 5)]),
    Case("mha_kdim_vdim_key_padding_mask",  # sequence first, per-head weights
         lambda: nn.MultiheadAttention(8, 2, kdim=6, vdim=5),
         lambda: call(randn(5, 2, 8), randn(7, 2, 6), randn(7, 2, 5),
                      key_padding_mask=torch.tensor([[False] * 7, [False] * 5 + [True] * 2]),
                      average_attn_weights=False),
         [(5, 2, 8), (2, 2, 5, 7)]),
    Case("mha_bias_kv_zero_attn_no_weights",
         lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True, add_zero_attn=True, batch_first=True),
         lambda: (lambda x: call(x, x, x, need_weights=False,
                                 attn_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)))(
             randn(2, 5, 8)),
         [(2, 5, 8)]),
    Case("mha_unbatched", lambda: nn.MultiheadAttention(8, 2),
         lambda: (lambda x: call(x, x, x))(randn(5, 8)), [(5, 8), (5, 5)]),
    Case("transformer_decoder_layer",
         lambda: nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
         lambda: call(randn(2, 5, 8), randn(2, 6, 8)), [(2, 5, 8)]),
    Case("transformer",
         lambda: nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0,
                                 batch_first=True),
         lambda: call(randn(2, 6, 8), randn(2, 5, 8)), [(2, 5, 8)]),
    # ---- Norms (full-rank noise on their affine parameters)
    Case("layernorm", lambda: nn.LayerNorm(6), lambda: call(randn(2, 3, 6)), [(2, 3, 6)]),
    Case("groupnorm", lambda: nn.GroupNorm(2, 4), lambda: call(randn(2, 4, 5)), [(2, 4, 5)]),
    Case("rmsnorm", lambda: nn.RMSNorm(6), lambda: call(randn(2, 3, 6)), [(2, 3, 6)]),
    Case("batchnorm1d_train", lambda: nn.BatchNorm1d(4), lambda: call(randn(3, 4, 5)), [(3, 4, 5)], train=True),
    Case("batchnorm2d_train", lambda: nn.BatchNorm2d(3), lambda: call(randn(2, 3, 4, 4)), [(2, 3, 4, 4)],
         train=True),
    # ---- Recurrent: return (out, h) or (out, (h, c))
    Case("rnn_relu", lambda: nn.RNN(4, 5, nonlinearity="relu"), lambda: call(randn(6, 2, 4)), [(6, 2, 5), (1, 2, 5)]),
    Case("rnn_unbatched", lambda: nn.RNN(4, 5), lambda: call(randn(6, 4)), [(6, 5), (1, 5)]),
    Case("gru_2layer_bidirectional_batch_first",
         lambda: nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True),
         lambda: call(randn(2, 6, 4)), [(2, 6, 10), (4, 2, 5)]),
    Case("gru_unbatched_with_h0", lambda: nn.GRU(4, 5), lambda: call(randn(6, 4), randn(1, 5)), [(6, 5), (1, 5)]),
    Case("lstm_proj_2layer", lambda: nn.LSTM(4, 6, num_layers=2, proj_size=3),
         lambda: call(randn(6, 2, 4)), [(6, 2, 3), (2, 2, 3), (2, 2, 6)]),
    Case("lstm_unbatched", lambda: nn.LSTM(4, 5), lambda: call(randn(6, 4)), [(6, 5), (1, 5), (1, 5)]),
]

MODELS = [
    # a shared batch as large as the population stays shared: (N, B=N, 3)
    Case("mlp_batch_eq_N", MLP, lambda: call(randn(N, 5)), [(N, 3)]),
    Case("cnn_view_batchnorm_train", CNN, lambda: call(randn(3, 1, 8, 8)), [(3, 10)], train=True),
    Case("resnet18_train", _resnet18, lambda: call(randn(2, 3, 32, 32)), [(2, 10)], train=True),
    Case("mobilenet_v3_small_eval", _mobilenet, lambda: call(randn(2, 3, 32, 32)), [(2, 10)]),
    # 7 sequences of 7 tokens: positions pos(arange(T)) are batch-less, not a batch of 7
    Case("transformer_lm", TransformerLM, lambda: call(tokens(7, 7, vocab=11)), [(7, 7, 11)]),
    Case("patch_classifier_cls_pos_params", PatchClassifier, lambda: call(randn(3, 4, 6)), [(3, 3)]),
    Case("tied_embedding_lm", TiedEmbeddingLM, lambda: call(tokens(2, 5)), [(2, 5, 10)]),
    Case("actor_critic_dict_output", ActorCritic, lambda: call(randn(3, 4)), [(3, 3), (3,)]),  # logits, value
    Case("gru_policy_per_member", GRUPolicy, lambda: call(randn(N, 2, 5, 3)), [(2, 2)], per_member=True),
    Case("lstm_policy_per_member", LSTMPolicy, lambda: call(randn(N, 2, 3, 3)), [(2, 2), (1, 2, 8), (1, 2, 8)],
         per_member=True),
]

CASES = LAYERS + MODELS
