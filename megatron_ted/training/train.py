"""Pretraining: build layout/model/data/optimizer from the typed configuration, run the loop, log
like Megatron. The flags are read above, at the CLI edge (launch/pretrain.py, config/from_flags.py).

    train(configs_from_args(args), tokenizer, flops_per_token)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import torch
import torch.distributed as dist

from megatron_ted.data.gpt_data import (build_train_valid_test_datasets, check_batch_token_ids,
                                         train_valid_test_num_samples)
from megatron_ted.data.sampler import build_pretraining_data_loader
from megatron_ted.training.upcycle import upcycle_and_save
from megatron_ted.model.builder import build_model
from megatron_ted.parallelize import parallelize, parallelize_after_load
from megatron_ted.parallelize.cuda_graphs import release_layer_fronts
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups, init_process_group
from megatron_ted.pipeline.schedule import PipelineRunner, pipeline_forward_backward
from megatron_ted.pipeline.stage import build_pipeline_model
from megatron_ted.tensor_parallel import fp8
from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.config.run import RunConfig
from megatron_ted.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from megatron_ted.training.distillation import Distillation, build_teacher, check_teacher
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.lr_schedule import learning_rate
from megatron_ted.training.manual_gc import ManualGC
from megatron_ted.training.megatron_log import MegatronLog, memory_report, print_rank0
from megatron_ted.training.loss_scaler import DynamicLossScaler, StaticLossScaler
from megatron_ted.training.profiling import StepProfiler
from megatron_ted.training.save_dir import hold_save_dir
from megatron_ted.training.tiled_optimizer import TiledAdamW
from megatron_ted.training.step import forward_backward


class NonFiniteLossError(RuntimeError):
    """The loss or (without fp16 loss scaling) the gradient norm of a step is NaN or Inf
    (--check-for-nan-in-loss-and-grad); every rank sees the same reduced loss and norm, so every rank
    raises it at the same iteration."""


def init_distributed(parallel: ParallelConfig) -> torch.device:
    use_cuda = torch.cuda.is_available() and parallel.distributed_backend != "gloo"
    return init_process_group(use_cuda, parallel.distributed_backend, parallel.distributed_timeout_minutes)


def _micro_batches(iterator, n: int, device, first_key: int | None = None, dp_rank: int = 0,
                   dp_size: int = 1, vocab_size: int | None = None, where: str = "") -> list[dict]:
    """This rank's n micro-batches. With first_key (training), each gets its routing seed: the
    sampler gives micro-step i of DP rank d the (i * dp_size + d)-th micro-batch of the global
    batch, so first_key + i * dp_size + d names the same samples in every layout. With vocab_size,
    each one's ids are checked on the host first (check_batch_token_ids)."""
    out = []
    for i in range(n):
        mb = next(iterator)
        if vocab_size is not None:
            check_batch_token_ids(mb, vocab_size, f"{where}, micro-batch {i + 1} of {n}, rank {dist.get_rank()}")
        mb = {k: v.to(device) for k, v in mb.items()}
        if first_key is not None:
            mb["routing_seed"] = first_key + i * dp_size + dp_rank
        out.append(mb)
    return out


@contextlib.contextmanager
def capacity_factor(model, factor: float | None):
    """Every router's capacity factor set to `factor` inside the block (--moe-eval-capacity-factor)."""
    routers = [m for m in model.modules() if isinstance(getattr(m, "config", None), RouterConfig)]
    saved = [m.config for m in routers]
    for m in routers:
        m.config = dataclasses.replace(m.config, capacity_factor=factor)
    try:
        yield
    finally:
        for m, config in zip(routers, saved):
            m.config = config


def evaluate(model, loader_iter, groups, device, eval_iters: int, num_micro_batches: int,
             eval_capacity_factor: float | None = None, vocab_size: int | None = None, where: str = "",
             runner: PipelineRunner | None = None) -> float:
    """The mean token loss over `eval_iters` batches of `num_micro_batches` micro-batches, the routers
    at `eval_capacity_factor` (--moe-eval-capacity-factor; None: their training capacity)."""
    with capacity_factor(model, eval_capacity_factor) if eval_capacity_factor is not None else contextlib.nullcontext():
        return _evaluate(model, loader_iter, groups, device, eval_iters, num_micro_batches, vocab_size, where, runner)


