"""A tiny LightningModule and synthetic data for the Lightning tests (no tests here): an
importable module, so sewa's evaluator process can rebuild the model by name."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyMLP(L.LightningModule):
    """8 → hidden → 3 classifier with batch norm (an integer buffer: num_batches_tracked)."""

    def __init__(self, hidden=32, lr=0.2):
        super().__init__()
        self.save_hyperparameters()
        self.norm = nn.BatchNorm1d(8)
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(self.norm(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loss_sum_of_squares(module, batch):
    """A loss_fn of the (module, batch) form: mean squared logits error vs one-hot targets."""
    x, y = batch
    return ((module(x) - nn.functional.one_hot(y, 3).float()) ** 2).mean()


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + 0.5 * x[:, 2] > 0).long()
    return TensorDataset(x, y)


def loaders(batch=32):
    train = DataLoader(data(512, 0), batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    # a last batch of another size: the loss is weighted by rows
    val = DataLoader(data(100, 2), batch_size=batch)
    return train, val
