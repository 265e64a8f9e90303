"""The original example's recipe as a plain script (no distseq): the reference for time to accuracy.

nn.RNN(1, 32) on 1,000 in-memory samples of N(0, 1) sequences of length 10, label = sum > 0;
batch 32, Adam lr 0.01, 10 epochs; Sigmoid + BCELoss as the original wrote it, with its one bug
fixed: the label has shape (N, 1) (the original's (N, 1, 1) crashes BCELoss). After each epoch the
held-out accuracy on 10,000 fresh samples is measured (outside the timed training).

    python seed_recipe.py [SEED]   ->  one JSON line: seconds, accuracy, curve
"""

import json
import sys
import time

import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(input_size=1, hidden_size=32, batch_first=True)
        self.fc = nn.Linear(32, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        out, _ = self.rnn(x)  # (B, 10, 32)
        return self.sigmoid(self.fc(out[:, -1, :]))  # (B, 1)


def data(n, generator):
    x = torch.randn(n, 10, 1, generator=generator)  # (N, 10, 1)
    y = (x.sum(dim=1) > 0).float()  # (N, 1): the fix
    return x, y


def main(seed=0):
    torch.manual_seed(seed)
    x, y = data(1000, torch.Generator().manual_seed(seed))
    x_test, y_test = data(10_000, torch.Generator().manual_seed(seed + 10_000))
    model, criterion = Net(), nn.BCELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    curve, seconds = [], 0.0
    for epoch in range(10):
        started = time.perf_counter()
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - started
        with torch.no_grad():
            accuracy = ((model(x_test) > 0.5).float() == y_test).float().mean().item()
        curve.append({"epoch": epoch + 1, "train_seconds": seconds, "accuracy": accuracy})
    print(json.dumps({"seconds": seconds, "accuracy": curve[-1]["accuracy"], "curve": curve}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
