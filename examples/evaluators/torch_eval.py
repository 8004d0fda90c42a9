"""Example sewa evaluator for a PyTorch model: held-out loss and its gradient by autograd.

Point sewa at it with:

    [objective]
    kind = "command"
    command = ["python3", "examples/evaluators/torch_eval.py", "selection.safetensors"]
    timeout_s = 120

Replace `Net` with your model class and the data loading with your held-out set. The weights
sewa sends are the candidate average (float32) under the same names as your state_dict.
"""

import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))
from sewa_evaluator import serve  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self, d_in, hidden, classes):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.net(x)


def main():
    data = load_file(sys.argv[1])
    x, y = data["inputs"], data["targets"].long()
    torch.set_num_threads(1)  # stay off the trainer's cores
    model = None

    def loss_fn(weights):
        nonlocal model
        if model is None:  # build the module once, from the first candidate's shapes
            w0, w2 = weights["net.0.weight"], weights["net.2.weight"]
            model = Net(w0.shape[1], w0.shape[0], w2.shape[0])
        logits = torch.func.functional_call(model, weights, (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    serve(loss_fn, name="torch_eval")


if __name__ == "__main__":
    main()
