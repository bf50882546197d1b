"""Inference speed-up of exoticnorm.fold_norms (issue #12 item 5), one thread, inference_mode:
a ZCA-LeNet (batch 256) and a block-zca(16) resnet18 (16x3x64x64), each trained 2-3 steps so
the running statistics are not the initial ones. Prints unfolded/folded ms, the speed-up and
max|folded - unfolded|.   python benchmarks/fold_speed.py
"""
import time, torch, torchvision, exoticnorm as en
from exoticnorm.models import LeNet
torch.set_num_threads(1)
def t(model, x, r=30):
    with torch.inference_mode():
        for _ in range(3): model(x)
        best = []
        for _ in range(5):
            s = time.perf_counter()
            for _ in range(r): model(x)
            best.append((time.perf_counter() - s) / r)
    return min(best)
torch.manual_seed(0)
cases = []
lenet = LeNet(norm="zca")
lenet.train(); [lenet(torch.rand(256, 1, 28, 28)) for _ in range(3)]
cases.append(("zca LeNet, batch 256", lenet.eval(), torch.rand(256, 1, 28, 28)))
r18 = en.convert_norms(torchvision.models.resnet18(num_classes=10), "block-zca", group_size=16)
r18.train(); [r18(torch.randn(16, 3, 64, 64)) for _ in range(2)]
cases.append(("resnet18 block-zca(16), batch 16x3x64x64", r18.eval(), torch.randn(16, 3, 64, 64)))
for name, model, x in cases:
    folded, left = en.fold_norms(model)
    with torch.inference_mode():
        diff = (folded(x) - model(x)).abs().max().item()
    a, b = t(model, x), t(folded, x)
    print(f"{name}: unfolded {a*1e3:.2f} ms, folded {b*1e3:.2f} ms, speed-up {a/b:.2f}x, max|diff| {diff:.2e}, left {len(left)}")