def _evaluate(model, loader_iter, groups, device, eval_iters: int, num_micro_batches: int,
              vocab_size: int | None = None, where: str = "", runner: PipelineRunner | None = None) -> float:
    """Pipelined (runner): forward only through the schedule; the last stage holds the sums, the
    pipeline's all-reduce hands them to every rank."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(eval_iters):
            mbs = _micro_batches(loader_iter, num_micro_batches, device, vocab_size=vocab_size,
                                 where=f"{where}, evaluation batch {i + 1}")
            if runner is not None:
                total += runner.eval_loss_sum(mbs)
                count += float(sum(mb["loss_mask"].sum() for mb in mbs)) if runner.model.last else 0.0
                continue
            for mb in mbs:
                out = model(mb["tokens"], mb["position_ids"], mb["labels"])
                total += float((out.loss * mb["loss_mask"]).sum())
                count += float(mb["loss_mask"].sum())
    model.train()
    t = torch.tensor([total, count], dtype=torch.float64, device=device)
    from megatron_ted.parallel import comm
    if runner is not None:
        comm.all_reduce(t, groups.pp)
    comm.all_reduce(t, groups.dp)
    return (t[0] / t[1]).item()


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sp_seed_offset(run: RunConfig, groups) -> int:
    """Dropout seed offset of this TP rank under --sequence-parallel (0 otherwise)."""
    return 7919 * groups.tp.rank if run.parallel.sequence_parallel else 0


def train(run: RunConfig, tokenizer, flops_per_token: float) -> dict:
    """Train the model of `run` (config/from_flags.py configs_from_args). flops_per_token: the
    model's training FLOPs per token, for the log's TFLOP/s and MFU (the entry point,
    launch/pretrain.py, passes it)."""
    start_time = time.time()
    device = init_distributed(run.parallel)
    groups = ParallelGroups.create(run.parallel.layout)
    save = run.training.checkpoint.save
    # one run per --save, before any heavy work; the lock is dropped however the run ends
    save_lock, notes = hold_save_dir(save, groups) if save else (None, [])
    try:
        for note in notes:
            print_rank0(note)
        return _train(run, tokenizer, device, groups, start_time, flops_per_token)
    finally:
        if save_lock is not None:
            save_lock.release()


def _train(run: RunConfig, tokenizer, device, groups, start_time: float, flops_per_token: float) -> dict:
    print_rank0(run.parallel.layout.table())
    model, dtype = build_parallel_model(run, groups, device)
    sync, optimizer = build_optimizer(run, model, groups)
    runner = None if run.parallel.pipeline is None else PipelineRunner(
        model, groups, run.training.schedule.num_micro_batches, run.parallel.pipeline_schedule,
        run.parallel.sequence_parallel)
    iteration, consumed, rng_state = resume_or_upcycle(run, model, optimizer, groups)  # before the data: fail fast
    schedule = run.training.schedule
    if n := parallelize_after_load(model, run.parallel, schedule.micro_batch_size, schedule.seq_length, dtype,
                                   groups.tp):
        print_rank0(f" > CUDA graphs: the fronts ({' + '.join(run.parallel.cuda_graph_scope)}) of {n} layers captured")
    distill = _distillation(run, tokenizer, groups, device, dtype, iteration)
    train_iter, valid_iter = build_data(run, tokenizer, groups, iteration, consumed)
    restore_or_reseed_rng(run, groups, iteration, rng_state)   # after the loaders, which draw a seed
    log = _megatron_log(run, device, dist.get_rank(), flops_per_token)
    loop = _Loop(run, model, optimizer, sync, runner, distill, groups, device, tokenizer, log, consumed, start_time)
    it = loop.run(iteration, train_iter, valid_iter)
    if log.writer is not None:
        log.writer.close()
    loop.collector.close()
    release_layer_fronts(model.layers)
    dist.barrier()
    dist.destroy_process_group()
    return {"losses": loop.history, "iteration": it}


def build_parallel_model(run: RunConfig, groups, device) -> tuple[torch.nn.Module, torch.dtype]:
    """This rank's model (its pipeline chunks under PP), parallelized, in the run's precision; the
    dropout streams seeded."""
    split = run.parallel.pipeline   # --pipeline-model-parallel-size > 1 (megatron_ted/pipeline/)
    if split is not None:
        model = build_pipeline_model(run.model.gpt, run.model.moe, groups, run.model.seed, split).to(device)
    else:
        model = build_model(run.model, groups).to(device)
    if fp8_note := fp8.startup_note(run.parallel.fp8, device):
        print_rank0(fp8_note)
    for chunk in getattr(model, "chunks", [model]):   # each pipeline stage of this rank, or the model
        parallelize(chunk, run.parallel, groups.tp)
    dtype = _DTYPES[run.training.precision.dtype]
    model.to(dtype)
    if run.parallel.compile_layers:
        print_rank0(f" > torch.compile (inductor): {len(model.layers)} layers, compiled at their first call")
    # Dropout: identical over TP (replicated activations), different over data-parallel replicas.
    # With --sequence-parallel no activation is TP-replicated: every TP rank gets its own stream.
    torch.manual_seed(run.model.seed + 1000 * groups.dp.rank + _sp_seed_offset(run, groups))
    n_params = sum(p.numel() for p in model.parameters())
    print_rank0(f" > parameters on rank 0: {n_params:,} (vocab padded to {run.model.gpt.vocab_size})")
    if run.model.moe is not None:   # top-k and MoE layers as resolved, and whose defaults (training/deepspeed_moe.py)
        print_rank0(moe_summary(run))
    if run.model.moe is not None and run.model.moe.router.force_load_balancing:
        print_rank0("WARNING: --moe-router-force-load-balancing routes every token to random experts "
                    "(a benchmark of balanced load); the model does not learn its routing")
    return model, dtype


def moe_summary(run: RunConfig) -> str:
    """The start-up line: the top-k and MoE layers this run uses, and which defaults set them."""
    gpt = run.model.gpt
    line = f" > MoE: top-{run.model.moe.router.topk} routing, MoE layers {list(gpt.moe_layers)} (0-based) of {gpt.num_layers}"
    return line + (f"; {run.moe_defaults_from}" if run.moe_defaults_from else "")


def build_optimizer(run: RunConfig, model, groups) -> tuple[GradientSync, TiledAdamW]:
    """The gradient sync (--use-distributed-optimizer: reduce-scattered gradients, partitioned state:
    ZeRO-1) and the tiled AdamW with its fp16 loss scaler."""
    par, opt, precision = run.parallel, run.training.optimizer, run.training.precision
    sync = GradientSync(model, groups.dp, groups.expert_dp, overlap=par.overlap_grad_reduce,
                        reduce_scatter=par.distributed_optimizer, tp=groups.tp if par.sequence_parallel else None,
                        gradient_accumulation_fusion=par.gradient_accumulation_fusion)
    scaler = None
    if precision.dtype == "fp16":
        scaler = StaticLossScaler(precision.loss_scale) if precision.loss_scale else DynamicLossScaler(
            precision.initial_loss_scale, precision.loss_scale_window, precision.min_loss_scale, precision.hysteresis)
    optimizer = TiledAdamW(model, sync, groups.tp, groups.dp, lr=opt.lr, weight_decay=opt.weight_decay,
                           betas=opt.betas, eps=opt.eps, clip_grad=opt.clip_grad, loss_scaler=scaler,
                           tile_size=opt.tile_size, offload_fraction=opt.offload_fraction,
                           offload_policy=opt.offload_policy, pp=groups.pp)
    state = optimizer.state_numel()
    print_rank0(f" > optimizer: AdamW, {'partitioned over DP / expert-DP' if par.distributed_optimizer else 'replicated'}"
                f", tiles of {opt.tile_size or 'the whole partition'} elements; state on rank 0: "
                f"{4 * state.get('dense', 0) / 2**20:.1f} MiB dense, {4 * state.get('expert', 0) / 2**20:.1f} MiB expert")
    if opt.cpu_offload:
        host = optimizer.state_numel(host=True)
        print_rank0(f" > optimizer offload ({opt.offload_policy}, fraction {opt.offload_fraction:g}): "
                    f"state in host memory on rank 0: {4 * host.get('dense', 0) / 2**20:.1f} MiB dense, "
                    f"{4 * host.get('expert', 0) / 2**20:.1f} MiB expert")
    return sync, optimizer


def resume_or_upcycle(run: RunConfig, model, optimizer, groups) -> tuple[int, int, dict | None]:
    """(iteration, consumed samples, RNG state to set once the loaders exist): a dense --load becomes
    this MoE (--moe-use-upcycling, training/upcycle.py), or --load resumes."""
    if run.training.upcycling is not None:
        upcycle_and_save(run, model, optimizer, groups)
        return 0, 0, None
    return _resume(run, model, optimizer, groups)


def build_data(run: RunConfig, tokenizer, groups, iteration: int, consumed: int):
    """(train, validation) batch iterators; on a resume they start at the consumed samples (validation
    at the evaluations done so far). None past --train-iters, and validation None without evaluation."""
    schedule, logging, data = run.training.schedule, run.training.logging, run.training.data
    train_ds, valid_ds, _ = build_train_valid_test_datasets(
        data.data_path, data.split, schedule.seq_length, run.model.seed, tokenizer,
        train_valid_test_num_samples(schedule.train_iters, logging.eval_interval or 0, logging.eval_iters,
                                     schedule.global_batch_size),
        mock=data.mock_data, data_cache_path=data.data_cache_path)
    if iteration >= schedule.train_iters:
        return None, None
    mb, workers = schedule.micro_batch_size, data.num_workers
    train_iter = iter(build_pretraining_data_loader(train_ds, consumed, mb, groups.dp.rank, groups.dp.size, workers))
    valid_iter = None
    if valid_ds is not None and logging.eval_interval:
        consumed_valid = (iteration // logging.eval_interval) * logging.eval_iters * schedule.global_batch_size
        valid_iter = iter(build_pretraining_data_loader(valid_ds, consumed_valid, mb, groups.dp.rank,
                                                        groups.dp.size, workers))
    return train_iter, valid_iter


def restore_or_reseed_rng(run: RunConfig, groups, iteration: int, rng_state: dict | None) -> None:
    """The RNG continues where the checkpoint left it; fresh dropout streams where it cannot."""
    if rng_state is not None:
        set_rng_state(rng_state)
    sp = _sp_seed_offset(run, groups)
    if iteration > 0 and (rng_state is None or sp):
        # not restored (--no-load-rng, or another DP size), or a TP rank > 0 under --sequence-parallel
        # (checkpoints hold TP rank 0's states only): fresh dropout streams
        torch.manual_seed(run.model.seed + 1000 * groups.dp.rank + 1_000_003 * iteration + sp)


def _megatron_log(run: RunConfig, device, rank: int, fpt: float) -> MegatronLog:
    """The iteration log, with the FLOPs of a step and (on the last rank) TensorBoard."""
    schedule, logging, layout = run.training.schedule, run.training.logging, run.parallel.layout
    tokens_per_step = schedule.global_batch_size * schedule.seq_length
    writer = None
    if logging.tensorboard_dir and rank == layout.world_size - 1:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(logging.tensorboard_dir, max_queue=logging.tensorboard_queue_size)
    return MegatronLog(schedule, logging, layout, fpt * tokens_per_step, device, writer, len(run.model.gpt.moe_layers))


class _Loop:
    """The training iterations: each runs, is checked and logged, and may evaluate, save or stop."""

    def __init__(self, run: RunConfig, model, optimizer, sync, runner, distill, groups, device, tokenizer,
                 log: MegatronLog, consumed: int, start_time: float):
        self.config, self.model, self.optimizer, self.sync = run, model, optimizer, sync
        self.runner, self.distill, self.groups, self.device, self.tokenizer = runner, distill, groups, device, tokenizer
        self.log, self.consumed, self.start_time = log, consumed, start_time
        self.rank = dist.get_rank()
        self.profiler = StepProfiler(run.training.profile, self.rank, device)
        gc = run.training.manual_gc
        self.collector = ManualGC(gc.enabled, gc.interval, gc.around_eval)
        self.memory_reported = False      # after the first logged iteration (a resume may start off the interval)
        self.history: list[float] = []

    def run(self, iteration: int, train_iter, valid_iter) -> int:
        """Iterations iteration + 1 ... --train-iters (or until an exit flag); returns the last one."""
        train_iters, save = self.config.training.schedule.train_iters, self.config.training.checkpoint.save
        last_saved, it = None, iteration
        self.model.train()
        if iteration >= train_iters:
            print_rank0(f" > the checkpoint is at iteration {iteration}, --train-iters is {train_iters}: "
                        f"nothing to train")
        for it in range(iteration + 1, train_iters + 1):
            lr, result = self.run_iteration(it, train_iter)
            if it % self.config.training.logging.log_interval == 0:
                self.log_iteration(it, lr, result)
            self.maybe_evaluate(it, valid_iter)
            if self.maybe_save(it):
                last_saved = it
            if self.should_exit(it):
                break
        if save and it > iteration and last_saved != it:
            self.save(it)
        return it

    def run_iteration(self, it: int, train_iter):
        """One step: the micro-batches forward and backward, the optimizer step; (lr, StepResult)."""
        sched, groups, check_nan = self.config.training.schedule, self.groups, self.config.training.check_for_nan
        opt = self.config.training.optimizer
        lr = learning_rate(it - 1, opt.lr, opt.min_lr, sched.lr_warmup_iters, sched.lr_decay_iters, sched.lr_decay_style)
        self.sync.zero_grad()
        groups.stats.reset()
        first_key = (it - 1) * sched.num_micro_batches * groups.dp.size
        mbs = _micro_batches(train_iter, sched.num_micro_batches, self.device, first_key, groups.dp.rank,
                             groups.dp.size, self.tokenizer.vocab_size, f"iteration {it}")
        self.profiler.before(it)
        with torch.profiler.record_function("forward-backward"):
            kd = self.distill.for_iteration(it) if self.distill is not None else None
            if self.runner is not None:
                result = pipeline_forward_backward(self.runner, mbs, groups, self.sync,
                                                   loss_scale=self.optimizer.loss_scale)
            else:
                result = forward_backward(self.model, mbs, groups, self.sync, loss_scale=self.optimizer.loss_scale,
                                          kd=kd)
        if check_nan and not math.isfinite(result.lm_loss):
            # an fp16 overflow in the gradients is a skipped step; a non-finite loss is a diverged run
            raise NonFiniteLossError(f"iteration {it}: the lm loss is {result.lm_loss} on rank {self.rank} "
                                     f"(--check-for-nan-in-loss-and-grad); the run diverged, nothing saved "
                                     f"after it: lower --lr or resume from an earlier checkpoint")
        with torch.profiler.record_function("optimizer-step"):
            applied, result.grad_norm = self.optimizer.step(lr)
        start = time.time()
        table = self.profiler.after(it)
        if table:
            self.log.last += time.time() - start  # the export is not the iteration's time
            print(f" > rank {self.rank}: profile of iterations {self.profiler.start}..{it} in {table}", flush=True)
        self.collector.after_step(it)
        if not applied and self.optimizer.loss_scaler is None and check_nan:
            # no fp16 loss scaling: a NaN/Inf gradient is not an overflow to skip but a broken step
            raise NonFiniteLossError(f"iteration {it}: the gradient norm is NaN or Inf (the loss is finite; "
                                     f"--check-for-nan-in-loss-and-grad); the step was not applied: lower "
                                     f"--lr or resume from an earlier checkpoint")
        if not applied:
            self.log.skipped += 1
            result.grad_norm = None
        self.history.append(result.lm_loss)
        self.consumed += sched.global_batch_size
        return lr, result

    def log_iteration(self, it: int, lr: float, result) -> None:
        self.log.iteration(it, lr, result, self.optimizer.loss_scale, self.groups.stats)
        if not self.memory_reported and self.device.type == "cuda" and self.groups.dp.rank == 0:
            print(memory_report(it, self.rank), flush=True)   # Megatron-LM's line, once, per model-parallel rank
        self.memory_reported = True

    def maybe_evaluate(self, it: int, valid_iter) -> None:
        if valid_iter is None or it % self.config.training.logging.eval_interval != 0:
            return
        self.collector.around_evaluation()
        logging = self.config.training.logging
        loss = evaluate(self.model, valid_iter, self.groups, self.device, logging.eval_iters,
                        self.config.training.schedule.num_micro_batches, logging.eval_capacity_factor,
                        self.tokenizer.vocab_size, f"iteration {it}", self.runner)
        self.collector.around_evaluation()
        print_rank0(f" validation loss at iteration {it} | lm loss value: {loss:.6E} | "
                    f"lm loss PPL: {torch.tensor(loss).exp().item():.6E} |")

    def maybe_save(self, it: int) -> bool:
        """Save on --save-interval; whether it saved."""
        ckpt = self.config.training.checkpoint
        if ckpt.save and ckpt.save_interval and it % ckpt.save_interval == 0:
            self.save(it)
            return True
        return False

    def save(self, it: int) -> None:
        start, save = time.time(), self.config.training.checkpoint.save
        save_checkpoint(save, it, self.model, self.optimizer, self.groups, self.config.flags,
                        consumed_samples=self.consumed, model_config=self.config.model)
        elapsed = time.time() - start
        self.log.last += elapsed  # keep the save out of the next logged iteration time
        print_rank0(f"  successfully saved checkpoint from iteration {it:7d} to {save} "
                    f"[ t {elapsed:.2f}s ]")

    def should_exit(self, it: int) -> bool:
        """--exit-interval, or --exit-duration-in-mins on the slowest rank's clock."""
        ckpt = self.config.training.checkpoint
        if ckpt.exit_interval and it % ckpt.exit_interval == 0:
            print_rank0(f" exiting program at iteration {it} (--exit-interval {ckpt.exit_interval})")
            return True
        if ckpt.exit_duration_in_mins:
            # every rank stops at the same iteration: the slowest clock decides
            done = torch.tensor([time.time() - self.start_time > 60 * ckpt.exit_duration_in_mins], dtype=torch.int32,
                                device=self.device)
            dist.all_reduce(done, op=dist.ReduceOp.MAX)
            if done.item():
                print_rank0(f" exiting program after {(time.time() - self.start_time) / 60:.2f} minutes at "
                            f"iteration {it} (--exit-duration-in-mins {ckpt.exit_duration_in_mins})")
                return True
        return False


