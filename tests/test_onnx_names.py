import numpy as np
import pytest
import torch
from torch import nn

from shrinkml.errors import InputError
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnx_names import module_name, select_nodes, weight_nodes


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16)))

    def forward(self, x):
        return self.ff(x + self.query(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_every_weight_node_maps_to_a_real_module():
    torch.manual_seed(0)
    net = Net().eval()
    model = export_onnx(net, np.zeros((2, 5, 16), np.float32))
    modules = dict(net.named_modules())
    names = [module_name(n.name) for n in weight_nodes(model)]
    assert len(names) == 2 * 3 + 1
    assert all(name in modules and isinstance(modules[name], nn.Linear) for name in names), names
    assert "layers.1.ff.2.0" in names


def test_select_nodes_by_glob_and_errors():
    model = export_onnx(Net().eval(), np.zeros((2, 5, 16), np.float32))
    assert len(select_nodes(model, ["layers.0.*"], where="keep_float")) == 3
    assert len(select_nodes(model, ["head"], where="keep_float")) == 1
    with pytest.raises(InputError, match="no layer matches 'decoder.*'"):
        select_nodes(model, ["decoder.*"], where="keep_float")
