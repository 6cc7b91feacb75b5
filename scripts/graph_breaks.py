"""Where torch.compile breaks the graph of a 125M model's training forward (GPU).

    python scripts/graph_breaks.py [--arch mamba2] [--L 2048] [--batch 8]

Runs torch._dynamo.explain over the forward with labels (the loss inside, as bench train and
the trainer call it) under bf16 autocast, and prints the number of graphs and each distinct
break reason. A project kernel launched inside an autograd Function that Dynamo cannot trace
makes it run that Function eagerly, through the kernels' own launchers (and autotune configs);
the frames around it still compile.
"""
import argparse

import torch
import torch._dynamo as dynamo

from ssdbench.bench_train import ARCHS, VOCAB, build_model

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="mamba2", choices=ARCHS)
ap.add_argument("--L", type=int, default=2048)
ap.add_argument("--batch", type=int, default=8)
a = ap.parse_args()
model = build_model(a.arch).cuda()
x = torch.randint(0, VOCAB, (a.batch, a.L + 1), device="cuda")  # (batch, L + 1)
with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
    ex = dynamo.explain(model)(x[:, :-1], labels=x[:, 1:])
print(f"graphs {ex.graph_count}, breaks {ex.graph_break_count}, ops {ex.op_count}")
for reason in dict.fromkeys(b.reason.splitlines()[0][:200] for b in ex.break_reasons):
    print("break:", reason)
