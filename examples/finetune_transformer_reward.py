"""Fine-tune your own transformer on a reward backprop cannot see: exact match of greedy-decoded answers.

Bring any ``nn.Module`` mapping tokens ``(B, T)`` to logits ``(B, T, vocab)`` and any reward of the
decoded tokens. Here the model is a small causal transformer (from scratch; load your pretrained
weights instead), asked to continue a prompt of digits by counting up from its last digit (mod V),
and the reward is the length of the correct prefix of its greedy answer (a mistake ends the count).
Every member decodes greedily; from the second token on its sequence is its own, so it is passed
as ``population.per_member(seq)`` with ``seq (N, B, t)``.

    python examples/finetune_transformer_reward.py [--quick] [--check] [--device cpu] [--seed 0]
"""
import argparse

import torch
import torch.nn as nn

from eggroll_optim import EggrollOptimizer

V, P, L = 8, 2, 4  # digits 0..V-1, prompt and answer lengths


class TinyLM(nn.Module):  # your model: (B, T) tokens -> (B, T, V) logits, written for plain batches
    def __init__(self, d=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(P + L, d)
        layer = nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(d, V)

    def forward(self, tokens):
        T = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device)
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def reward(decoded, target):  # your reward: (..., B, L) decoded, (B, L) target -> (...); no gradient needed
    return (decoded == target).cumprod(-1).float().mean((-2, -1))  # correct prefix / L, batch mean


def problems(n, device):  # prompts (n, P), targets (n, L): count up from the prompt's last digit
    prompts = torch.randint(V, (n, P), device=device)
    return prompts, (prompts[:, -1:] + torch.arange(1, L + 1, device=device)) % V


@torch.no_grad()
def greedy(model, prompts, population=None):  # (B, P) -> (B, L), or (N, B, L) inside a population
    seq = prompts
    for i in range(L):
        x = population.per_member(seq) if population is not None and i > 0 else seq  # shared prompts first
        token = model(x)[..., -1, :].argmax(-1)  # (B,) or (N, B)
        seq = torch.cat((seq.expand(*token.shape, -1), token[..., None]), dim=-1)  # per member after step 1
    return seq[..., P:]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="30 steps of 64 members (smoke test)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the held-out reward rose")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    steps, N, B = (30, 64, 16) if args.quick else (300, 512, 256)
    print(f"device {args.device}, torch {torch.__version__}, {steps} steps, population {N}, {B} prompts a step")
    torch.manual_seed(args.seed)
    held_out = problems(512, args.device)
    model = TinyLM().to(args.device)  # your model, with its pretrained weights loaded
    opt = EggrollOptimizer(model, lr=1e-2, sigma=0.05, rank=4, population_size=N, optimizer=torch.optim.Adam,
                           seed=args.seed)
    initial = reward(greedy(model, held_out[0]), held_out[1]).item()
    for step in range(steps):
        prompts, target = problems(B, args.device)  # one batch shared by every member
        with opt.ask() as population:
            fitness = reward(greedy(model, prompts, population), target)  # (N,)
        opt.tell(fitness)
        if step % max(1, steps // 5) == 0:
            print(f"  step {step:4d}  population reward {fitness.mean().item():.3f}")
    final = reward(greedy(model, held_out[0]), held_out[1]).item()
    print(f"held-out reward (correct prefix / {L}) {initial:.3f} -> {final:.3f}")
    print(f"RESULT initial={initial:.4f} final={final:.4f}")
    if args.check and not final > initial:
        raise SystemExit(f"check failed: the held-out reward {final:.3f} did not rise above {initial:.3f}")


if __name__ == "__main__":
    main()
