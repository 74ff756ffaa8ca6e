"""`ExecutorSpec`: what a render's ranks are started for, read from the request once. Two posters whose specs are
equal can share the same ranks, so it is also the key of a batch's pool (`renderer.executor.pool.Executors`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from renderer.models.lora import lora_identity
from renderer.plan.request import RenderRequest


@dataclass(frozen=True)
class ExecutorSpec:
    model: str
    model_config: str | None = None
    dtype: str | None = None  # default: float16 on a GPU, float32 on the CPU
    device: str | None = "cpu"  # of a rank in this process; None for a gang (--gpus-per-worker says where it runs)
    motion_adapter: str | None = None  # a clip's motion modules (`renderer.models.motion`)
    lora_digests: tuple = ()  # (sha256, scale) of each LoRA fused into the ranks' weights, in order
    workers: int = 0  # 0: one rank in this process; N: a Ray gang of N
    address: str | None = None  # a Ray cluster to join; None starts (or joins) a local one
    gpus_per_worker: float | None = None  # None: 1 if the cluster has a GPU per worker, else CPU workers
    collective_timeout_s: float = 1800.0  # above the longest denoising step (16K: ~45 s) and rank 0's base stage
    loras: tuple = field(default=(), compare=False)  # (path, scale): the files of `lora_digests`
    queue_timeout_s: float | None = field(default=None, compare=False)  # how long a new gang waits; None: as long as it takes

    @classmethod
    def of(cls, request: RenderRequest) -> "ExecutorSpec":
        return cls(
            model=request.model, model_config=request.model_config, dtype=request.dtype,
            device=None if request.workers else request.device, motion_adapter=request.motion_adapter,
            lora_digests=tuple((entry["sha256"], entry["scale"]) for entry in lora_identity(request.loras)),
            workers=request.workers, address=request.address, gpus_per_worker=request.gpus_per_worker,
            collective_timeout_s=request.collective_timeout_s, loras=tuple(request.loras), queue_timeout_s=request.queue_timeout_s,
        )

    def describe(self) -> str:
        where = f"on {self.workers} workers" if self.workers else f"in this process on {self.device}"
        return f"--model {self.model}{f' --dtype {self.dtype}' if self.dtype else ''} {where}"
