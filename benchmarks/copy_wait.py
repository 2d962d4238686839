"""How long the host waits to queue a training batch's copy to the GPU while the GPU is busy.

    python -m benchmarks.copy_wait [--queued-ms 200]

Queues about --queued-ms of matrix products on the GPU, then times, on the host, one way of moving a batch the
size of train._pad's (4 rows x 11 x 4096 int64) to the GPU: a plain copy (which waits for the queued work), a queued
copy from pageable memory (what _pad does on CUDA), and a queued copy pinned first. Five tries each; min and max.
"""

import time

import click
import torch

from benchmarks.common import publish


@click.command()
@click.option("--queued-ms", default=200.0, show_default=True, help="GPU work queued before each copy, in milliseconds.")
@click.option("--no-record", is_flag=True, help="Print only; don't append to RESULTS.md.")
def main(queued_ms, no_record):
    device = torch.device("cuda")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    a @ a  # cuBLAS's set-up, before the products are timed
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    products = max(1, round(queued_ms / ((time.perf_counter() - started) * 100)))
    batch = torch.zeros(4, 11, 4096, dtype=torch.long)
    ways = {"plain copy (.to(device))": lambda: batch.to(device),
            "queued copy from pageable memory (non_blocking): train._pad's": lambda: batch.to(device, non_blocking=True),
            "pinned first, then queued (pin_memory(), non_blocking)": lambda: batch.pin_memory().to(device, non_blocking=True)}
    rows = []
    for label, copy in ways.items():
        waits = []
        for _ in range(5):
            for _ in range(products):
                a @ a
            started = time.perf_counter()
            copy()
            waits.append(time.perf_counter() - started)
            torch.cuda.synchronize()
        rows.append([label, f"{min(waits) * 1e3:.2f}", f"{max(waits) * 1e3:.2f}"])
    publish("Host wait to queue a batch's copy to a busy GPU", device, f"{products} products of 8192^2 bf16 queued (about {queued_ms:.0f} ms)",
            ["copy", "host wait, min (ms)", "max (ms)"], rows, record=not no_record)


if __name__ == "__main__":
    main()
