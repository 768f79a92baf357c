"""torchvision's DenseNet written out in plain PyTorch, for tests that need a reference.

Same module names as torchvision, so its state dict has torchvision's keys; tests need
only ``torch``, not torchvision.
"""

import collections

import torch

nn = torch.nn
F = torch.nn.functional


class _DenseLayer(nn.Module):
  def __init__(self, cin, growth, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(cin)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

  def forward(self, x):
    y = self.conv1(self.relu1(self.norm1(x)))
    return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)


class _Transition(nn.Sequential):
  def __init__(self, cin, cout):
    super().__init__(collections.OrderedDict(
        norm=nn.BatchNorm2d(cin), relu=nn.ReLU(), conv=nn.Conv2d(cin, cout, 1, bias=False),
        pool=nn.AvgPool2d(2, 2)))


class TorchDenseNet(nn.Module):
  """torchvision.models.DenseNet, module for module."""

  def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, classes=14,
               in_channels=3):
    super().__init__()
    layers = collections.OrderedDict(
        conv0=nn.Conv2d(in_channels, init, 7, 2, 3, bias=False), norm0=nn.BatchNorm2d(init),
        relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, 2, 1))
    c = init
    for i, n in enumerate(blocks):
      block = nn.Sequential()
      for j in range(n):
        block.add_module(f"denselayer{j + 1}", _DenseLayer(c + j * growth, growth, bn_size))
      layers[f"denseblock{i + 1}"] = block
      c += n * growth
      if i != len(blocks) - 1:
        layers[f"transition{i + 1}"] = _Transition(c, c // 2)
        c //= 2
    layers[f"norm{len(blocks) + 1}"] = nn.BatchNorm2d(c)
    self.features = nn.Sequential(layers)
    self.classifier = nn.Linear(c, classes)

  def forward(self, x):
    h = F.relu(self.features(x))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def randomize(model, seed):
  """Non-trivial BatchNorm statistics and affine parameters, eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  return model.eval()


def tiny(seed=0, *, classes=5, in_channels=1, blocks=(3, 3, 3)):
  """cejax's tiny preset (``blocks`` as its ``block_config``), randomized."""
  torch.manual_seed(seed)
  return randomize(TorchDenseNet(growth=12, blocks=blocks, init=24, classes=classes,
                                  in_channels=in_channels), seed)
