"""Latency of the published-size EmoRecog-Net v1.0 port on CPU, and whether reuse can help.

Builds the full-width network (86,811,604 parameters, random weights: no file needed) and times
one window forward pass (batch 1, 25 x 246) with 2 intra-op threads, plus a whole stepper step
(window normalisation + forward). Then it asks whether the convolution outputs of volumes already
seen could be reused when the window slides by one volume:

* the input is min-max normalised per ROI over the window, so any ROI whose minimum or maximum
  enters or leaves the window changes every normalised value of that ROI, and with it every
  output of the first convolution at every position; after the leaky ReLU and pooling, every input
  of the second convolution changes too. The benchmark counts, on a synthetic random-walk session,
  how often all 246 per-ROI ranges stay put (the only case where the normalised overlap is
  unchanged);
* even then, the window shifts by one volume, so the stride-2 max pooling pairs different frames
  and 'same' padding touches different frames: only the first convolution's interior columns
  could be reused. Its share of the forward time is the upper bound of any saving.

Last line: one JSON object. Run: ``python benchmarks/bench_keras_v1.py [--iterations N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from emorecog_stream.model.keras_v1 import KerasV1Model, KerasV1StreamingModel, SourceInfo
from emorecog_stream.model.keras_v1_net import (
    UPSTREAM_SIZES,
    KerasV1Net,
    activation,
    conv1d_as_gemm,
)


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def time_calls(fn, iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@torch.inference_mode()
def layer_split(
    net: KerasV1Net, mri: torch.Tensor, rates: torch.Tensor, iterations: int
) -> dict[str, float]:
    """Median ms of the first and second convolutions (both streams) and of the rest, timed in
    the same pass, and the median per-pass share of the first convolution."""
    x = mri.transpose(1, 2).contiguous()
    streams = (net.stream_c, net.stream_l)
    conv1_s, conv2_s, rest_s, share = [], [], [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        c1 = [activation("leaky_relu", conv1d_as_gemm(x, s.conv1, s.pad1)) for s in streams]
        t1 = time.perf_counter()
        c2 = [
            activation("leaky_relu", conv1d_as_gemm(F.max_pool1d(c, 2, 2), s.conv2, s.pad2))
            for s, c in zip(streams, c1, strict=True)
        ]
        t2 = time.perf_counter()
        heads = []
        for s, c in zip(streams, c2, strict=True):
            _, h = s.gru(F.avg_pool1d(c, 2, 2).transpose(1, 2))
            heads.append(s.dense2(activation("leaky_relu", s.dense1(h[0]))))
        phys = net.phys2(activation("leaky_relu", net.phys1(rates)))
        joined = torch.cat([*heads, phys], dim=1)
        torch.softmax(net.head_class(joined), 1), torch.softmax(net.head_level(joined), 1)
        t3 = time.perf_counter()
        conv1_s.append(t1 - t0)
        conv2_s.append(t2 - t1)
        rest_s.append(t3 - t2)
        share.append((t1 - t0) / (t3 - t0))
    return {
        "conv1_ms": round(float(np.median(conv1_s)) * 1e3, 2),
        "conv2_ms": round(float(np.median(conv2_s)) * 1e3, 2),
        "rest_ms": round(float(np.median(rest_s)) * 1e3, 2),
        "conv1_share": round(float(np.median(share)), 3),
    }


def range_stability(n_volumes: int, window: int, rois: int, seed: int) -> dict[str, float]:
    """How often the per-ROI min/max stay the same when the window slides by one volume."""
    rng = np.random.default_rng(seed)
    # BOLD-like: slow random walk plus noise, per ROI.
    series = np.cumsum(rng.normal(scale=0.3, size=(n_volumes, rois)), axis=0)
    series += rng.normal(size=(n_volumes, rois))
    same_all, same_roi = 0, 0.0
    steps = 0
    for t in range(window, n_volumes):
        prev = series[t - window : t]
        cur = series[t - window + 1 : t + 1]
        unchanged = (prev.min(0) == cur.min(0)) & (prev.max(0) == cur.max(0))
        same_all += bool(unchanged.all())
        same_roi += float(unchanged.mean())
        steps += 1
    return {
        "steps": steps,
        "fraction_all_rois_unchanged": same_all / steps,
        "mean_fraction_rois_unchanged": round(same_roi / steps, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = round(os.getloadavg()[0], 2)  # the machine may be shared: say how busy it was

    t0 = time.perf_counter()
    net = KerasV1Net(UPSTREAM_SIZES)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())
    model = KerasV1Model(net, SourceInfo("random.h5", "0" * 64, "none", "none"))
    rng = np.random.default_rng(args.seed)
    raw = rng.normal(size=(25, 246)).cumsum(axis=0)
    mri = torch.from_numpy(
        ((raw - raw.min(0)) / (raw.max(0) - raw.min(0))).astype(np.float32)[None]
    )
    rates = torch.tensor([[70.0, 15.0]])

    def forward() -> None:
        with torch.inference_mode():
            net(mri, rates)

    fwd = percentiles(time_calls(forward, args.iterations, args.warmup))

    stepper = KerasV1StreamingModel(model).stepper()
    volumes = rng.normal(size=(args.iterations + args.warmup + 25, 246)).cumsum(axis=0)
    for v in volumes[:24]:
        stepper.step(v, 70.0, 15.0)
    feed = iter(volumes[24:])
    step = percentiles(
        time_calls(lambda: stepper.step(next(feed), 70.0, 15.0), args.iterations, args.warmup)
    )

    split = layer_split(net, mri, rates, max(20, args.iterations // 5))
    stability = range_stability(2000, 25, 246, args.seed)
    result = {
        "benchmark": "keras_v1_window_forward",
        "parameters": n_params,
        "threads": args.threads,
        "iterations": args.iterations,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "build_s": round(build_s, 2),
        "load_average_1min_before": load_before,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "forward": fwd,
        "step": step,
        "target_p99_ms": 150.0,
        "meets_target": max(fwd["p99_ms"], step["p99_ms"]) <= 150.0,
        "layers": split,
        "reuse": {
            **stability,
            "conv1_share_of_forward": split["conv1_share"],
            "verdict": "exact reuse needs every ROI's window min/max unchanged; "
            "it practically never happens, and even then only the first convolution's "
            "interior columns could be reused (pooling parity and padding move)",
        },
    }
    print(
        f"forward p50 {fwd['p50_ms']} ms, p99 {fwd['p99_ms']} ms; step p50 {step['p50_ms']} ms,"
        f" p99 {step['p99_ms']} ms ({args.threads} threads, {n_params:,} parameters)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
