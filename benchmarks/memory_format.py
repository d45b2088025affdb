"""Training-step and embedding-pass speed of the GoogLeNet embedding net in the default (NCHW) and the
channels_last memory format, on this machine's device, measured in one run as a ratio.

    python benchmarks/memory_format.py [--batch 60] [--steps 20] [--device cpu]

Picks `model.net.channels_last: auto` (src/utils/instantiate.py): channels_last wherever it is faster."""
from __future__ import annotations

import argparse
import time

import torch

from src.models.components.backbone import EmbeddingNet


def measure(channels_last: bool, batch: int, steps: int, device: str, compile_net: bool = False) -> tuple[float, float]:
    torch.manual_seed(0)
    net = EmbeddingNet(channels_last=channels_last).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    if compile_net:
        net = torch.compile(net)
    x = torch.randn(batch, 3, 32, 32, device=device)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_ips = batch * steps / (time.perf_counter() - start)
    net.eval()
    xe = torch.randn(500, 3, 32, 32, device=device)
    with torch.no_grad():
        net(xe)
        start = time.perf_counter()
        for _ in range(3):
            net(xe)
    return train_ips, 1500 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the channels_last net")
    args = ap.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    results = {}
    for fmt in (False, True, False, True):  # interleaved, so drift in machine load hits both alike
        tr, ev = measure(fmt, args.batch, args.steps, args.device)
        results.setdefault(fmt, []).append((tr, ev))
    for fmt, runs in results.items():
        print(f"channels_last={fmt}: training {max(r[0] for r in runs):.0f} img/s, embedding pass {max(r[1] for r in runs):.0f} img/s")
    best = {f: (max(r[0] for r in runs), max(r[1] for r in runs)) for f, runs in results.items()}
    print(f"channels_last / NCHW: training {best[True][0] / best[False][0]:.2f}x, "
          f"embedding pass {best[True][1] / best[False][1]:.2f}x")
    if args.compile:
        start = time.perf_counter()
        tr, ev = measure(True, args.batch, args.steps, args.device, compile_net=True)
        print(f"torch.compile + channels_last: training {tr:.0f} img/s ({tr / best[True][0]:.2f}x eager), embedding pass "
              f"{ev:.0f} img/s ({ev / best[True][1]:.2f}x); {time.perf_counter() - start:.0f}s including compilation")


if __name__ == "__main__":
    main()