def _resume(run: RunConfig, model, optimizer, groups) -> tuple[int, int, dict | None]:
    """--load: (iteration, consumed samples, RNG state to set once the loaders exist)."""
    ckpt = run.training.checkpoint
    if ckpt.load is None:
        return 0, 0, None
    if find_checkpoint(ckpt.load) is None:
        print_rank0(f"WARNING: --load {ckpt.load} holds no checkpoint yet; training from scratch")
        return 0, 0, None
    loaded = load_checkpoint(ckpt.load, model, optimizer, groups, load_optim=ckpt.load_optim,
                             load_rng=ckpt.load_rng, restore_rng=False)
    layout = loaded.metadata["layout"]
    print_rank0(f" > loaded checkpoint {loaded.directory} at iteration {loaded.iteration} "
                f"(consumed samples {loaded.consumed_samples}; written at TP {layout['tp']} EP {layout['ep']} "
                f"DP {layout['dp']}){'' if ckpt.load_optim else '; optimizer state not loaded'}")
    if loaded.rng is None and ckpt.load_rng:
        print_rank0(f" > RNG states not restored: the checkpoint was written at data-parallel size "
                    f"{layout['dp']}, this run has {groups.dp.size}")
    sched, opt, schedule = loaded.metadata.get("scheduler") or {}, run.training.optimizer, run.training.schedule
    current = {"lr": opt.lr, "min_lr": opt.min_lr, "lr_warmup_iters": schedule.lr_warmup_iters,
               "lr_decay_iters": schedule.lr_decay_iters, "lr_decay_style": schedule.lr_decay_style}
    changed = [f"--{k.replace('_', '-')} {sched[k]} -> {v}" for k, v in current.items() if k in sched and sched[k] != v]
    if changed:
        print_rank0(f" > note: the LR schedule differs from the checkpoint's ({', '.join(changed)}); "
                    f"continuing with this run's flags")
    return loaded.iteration, loaded.consumed_samples, loaded.rng


