"""Train a small character-level LSTM language model on a generated corpus.

    python train_lm.py --epochs 6

The corpus is a few kilobytes of sentences from a tiny random grammar, so the script needs
nothing but PyTorch and runs in seconds on one CPU thread. The loop is written the way
many language-model scripts are: no DataLoader, batches cut out of one long tensor
(truncated backpropagation through time), a hidden state carried from batch to batch,
plain SGD whose learning rate is divided by 4 whenever the validation loss stops
improving, and the best model kept in a file of its own.
"""
import argparse
import math
import random
import time

import torch
import torch.nn as nn

NOUNS = ["cat", "dog", "bird", "farmer", "child", "teacher", "river", "garden"]
VERBS = ["sees", "likes", "follows", "paints", "hears", "finds"]
ADJECTIVES = ["small", "old", "green", "quiet", "happy", "tall"]


def parse_args():
    p = argparse.ArgumentParser(description="character-level LSTM language model")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bptt", type=int, default=16, help="characters per sequence")
    p.add_argument("--lr", type=float, default=4.0)
    p.add_argument("--clip", type=float, default=0.5, help="gradient norm clipping")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--corpus-chars", type=int, default=6000)
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--best-model", default="best_model.pt")
    return p.parse_args()


def noun_phrase(rng):
    words = [rng.choice(["the", "a"])]
    if rng.random() < 0.4:
        words.append(rng.choice(ADJECTIVES))
    return words + [rng.choice(NOUNS)]


def make_corpus(n_chars, seed):
    """Sentences such as 'the old dog follows a child .', one per line."""
    rng = random.Random(seed)
    lines, length = [], 0
    while length < n_chars:
        lines.append(" ".join(noun_phrase(rng) + [rng.choice(VERBS)] + noun_phrase(rng) + ["."]))
        length += len(lines[-1]) + 1
    return "\n".join(lines)[:n_chars]


def batchify(ids, batch_size):
    """Cut one long sequence into batch_size columns; row t holds the t-th character of each."""
    rows = ids.size(0) // batch_size
    return ids[:rows * batch_size].view(batch_size, rows).t().contiguous()


def get_batch(source, start, bptt):
    """Inputs and targets (the same characters shifted by one) from row ``start`` on."""
    length = min(bptt, source.size(0) - 1 - start)
    return source[start:start + length], source[start + 1:start + 1 + length]


class CharLSTM(nn.Module):
    def __init__(self, vocab_size, embed_size=16, hidden_size=32, dropout=0.2):
        super().__init__()
        self.hidden_size = hidden_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_size, hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, inputs, hidden):
        output, hidden = self.lstm(self.drop(self.embed(inputs)), hidden)
        return self.head(self.drop(output)), hidden

    def init_hidden(self, batch_size):
        return (torch.zeros(1, batch_size, self.hidden_size),
                torch.zeros(1, batch_size, self.hidden_size))


def sequence_loss(output, targets):
    return nn.functional.cross_entropy(output.reshape(-1, output.size(-1)), targets.reshape(-1))


def train_step(model, inputs, targets, hidden, lr, clip):
    """One SGD step on one batch; returns the loss and the hidden state for the next batch."""
    hidden = tuple(h.detach() for h in hidden)  # backpropagate through this batch only
    model.zero_grad()
    output, hidden = model(inputs, hidden)
    loss = sequence_loss(output, targets)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)  # LSTMs' gradients can explode
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
    return loss.item(), hidden


def evaluate(model, source, bptt):
    """Mean loss per character on ``source``, without dropout."""
    model.eval()
    total, hidden = 0.0, model.init_hidden(source.size(1))
    with torch.no_grad():
        for start in range(0, source.size(0) - 1, bptt):
            inputs, targets = get_batch(source, start, bptt)
            output, hidden = model(inputs, hidden)
            total += len(inputs) * sequence_loss(output, targets).item()
    return total / (source.size(0) - 1)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    text = make_corpus(args.corpus_chars, args.seed)
    vocab = {char: i for i, char in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[char] for char in text])
    split = int(0.9 * len(ids))
    train_data = batchify(ids[:split], args.batch_size)
    valid_data = batchify(ids[split:], 4)
    model = CharLSTM(len(vocab), dropout=args.dropout)

    lr, best_val_loss, step = args.lr, None, 0
    batch_starts = range(0, train_data.size(0) - 1, args.bptt)
    total_steps = args.epochs * len(batch_starts)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        hidden = model.init_hidden(args.batch_size)
        for batch, start in enumerate(batch_starts):
            inputs, targets = get_batch(train_data, start, args.bptt)
            loss, hidden = train_step(model, inputs, targets, hidden, lr, args.clip)
            step += 1
            if step % args.log_every == 0:
                # flush: Slurm's output file is not a terminal, and lines would come in blocks
                print(f"step {step}/{total_steps} | epoch {epoch + 1} | batch {batch + 1}/"
                      f"{len(batch_starts)} | lr {lr:g} | loss {loss:.6f}", flush=True)

        val_loss = evaluate(model, valid_data, args.bptt)
        print(f"epoch {epoch + 1} | valid loss {val_loss:.6f} | "
              f"valid ppl {math.exp(val_loss):.2f} | lr {lr:g}", flush=True)
        if best_val_loss is None or val_loss < best_val_loss:
            best_val_loss = val_loss
            torch.save(model.state_dict(), args.best_model)
        else:
            lr /= 4.0  # no better on held-out text: take smaller steps

    print(f"finished in {time.perf_counter() - started:.2f} s, "
          f"best valid loss {best_val_loss:.6f}", flush=True)


if __name__ == "__main__":
    main()
