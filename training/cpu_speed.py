"""Times a ResNet-9 (the shipped classifier's architecture) training step on the CPU, fp32 and
bf16 autocast, to budget CPU fine-tuning (issue 18). Prints ms per batch and minutes per epoch
of the 50 000-image training set.

Usage: python -m training.cpu_speed [threads] [batch]   (needs torch: training/requirements.txt)
"""
import sys
import time

import torch

from training.models import Classifier


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    torch.set_num_threads(threads)
    model = Classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for mode in ["fp32", "bf16"]:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        step = sorted(times[1:])[len(times[1:]) // 2]  # median, the first run warms up
        print(f"{mode}: {step * 1e3:.0f} ms per batch of {batch}, {batch / step:.0f} images/s, "
              f"epoch of 50 000 = {50_000 / batch * step / 60:.1f} min "
              f"({threads} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