def teacher_checkpoint(run: RunConfig, tokenizer):
    """--kd/--mos: the teacher checkpoint, checked against the student (None without distillation)."""
    config = run.training.distillation
    if config is None:
        return None
    layout = run.parallel.layout
    return check_teacher(config, run.model.gpt.vocab_size, tokenizer.vocab_size, run.training.data.tokenizer_model,
                         layout.tensor_parallel, layout.expert_parallel, run.training.schedule.seq_length)


def _distillation(run: RunConfig, tokenizer, groups, device, dtype, iteration: int) -> Distillation | None:
    """The frozen teacher at this layout, unless KD is off or over (a resume past --kd-stop-iter)."""
    config = run.training.distillation
    if config is None or not config.active(iteration + 1):
        return None
    checkpoint = teacher_checkpoint(run, tokenizer)
    teacher = build_teacher(checkpoint, groups, device, dtype)
    f = checkpoint.flags
    print_rank0(f" > teacher {checkpoint.directory}: {f['num_layers']} layers, hidden {f['hidden_size']}, "
                f"{f.get('num_experts') or 'no'} experts, {sum(p.numel() for p in teacher.parameters()):,} "
                f"parameters on rank 0, frozen; KD loss x {config.beta:g} at temperature {config.temperature:g}"
                + (f" until iteration {config.stop_iter}" if config.stop_iter is not None else ""))
    return Distillation(config, teacher, groups.tp)
