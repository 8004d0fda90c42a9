"""sewa beside a Lightning run: `python examples/lightning_trainer.py` (torch, lightning, sewa)."""
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from sewa.integrations.lightning import SewaCallback


class Net(L.LightningModule):  # sewa's evaluator rebuilds it as Net(**self.hparams)
    def __init__(self, hidden=64):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 4))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # sewa's objective: the loss it returns
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def data(n, seed):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] * x[:, 3] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=64)


if __name__ == "__main__":  # required: sewa's evaluator imports this file to find Net
    checkpoints = ModelCheckpoint(every_n_train_steps=25, save_top_k=-1)
    trainer = L.Trainer(max_steps=400, callbacks=[checkpoints, SewaCallback(k=5, window=12)])
    trainer.fit(Net(), data(4096, 0), data(512, 1))  # then the model holds sewa's average
