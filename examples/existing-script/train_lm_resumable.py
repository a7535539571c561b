"""Train a small character-level LSTM language model on a generated corpus.

    python train_lm_resumable.py --epochs 6 --ckpt-dir checkpoints

This is train_lm.py with the checkpointing kit added: every addition is marked
"+ checkpoint" (diff the two files). Copy checkpoint_utils.py beside it. Stopped in any
way (SIGUSR1, SIGUSR2 or SIGTERM save first; SIGKILL does not), it resumes from the
newest valid checkpoint when started again with the same --ckpt-dir, and ends bitwise
identical to a run that was never stopped. Exit codes: 0 finished, 3 stopped by a signal
and requeued, 75 stopped by a signal and not requeued (resubmit it).

The corpus is a few kilobytes of sentences from a tiny random grammar, so the script needs
nothing but PyTorch and runs in seconds on one CPU thread. The loop is written the way
many language-model scripts are: no DataLoader, batches cut out of one long tensor
(truncated backpropagation through time), a hidden state carried from batch to batch,
plain SGD whose learning rate is divided by 4 whenever the validation loss stops
improving, and the best model kept in a file of its own.
"""
import argparse
import logging  # + checkpoint
import math
import os  # + checkpoint
import random
import signal  # + checkpoint
import sys  # + checkpoint
import time

if __name__ == "__main__":  # + checkpoint: a stop signal during the imports waits
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from checkpoint_utils import (  # noqa: E402  # + checkpoint
    CheckpointManager,
    PreemptionHandler,
    TrainingProgress,
    atomic_write_bytes,
    capture_training_state,
    exit_after_preemption,
    restore_training_state,
)

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
    # + checkpoint
    p.add_argument("--ckpt-dir", default="checkpoints", help="checkpoint folder")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="after a stop signal, exit 75 instead of requeueing the Slurm job")
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


def seed_every_generator(seed):  # + checkpoint
    """Seed each global generator whose state the checkpoint holds: Python's, NumPy's (when
    it is installed) and torch's. This script draws from torch's alone, but unseeded, the
    others would differ between two fresh runs, and so would their checkpoints."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


def main(preemption):  # + checkpoint: the flag a stop signal sets
    args = parse_args()
    # + checkpoint: the kit says what it does (saves, resumes) through logging
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(name)s] %(message)s")
    seed_every_generator(args.seed)  # + checkpoint: was torch.manual_seed(args.seed)
    # + checkpoint: on a GPU, deterministic cuBLAS needs this before its first product
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)  # + checkpoint: the same run, bit for bit
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

    # + checkpoint: resume where the last run stopped, or start at the beginning
    manager = CheckpointManager(args.ckpt_dir, keep=3)
    first_epoch, first_batch, resumed_hidden = 0, 0, None
    checkpoint = manager.load_latest()
    if checkpoint is not None:
        resumed = restore_training_state(checkpoint, model=model)
        step, first_epoch, first_batch = resumed.step, resumed.epoch, resumed.batch_in_epoch
        carried = checkpoint["extra"]
        lr, best_val_loss = carried["lr"], carried["best_val_loss"]
        resumed_hidden = tuple(carried["hidden"])

    def save(kind, epochs_done, batches_done):  # + checkpoint
        """Everything this loop carries from step to step, as the checkpoint of ``kind``."""
        progress = TrainingProgress(step=step, epoch=epochs_done, batch_in_epoch=batches_done)
        carried = {"lr": lr, "best_val_loss": best_val_loss,
                   "hidden": [h.detach() for h in hidden]}
        state = capture_training_state(model=model, progress=progress, extra=carried)
        manager.save(state, step=step, epoch=epochs_done, kind=kind)

    started = time.perf_counter()
    for epoch in range(first_epoch, args.epochs):  # + checkpoint: from first_epoch
        model.train()
        hidden = model.init_hidden(args.batch_size)
        if epoch == first_epoch and first_batch > 0:  # + checkpoint: resumed inside this epoch
            hidden = resumed_hidden
        for batch, start in enumerate(batch_starts):
            if epoch == first_epoch and batch < first_batch:  # + checkpoint: trained already
                continue
            inputs, targets = get_batch(train_data, start, args.bptt)
            loss, hidden = train_step(model, inputs, targets, hidden, lr, args.clip)
            step += 1
            if step % args.log_every == 0:
                # flush: Slurm's output file is not a terminal, and lines would come in blocks
                print(f"step {step}/{total_steps} | epoch {epoch + 1} | batch {batch + 1}/"
                      f"{len(batch_starts)} | lr {lr:g} | loss {loss:.6f}", flush=True)
            # + checkpoint: a step boundary. Not the epoch's last one: that checkpoint comes
            # after the evaluation, the best model and the anneal, which belong to this step.
            if batch + 1 < len(batch_starts):
                if preemption.requested:
                    save("preempt", epochs_done=epoch, batches_done=batch + 1)
                    exit_after_preemption(preemption, requeue=args.requeue)
                if step % args.save_every == 0:
                    save("step", epochs_done=epoch, batches_done=batch + 1)

        val_loss = evaluate(model, valid_data, args.bptt)
        print(f"epoch {epoch + 1} | valid loss {val_loss:.6f} | "
              f"valid ppl {math.exp(val_loss):.2f} | lr {lr:g}", flush=True)
        if best_val_loss is None or val_loss < best_val_loss:
            best_val_loss = val_loss
            # + checkpoint: atomic, so that a kill while writing cannot leave half a file
            atomic_write_bytes(args.best_model, lambda f: torch.save(model.state_dict(), f))
        else:
            lr /= 4.0  # no better on held-out text: take smaller steps

        # + checkpoint: the epoch is complete, its end-of-epoch work done; the last
        # epoch's checkpoint is the final save
        save("epoch", epochs_done=epoch + 1, batches_done=0)
        if preemption.requested:
            exit_after_preemption(preemption, requeue=args.requeue)

    print(f"finished in {time.perf_counter() - started:.2f} s, "
          f"best valid loss {best_val_loss:.6f}", flush=True)
    # + checkpoint: what the saves cost (the course's supervisor reads this line)
    print(f"checkpoint saves took {manager.save_seconds:.2f} s of "
          f"{time.perf_counter() - started:.2f} s", flush=True)


if __name__ == "__main__":
    # + checkpoint: from the first line on, a stop signal only sets a flag
    with PreemptionHandler() as preemption:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, preemption.signals)  # + checkpoint
        main(preemption)
