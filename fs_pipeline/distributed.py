"""Training on several GPUs: one process per GPU, started by torchrun, with PyTorch's DistributedDataParallel.

    torchrun --standalone --nproc-per-node 4 finetune_tts.py --project P --data-dir training_data/NAME --train

torchrun gives each process RANK, WORLD_SIZE and LOCAL_RANK in its environment; `session` reads them (so does
finetune_tts.py, for RANK alone, to keep the other processes quiet before torch is imported) and joins the processes into a group: NCCL between CUDA GPUs on Linux, gloo on the
CPU and on Windows, where NCCL does not exist. Without torchrun the run is the world-size-1 case of the
same code: no process group, and every helper here answers as for one process.

Rank 0 alone writes into the project; the others wait for it (`follow`) while it runs the stages before
training, then all train together, and only rank 0 goes on to merge.
"""

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from fs_pipeline import PipelineError
from fs_pipeline.device import DeviceChoice, on_local_gpu

# How long a collective of training may wait for a process before the group gives up: long enough for rank 0
# to save a checkpoint and score its test clips while the others wait in the next step's all-reduce.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long the other processes wait for rank 0 to run the stages before training alone (prepare, extract and
# pack of a large dataset take hours). A dead rank 0 ends them at once anyway: torchrun stops the whole group.
FOLLOW_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    follow_group: object = field(default=None, compare=False, repr=False)  # see lead and follow

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def backend(device: torch.device) -> str:
    """NCCL between CUDA GPUs, except on Windows (no NCCL there); gloo on the CPU."""
    return "nccl" if device.type == "cuda" and sys.platform != "win32" else "gloo"


def world_from_environment(environ=os.environ) -> World:
    """The World torchrun describes in the environment, or SINGLE outside torchrun."""
    if "WORLD_SIZE" not in environ:
        return SINGLE
    try:
        return World(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    except (KeyError, ValueError) as e:
        raise PipelineError(f"WORLD_SIZE is set, but RANK or LOCAL_RANK is missing or not a number ({e}): start several processes "
                            "with torchrun, or unset WORLD_SIZE") from e


@contextmanager
def session(choice: DeviceChoice):
    """Join torchrun's process group for the length of a run; yields (World, this process's DeviceChoice: on CUDA,
    the GPU numbered LOCAL_RANK). Outside torchrun: (SINGLE, `choice`) and no group."""
    world = world_from_environment()
    if world.size == 1:
        yield world, choice
        return
    if choice.type == "mps":
        raise PipelineError("several training processes need CUDA GPUs or the CPU, and this run is on MPS: run it without torchrun")
    if choice.type == "cuda":
        choice = on_local_gpu(choice, world.local_rank)
        torch.cuda.set_device(choice.device)
    dist.init_process_group(backend(choice.device), rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT,
                            device_id=choice.device if choice.type == "cuda" else None)
    try:
        # gloo whatever the device: waiting for rank 0 moves a few bytes, and an NCCL collective would time out
        world = replace(world, follow_group=dist.new_group(backend="gloo", timeout=FOLLOW_TIMEOUT))
        yield world, choice
    finally:
        dist.destroy_process_group()


@contextmanager
def leading(world: World):
    """Rank 0's part of a run. The block gets `tell(outcome)`, which tells the other processes, once, how the
    stages before training went: "train" (join it now) or "done" (nothing to train). Left without telling,
    the block tells "done", or on an error, the error's line, which the others raise too (see follow)."""
    told = False

    def tell(outcome: str) -> None:
        nonlocal told
        if not told and world.size > 1:
            _broadcast(world, outcome)
        told = True

    try:
        yield tell
    except PipelineError as e:
        tell(str(e))
        raise
    except BaseException as e:
        tell(f"the first training process stopped ({type(e).__name__}) before training: see its output")
        raise
    tell("done")


def follow(world: World) -> str:
    """Ranks other than 0: wait for rank 0's outcome (see leading) and return it; an error line there is raised here."""
    outcome = _broadcast(world, None)
    if outcome not in ("train", "done"):
        raise PipelineError(outcome)
    return outcome


def _broadcast(world: World, outcome: str | None) -> str:
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=world.follow_group)
    return box[0]


def agree_on_signal(signal_number: int, world: World, device: torch.device) -> int:
    """The highest signal number any process caught (0: none), the same answer on every rank, so that all stop
    after the same step: a Ctrl+C reaches every process, but not at the same moment of its step."""
    if world.size == 1:
        return signal_number
    flag = torch.tensor([signal_number], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """`values` summed over the processes, in place (itself for one process)."""
    if world.size > 1:
        dist.all_reduce(values)
    return values


def wrap(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` on several processes, which all-reduces the gradients of its
    trainable parameters (the adapters; the frozen base has none) during backward. `module` itself for one."""
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers off: the buffers (RoPE tables, causal masks) are constants, the same on every rank, and
    # sending them before every forward would cost more than the adapters' gradients
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
                                   gradient_as_bucket_view=True)


def no_sync(module: torch.nn.Module):
    """Context for a micro-batch whose gradients are only accumulated: DDP all-reduces at the step's last one."""
    return module.no_sync() if hasattr(module, "no_sync") else nullcontext()


def torchrun_command(script: str, argv: list[str], gpus: int) -> list[str]:
    """The command that runs `script` with the same arguments, less `--gpus N`, as `gpus` processes under torchrun
    on this machine, with this Python (torchrun is torch's own module, so no other launcher needs to be on PATH)."""
    if gpus < 1:
        raise PipelineError(f"--gpus must be at least 1 (got {gpus})")
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), script, *args]
