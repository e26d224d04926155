"""Tensor-parallel ranks on torch.distributed: rank 0 is the engine (it schedules and samples), every
other rank is a worker that runs each model step rank 0 broadcasts (ModelRunner.forward on its shard).

    one node      rank 0 starts ranks 1..N-1 itself (torch.multiprocessing, spawn) over a TCPStore on a
                  port the OS picks: two engines on one host never share a port or a name
    several       the same command on every node, with torch.distributed's usual environment: torchrun's
                  RANK / WORLD_SIZE / LOCAL_RANK (one process a rank), or MASTER_ADDR, MASTER_PORT, NNODES
                  and NODE_RANK (each node starts its N / NNODES ranks); rank 0 serves, the others work

The collectives run on process groups built over the store, not on torch.distributed's default group,
so engines in one process never collide either: gloo carries the tensors on CPU, NCCL on GPU. The
step's inputs (a pickled StepInputs) go through shared memory when the group is on one node (Mailbox),
else over gloo. Faults: rank 0 watches the workers it started and
fails the engine when one dies; a collective waits at most COLLECTIVE_TIMEOUT_S for a rank that hangs;
a worker whose parent is gone exits.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("gpt_engine.worker.tensor_parallel")
COLLECTIVE_TIMEOUT_S = 30.0   # how long a rank waits at a collective for one that hangs
STORE_TIMEOUT_S = 300.0      # how long ranks wait for each other at start (loading the model included)


class Comm:
    """A tensor-parallel group's collectives: all_reduce and all_gather of tensors on the model's device,
    broadcast_object of a step's inputs from rank 0, min of an int (the KV pool's size)."""

    def __init__(self, store, rank: int, world: int, device: torch.device, mailbox: "Mailbox | None" = None):
        self.rank, self.world, self.mailbox = rank, world, mailbox
        # one thread, so that close() knows when it is done (collectives are waited on one at a time anyway)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout, opts._threads = timedelta(seconds=COLLECTIVE_TIMEOUT_S), 1
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        self.host = dist.ProcessGroupGloo(dist.PrefixStore("host", store), rank, world, opts)
        self.dev = self.host if device.type != "cuda" else \
            dist.ProcessGroupNCCL(dist.PrefixStore("dev", store), rank, world)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.dev.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dev.allgather([parts], [t]).wait()
        return torch.cat(parts, -1)

    def broadcast_object(self, obj=None):
        """Rank 0's obj on every rank (rank 0 passes it, the others get it back): through the node's
        mailbox when there is one and it fits, else over gloo."""
        box = self.mailbox
        if box is not None:
            if self.rank == 0:
                data = pickle.dumps(obj)
                if box.put(data):
                    return obj
                return self._broadcast_bytes(data) and obj
            data = box.get()
            return pickle.loads(data) if data is not None else pickle.loads(self._broadcast_bytes(b""))
        data = self._broadcast_bytes(pickle.dumps(obj) if self.rank == 0 else b"")
        return obj if self.rank == 0 else pickle.loads(data)

    def _broadcast_bytes(self, data: bytes) -> bytes:
        n = torch.tensor([len(data)], dtype=torch.long)
        self.host.broadcast(n, 0).wait()
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else \
            torch.empty(int(n), dtype=torch.uint8)
        self.host.broadcast(buf, 0).wait()
        return data if self.rank == 0 else buf.numpy().tobytes()

    def close(self) -> None:
        """Every rank calls this after the last step. Gloo's thread lets go of a collective's tensors a
        moment after the collective returns, and takes the GIL to do so; should that moment come while the
        interpreter exits, the process aborts. So the last collective waits, the GIL released, until the
        thread has let go (one thread runs them in order: it let go of every earlier one first)."""
        t = torch.zeros(1)
        self.host.allreduce([t]).wait()
        deadline = time.monotonic() + 5.0
        while t._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)

    def min(self, v: int) -> int:
        t = torch.tensor([v], dtype=torch.long)
        self.host.allreduce([t], dist.ReduceOp.MIN).wait()
        return int(t)


class Mailbox:
    """One node's step broadcast: rank 0 writes the pickled inputs into shared memory (a name the OS makes)
    and releases each worker's semaphore; a worker acquires its semaphore, then reads. A semaphore, not an
    Event: Event.set takes a lock that a worker stopped inside Event.wait would hold forever, where a
    release never blocks, so a hung worker fails the step at the collective timeout. Rank 0 writes the next
    one only after the step's collectives, which every worker reaches after reading this one. What does
    not fit (a huge batch) goes over gloo, the mailbox saying so."""
    SIZE = 8 << 20

    def __init__(self, shm, signals, index: int | None = None):
        self.shm, self.signals, self.index = shm, signals, index

    @classmethod
    def create(cls, ctx, workers: int) -> "Mailbox":
        from multiprocessing.shared_memory import SharedMemory
        return cls(SharedMemory(create=True, size=cls.SIZE), [ctx.Semaphore(0) for _ in range(workers)])

    def for_worker(self, i: int) -> tuple:
        return self.shm.name, self.signals[i]

    @classmethod
    def attach(cls, name: str, signal) -> "Mailbox":
        from multiprocessing.shared_memory import SharedMemory
        return cls(SharedMemory(name=name), [signal], 0)

    def put(self, data: bytes) -> bool:
        fits = len(data) <= self.SIZE - 8
        buf = self.shm.buf
        buf[:8] = (len(data) if fits else -1).to_bytes(8, "little", signed=True)
        if fits:
            buf[8:8 + len(data)] = data
        for s in self.signals:
            s.release()
        return fits

    def get(self) -> bytes | None:
        self.signals[0].acquire()
        n = int.from_bytes(self.shm.buf[:8], "little", signed=True)
        return bytes(self.shm.buf[8:8 + n]) if n >= 0 else None

    def close(self) -> None:
        self.shm.close()
        if self.index is None:
            self.shm.unlink()


# ---------------------------------------------------------------- where this process stands

def placement(world: int) -> tuple[int, int, int, str, int | None]:
    """-> (this process's first rank, ranks to run on this node, node's first local device index, store
    host, store port or None: pick one) from the environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun: one process a rank
        if int(env["WORLD_SIZE"]) != world:
            raise ValueError(f"WORLD_SIZE {env['WORLD_SIZE']} is not tensor_parallel_size {world}")
        return int(env["RANK"]), 1, int(env.get("LOCAL_RANK", 0)), env["MASTER_ADDR"], int(env["MASTER_PORT"])
    nnodes = int(env.get("NNODES", "1"))
    if nnodes > 1:
        if world % nnodes:
            raise ValueError(f"NNODES {nnodes} must divide tensor_parallel_size {world}")
        missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"a multi-node engine (NNODES={nnodes}) needs {', '.join(missing)} in the environment")
        node, per = int(env["NODE_RANK"]), world // nnodes
        if not 0 <= node < nnodes:
            raise ValueError(f"NODE_RANK {node} is not in [0, NNODES={nnodes})")
        return node * per, per, 0, env["MASTER_ADDR"], int(env["MASTER_PORT"])
    return 0, world, 0, "127.0.0.1", None


