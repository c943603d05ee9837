"""`tunelab bench` without a GPU: the --arch shapes against the published parameter counts (models built on the
meta device, no weights), the MFU FLOP count against the real modules' weight shapes, and the case expansion."""
from __future__ import annotations

import argparse

import pytest
import torch

from tunelab.bench import ARCHS, _variants, flops_per_token

# Published totals and the unit of their last digit (model cards: Qwen2.5 0.49B / 1.54B / 3.09B / 7.61B / 14.7B,
# Qwen3-8B 8.2B); a count must lie within one such unit
PUBLISHED = {"qwen2.5-0.5b": (0.49e9, 0.01e9), "qwen2.5-1.5b": (1.54e9, 0.01e9), "qwen2.5-3b": (3.09e9, 0.01e9),
             "qwen2.5-7b": (7.61e9, 0.01e9), "qwen2.5-14b": (14.7e9, 0.1e9), "qwen3-8b": (8.2e9, 0.1e9)}


def _meta_model(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(ARCHS[arch])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_arch_shapes_give_the_published_size_and_the_flop_count(arch):
    model = _meta_model(arch)
    total = sum(p.numel() for p in model.parameters())  # a tied head is one tensor
    published, unit = PUBLISHED[arch]
    assert abs(total - published) < unit
    layer_weights = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    head = model.get_output_embeddings().weight.numel()
    a = ARCHS[arch]
    q_width = a["num_attention_heads"] * a.get("head_dim", a["hidden_size"] // a["num_attention_heads"])
    attention = a["num_hidden_layers"] * 8 * 512 * q_width
    assert flops_per_token(arch, 1024) == 6 * layer_weights + 4 * head + attention


def test_seven_b_flops_match_the_issue_floor():
    # issue 9: "about 41 GFLOP per token ... about 19,000 tok/s at ~790 TFLOP/s"
    assert 41e9 < flops_per_token("qwen2.5-7b", 1024) < 42e9
    assert 18_500 < 790e12 / flops_per_token("qwen2.5-7b", 1024) < 19_500


def test_case_expansion():
    ns = argparse.Namespace(variants="plain-autocast", path="fast,plain", profiles="full,alpaca-packed")
    assert _variants(ns) == ["plain-autocast", "tunelab-fast", "tunelab-plain", "plain-autocast:alpaca-packed",
                             "tunelab-fast:alpaca-packed", "tunelab-plain:alpaca-packed"]
    assert _variants(argparse.Namespace(variants=None, path=None, profiles="full")) == ["tunelab-fast", "tunelab-plain"]


class _Event:  # the four methods gpu_timeline reads of a kineto event
    def __init__(self, name, device, start_us, dur_us):
        self._n, self._d, self._s, self._t = name, device, start_us * 1000, dur_us * 1000

    def name(self):
        return self._n

    def device_type(self):
        return f"DeviceType.{self._d}"

    def start_ns(self):
        return self._s

    def duration_ns(self):
        return self._t


def test_gpu_timeline_unions_kernels_and_counts_the_idle_gaps():
    from tunelab.bench import gpu_timeline

    events = [_Event("aten::mm", "CPU", 0, 5),  # the step's first host event: the span starts here
              _Event("gemm", "CUDA", 10, 30),  # 10-40
              _Event("add", "CUDA", 20, 30),  # 20-50: overlaps the first (another stream), busy to 50
              _Event("Memcpy HtoD (Pinned -> Device)", "CUDA", 45, 100),  # a copy: not in the busy time
              _Event("norm", "CUDA", 60, 5),  # gap 10 us (under 20)
              _Event("softmax", "CUDA", 100, 10)]  # gap 35 us, ends at 110; the copy ends at 145
    got = gpu_timeline(events)
    assert got == {"span_ms": 0.145, "kernel_busy_ms": 0.055, "kernels": 4, "copy_ms": 0.1, "idle_gaps_ms": 0.045,
                   "gaps_over_20us": 1, "gaps_over_20us_ms": 0.035}
    assert gpu_timeline([])["kernels"] == 0


def test_gpu_sampler_reads_nvidia_smi_lines_and_summarises_the_timed_windows(tmp_path):
    """bench.GpuSampler runs `nvidia-smi --query-gpu=... -lms N` (here a stand-in script printing what the real one
    prints, with a header-like and an [N/A] line among them) and keeps the samples stamped when read; summary()
    takes the medians over the samples inside the given windows, the share at the software power cap (0x4) and of
    thermal / hardware slowdowns; no nvidia-smi (or the command "": sampling off): no samples, summary None."""
    import os
    import stat
    import time

    from tunelab.bench import GpuSampler

    fake = tmp_path / "fake-smi"
    fake.write_text("#!/bin/sh\n"
                    "echo \"$@\" > \"$0.args\"\n"
                    "echo 'clocks.sm [MHz], power.draw [W], clocks_throttle_reasons.active'\n"
                    "echo '1980, 350.25, 0x0000000000000000'\n"
                    "echo '1650, 690.5, 0x0000000000000004'\n"
                    "echo '[N/A], [N/A], [N/A]'\n"
                    "echo '1590, 699.0, 0x0000000000000004'\n"
                    "echo '1500, 640.0, 0x0000000000000024'\n"
                    "sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    sampler = GpuSampler(period_ms=250, command=str(fake))
    deadline = time.time() + 20
    while len(sampler.samples) < 4 and time.time() < deadline:
        time.sleep(0.05)
    sampler.close()
    assert [s[1:] for s in sampler.samples] == [(1980, 350.25, 0), (1650, 690.5, 4), (1590, 699.0, 4),
                                                (1500, 640.0, 0x24)]
    args = open(str(fake) + ".args").read().split()
    assert args[:3] == ["--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active",
                        "--format=csv,noheader,nounits", "-lms"] and args[3] == "250"
    first, last = sampler.samples[0][0], sampler.samples[-1][0]
    assert sampler.summary([(first - 1, last + 1)]) == {
        "samples": 4, "sm_mhz_median": 1620, "sm_mhz_min": 1500, "power_w_median": 665.2,
        "power_capped_share": 0.75, "thermal_or_hw_slowdown_share": 0.25}
    # only the samples inside the windows count: the first alone
    assert sampler.summary([(first - 1, first)])["samples"] == 1
    assert sampler.summary([(last + 1, last + 2)]) is None
    none = GpuSampler(command=os.path.join(str(tmp_path), "no-such-smi"))
    assert none.proc is None and none.samples == [] and none.summary([(0, 1e12)]) is None
    none.close()
    off = GpuSampler(command="")  # TUNELAB_BENCH_GPU_SAMPLE=0: nothing started
    assert off.proc is None and off.summary([(0, 1e12)]) is None


def test_host_clock_counts_every_thread_in_process_time():
    """bench.HostClock: lap() gives (wall, this thread's CPU, the process's CPU) since reset(); CPU burnt by
    another thread (as autograd's CUDA device thread runs the backward) shows in the process figure only."""
    import threading
    import time

    from tunelab.bench import HostClock

    def burn(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    clock = HostClock()
    worker = threading.Thread(target=burn, args=(0.3,))
    worker.start()
    worker.join()
    wall, thread, process = clock.lap()
    assert thread < 0.1 and process >= 0.3 and wall >= 0.3
    clock.reset()
    burn(0.2)
    wall, thread, process = clock.lap()
    assert thread >= 0.2 and process >= thread and wall >= 0.2


def test_host_link_probe_is_none_off_cuda_and_two_rates_on_it():
    import torch

    from tunelab.bench import host_link

    rates = host_link(mib=8, reps=1)
    if not torch.cuda.is_available():
        assert rates is None
    else:
        assert set(rates) == {"d2h", "h2d"} and all(r > 0 for r in rates.values())