def _device(device: torch.device, local: int) -> torch.device:
    return torch.device("cuda", local) if device.type == "cuda" else device


def _cpu_threads(world: int) -> None:
    # the ranks of one node share its cores (unless the user set OMP_NUM_THREADS)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


class Workers:
    """The ranks this process started (rank 0's or a node's), watched: on_death(err) is called once if one
    dies before close()."""

    def __init__(self, procs, mailbox: Mailbox | None = None):
        self.procs, self.mailbox, self.closing, self.on_death = procs, mailbox, False, None
        self.failed: BaseException | None = None
        if procs:
            threading.Thread(target=self._watch, name="gpt-engine-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        from multiprocessing.connection import wait
        ready = wait([p.sentinel for p in self.procs])
        if self.closing:
            return
        p = next(p for p in self.procs if p.sentinel in ready)
        p.join(1.0)  # its exit code (the sentinel closes a moment before the process is reaped)
        self.failed = RuntimeError(f"tensor-parallel worker {p.name} died (exit code {p.exitcode})")
        log.error("%s", self.failed)
        if self.on_death is not None:
            self.on_death(self.failed)

    def join(self, timeout: float = 10.0) -> None:
        self.closing = True
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None


def start(world: int, model_path: str, cfg, device: torch.device):
    """This process's part of a tensor-parallel engine -> (Comm, Workers, rank, device). Starts the ranks of
    this node beside this process's own; with rank != 0 the caller runs run_worker instead of an engine."""
    first, local, dev0, host, port = placement(world)
    if device.type == "cpu":
        _cpu_threads(local)
    try:
        store = dist.TCPStore(host, port or 0, world, is_master=first == 0, wait_for_workers=False,
                              timeout=timedelta(seconds=STORE_TIMEOUT_S))
    except RuntimeError as e:  # a port in use, a master that never answers
        raise OSError(f"tensor-parallel rendezvous at {host}:{port or 0} failed: {e}") from None
    ctx = torch.multiprocessing.get_context("spawn")
    # the whole group on this node: the steps go through shared memory
    box = Mailbox.create(ctx, world - 1) if local == world and world > 1 else None
    procs = []
    for i in range(1, local):
        p = ctx.Process(target=_worker_main, name=f"rank {first + i}", daemon=True,
                        args=(model_path, cfg, first + i, world, local, host, store.port, _device(device, dev0 + i),
                              os.getpid(), box.for_worker(i - 1) if box else None))
        p.start()
        procs.append(p)
    dev = _device(device, dev0)
    try:
        _await_ranks(store, procs)
    except BaseException:
        if box is not None:
            box.close()
        raise
    return Comm(store, first, world, dev, box), Workers(procs, box), first, dev


def _await_ranks(store, procs) -> None:
    """Until the started ranks reach the store: one that dies first (a bad argument, an import error) is
    an error now, not a rendezvous timeout later."""
    keys = [f"ready/{p.name}" for p in procs]
    deadline = time.monotonic() + STORE_TIMEOUT_S
    while not store.check(keys):
        dead = next((p for p in procs if not p.is_alive()), None)
        if dead is not None or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise RuntimeError(f"tensor-parallel worker {(dead or procs[0]).name} "
                               + (f"exited with code {dead.exitcode} while starting" if dead else "did not start"))
        time.sleep(0.05)


def _worker_main(model_path, cfg, rank, world, local, host, port, device, parent, mailbox) -> None:
    def orphaned():  # the engine was killed: nobody will tell this rank to stop
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    if device.type == "cpu":
        _cpu_threads(local)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    store.set(f"ready/rank {rank}", "1")
    run_worker(Comm(store, rank, world, device, Mailbox.attach(*mailbox) if mailbox else None), model_path, cfg,
               device)


def run_worker(comm: Comm, model_path, cfg, device) -> None:
    """A worker rank: its shard of the model and KV pool, then every step rank 0 broadcasts until it
    broadcasts None."""
    from ..llm import build_model, build_runner
    from ..models.parallel import TPGroup
    model = build_model(model_path, cfg, device, TPGroup(comm.rank, comm.world, comm))[0]
    runner = build_runner(model, cfg, eos_token_ids=())
    while (step := comm.broadcast_object()) is not None:
        runner.forward(step)
    comm.close()
