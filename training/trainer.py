"""The one trainer of every model family: AdamW (or Ranger21), warmup + cosine LR, clipping, EMA with
warm-up, validation, bf16 on CUDA, DDP, resume, time limits, progress.

A family (``training/families/``) gives the config, the model and the loss of one batch; everything else
is here. Everything random is a function of (seed, step): the batch order (one seeded permutation per
epoch), the family's noise and dropout. So a run resumed from a checkpoint continues exactly as if it had
never stopped, and ``torchrun --nproc_per_node N`` gives the loss of one process with the whole batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from imadarem.runtime.errors import CheckpointError, DataError, ImadaremError
from imadarem.runtime.registry import tokenizer_from_json, tokenizer_to_json
from imadarem.runtime.tokenizer import resolve_special_ids
from imadarem.training import checkpoint as ckpt_io
from imadarem.training.args import TrainArgs
from imadarem.training.data import (
    encode_file,
    iter_batches,
    resolve_data,
    split_by_molecule,
    split_validation,
)
from imadarem.training.families import LossInput, get_family


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class _CompiledTeacher:
    """The EMA model's ``forward_train`` through torch.compile: the refine objectives run it once a step
    (the block objective over x_t ++ x_0) and eager mode spent that pass launching kernels one by one.
    Only for a model that has ``forward_train`` (the refine family's); the causal family has no teacher pass."""

    def __init__(self, ema: torch.nn.Module):
        self.forward_train = torch.compile(ema.forward_train)


def _step_seed(seed: int, step: int, salt: int) -> int:
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


class Trainer:
    def __init__(self, args: TrainArgs, resume: bool = False, max_new_steps: int | None = None,
                 overrides: dict[str, Any] | None = None):
        self.rank, self.world, self.local_rank = _dist_info()
        self.resume = resume
        self.max_new_steps = max_new_steps
        self.run_dir = Path(args.out_dir)
        if resume:
            args = self._load_run_args(overrides or {})
        self.args = args
        self._validate()
        self.device = self._pick_device()
        self.distributed = self.world > 1
        self._owns_group = False
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self._owns_group = True
        self.is_main = self.rank == 0
        self._stop_requested = False
        self._created = time.perf_counter()

    # -- setup ---------------------------------------------------------------------------------
    def _validate(self) -> None:
        a = self.args
        if a.batch_size < 1 or a.steps < 1:
            raise ImadaremError("--batch-size and --steps must be >= 1")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "val_fraction"):
            value = getattr(a, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ImadaremError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if not (a.device in ("auto", "cpu", "cuda") or (a.device.startswith("cuda:") and a.device[5:].isdigit())):
            raise ImadaremError(f"--device must be auto, cpu, cuda or cuda:N, got {a.device!r}")
        get_family(a.family)
        if a.batch_size % self.world:
            raise ImadaremError(f"--batch-size {a.batch_size} must be divisible by the {self.world} processes")
        if a.optimizer not in ("adamw", "ranger21"):
            raise ImadaremError(f"--optimizer must be 'adamw' or 'ranger21', got {a.optimizer!r}")
        if a.precision not in ("auto", "fp32", "bf16"):
            raise ImadaremError(f"--precision must be auto, fp32 or bf16, got {a.precision!r}")

    RESUMABLE_OVERRIDES = ("steps", "device", "progress", "workers", "cache_dir", "data", "time_limit",
                           "eval_interval", "checkpoint_interval", "log_interval")

    def _load_run_args(self, overrides: dict[str, Any]) -> TrainArgs:
        """The stored arguments of the run; only how long, where and with what display may change."""
        run_json = self.run_dir / "run.json"
        if not run_json.is_file():
            raise CheckpointError(f"nothing to resume in {self.run_dir} (no run.json)")
        try:
            stored = json.loads(run_json.read_text())["args"]
            stored.setdefault("family", "refine")  # runs from before the families
            args = TrainArgs(**stored)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"cannot resume {self.run_dir}: its run.json is not a run record "
                                  f"({type(exc).__name__}: {exc})") from None
        for key, value in overrides.items():
            if key not in self.RESUMABLE_OVERRIDES:
                raise ImadaremError(f"--{key.replace('_', '-')} cannot change when resuming a run")
            if value is not None:
                setattr(args, key, value)
        args.out_dir = str(self.run_dir)
        return args

    def _pick_device(self) -> torch.device:
        want = self.args.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ImadaremError("--device cuda requested but torch sees no CUDA GPU")
            if self.world > 1 or want == "cuda":
                want = f"cuda:{self.local_rank}"
            torch.cuda.set_device(torch.device(want))
        return torch.device(want)

    def _autocast(self):
        use_bf16 = self.args.precision == "bf16" or (self.args.precision == "auto" and self.device.type == "cuda")
        if not use_bf16:
            return None
        return lambda: torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self) -> None:
        a = self.args
        self.ckpt = ckpt_io.load_checkpoint(self.run_dir) if self.resume else None
        self.family = get_family(a.family)
        if self.ckpt is None and not a.init_from and dict(a.model).get("freeze_trunk"):
            raise ImadaremError("--set freeze_trunk=true trains heads on a trained trunk: give it with --init-from")
        init = self._init_checkpoint() if a.init_from and self.ckpt is None else None
        tokenizer = tokenizer_from_json(init.state["tokenizer"]) if init is not None else a.tokenizer
        data = encode_file(resolve_data(a.data, a.cache_dir), a.data_format, tokenizer, a.tokenizer_file,
                           a.cache_dir, a.workers, writings=a.writings, seed=a.seed)
        self.tokenizer = data.tokenizer
        if self.ckpt is not None and tokenizer_to_json(self.tokenizer) != self.ckpt.state["tokenizer"]:
            raise CheckpointError(f"{a.data} no longer gives the tokenizer this run was trained with")
        self.special = resolve_special_ids(self.tokenizer)
        if self.ckpt is not None:
            self.config = self.family.config_from_dict(self.ckpt.state["config"])
        elif init is not None:  # its shapes, with this run's training knobs (dropout, objective) on top
            self.config = self.family.config_from_dict({**init.state["config"], **a.model})
        else:
            self.config = self.family.make_config(self.tokenizer.vocab_size, dict(a.model))
        length = self.family.max_seq_len(self.config)
        packed, too_long, molecules = data.pack_with_molecules(length)
        if a.val_data:
            val = encode_file(resolve_data(a.val_data, a.cache_dir), a.data_format, self.tokenizer, None, a.cache_dir,
                              a.workers)
            self.train_data, self.val_data = packed, val.pack(length)[0]
        elif molecules is not None:
            self.train_data, self.val_data = split_by_molecule(packed, molecules, a.val_fraction, a.seed)
        else:
            self.train_data, self.val_data = split_validation(packed, a.val_fraction, a.seed)
        if len(self.train_data) == 0:
            raise DataError(f"{a.data}: no sequence fits max_seq_len {length}")
        self.data_hash = data.source_hash
        self.data_report = {"sequences": len(data.sequences), "unreadable": data.skipped, "too_long": too_long,
                            "train": len(self.train_data), "val": len(self.val_data)}

        torch.manual_seed(a.seed)
        self.model = self.family.build(self.config, self.tokenizer).to(self.device)
        self.ema = self._frozen_copy(self.model)
        self.optimizer = self._make_optimizer()
        self.step = 0
        if self.ckpt is not None:
            self.model.load_state_dict(self.ckpt.model_weights("raw"))
            self.ema.load_state_dict(self.ckpt.model_weights("ema"))
            if (self.ckpt.path / "optimizer.safetensors").is_file():
                self.optimizer.load_state_dict(self.ckpt.optimizer_state())
            elif self.is_main:  # e.g. weights carried between machines without the optimiser moments
                print(f"imadarem train: warning: {self.ckpt.path} has no optimizer state; resuming with fresh "
                      "optimiser moments (the run will not repeat an uninterrupted one exactly)", file=sys.stderr)
            self.step = self.ckpt.step
        elif init is not None:
            weights = init.model_weights("ema" if any(k.startswith(ckpt_io.EMA_PREFIX) for k in init.weights) else "raw")
            own = self.model.state_dict()
            fresh = self.family.fresh_on_init(self.config)  # a head this run replaces: it starts from scratch
            for name in sorted(set(own) | set(weights)):
                fits = name in own and name in weights and own[name].shape == weights[name].shape
                if not fits and not name.startswith(fresh):
                    shapes = [tuple(w[name].shape) if name in w else "absent" for w in (weights, own)]
                    raise CheckpointError(f"--init-from {a.init_from}: its weights do not fit this run's model "
                                          f"({name}: {shapes[0]} there, {shapes[1]} here)")
            weights = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
            starting = sorted({_module_of(k) for k in own if k not in weights})
            if starting and self.is_main:
                print(f"imadarem train: {', '.join(starting)} start{'s' if len(starting) == 1 else ''} from fresh weights "
                      "(--init-from has none that fit)",
                      file=sys.stderr)
            self.model.load_state_dict(weights, strict=False)
            self.ema.load_state_dict(weights, strict=False)
        self.train_fn = self.family.train_module(self.model)
        self.teacher = self.ema  # what the refine objectives sample their corruptions from (no grad)
        if a.compile:
            self.train_fn = torch.compile(self.train_fn)
            self.teacher = _CompiledTeacher(self.ema) if hasattr(self.ema, "forward_train") else self.ema
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_fn = DDP(self.train_fn, device_ids=ids,
                                find_unused_parameters=self.family.unused_parameters(self.config))
        if self.is_main and not self.resume:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_run_json()

    def _init_checkpoint(self):
        """The checkpoint a new run starts from (``--init-from``): same family; its tokenizer encodes the data,
        so ids mean what the weights learned (a token it lacks drops that record, counted as unreadable)."""
        init = ckpt_io.load_checkpoint(self.args.init_from)
        family = ckpt_io.family_of(init).name
        if family != self.args.family:
            raise CheckpointError(f"--init-from {self.args.init_from} is a {family} model; this run trains "
                                  f"--family {self.args.family}")
        if self.args.tokenizer != "auto" or self.args.tokenizer_file:
            raise ImadaremError("--init-from uses its checkpoint's tokenizer; drop --tokenizer and --tokenizer-file")
        return init

    @staticmethod
    def _frozen_copy(model):
        """The EMA weights: a copy that gets no gradient, in eval mode (what export uses by default)."""
        ema = copy.deepcopy(model)
        ema.eval()
        ema.requires_grad_(False)
        return ema

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """EMA update after an optimiser step; the decay warms up as (1 + s) / (10 + s), so a short run's
        EMA weights are its recent weights, never its initial ones."""
        decay = min(self.family.ema_decay(self.config), (1 + step) / (10 + step))
        # one fused kernel launch per dtype/device group instead of one per tensor (launch-bound small models)
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()], 1.0 - decay)

    def _make_optimizer(self):
        a = self.args
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:  # frozen by the family (e.g. a gate trained on a fixed trunk)
                continue
            (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if a.optimizer == "ranger21":
            try:
                from pytorch_optimizer import Ranger21
            except ImportError:
                raise ImadaremError("--optimizer ranger21 needs pytorch-optimizer: pip install 'imadarem[train]'") from None
            return Ranger21(groups, num_iterations=a.steps, lr=a.lr)
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.98), eps=1e-8, fused=fused)

    def _write_run_json(self) -> None:
        info = {"args": self.args.to_dict(), "family": self.family.name, "config": self.config.to_dict(),
                "tokenizer": tokenizer_to_json(self.tokenizer), "data_sha256": self.data_hash,
                "data": self.data_report, "parameters": self.model.num_parameters(), "world_size": self.world,
                "versions": _versions()}
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=1))

    # -- the loop ------------------------------------------------------------------------------
    def _loss_input(self, rows: np.ndarray, data: np.ndarray, step: int, salt: int, forward, ema) -> LossInput:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_step_seed(self.args.seed, step, salt))
        share = len(rows) // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)
        clean = torch.from_numpy(data[rows[mine]]).to(self.device)
        return LossInput(clean, gen, len(rows), mine, forward, ema, self.special, self.world, self._autocast())

    def train_step(self, step: int, rows: np.ndarray) -> dict[str, float]:
        a = self.args
        torch.manual_seed(_step_seed(a.seed, step, 1))  # dropout: reproducible per step
        self.model.train()
        batch = self._loss_input(rows, self.train_data, step, 2, self.train_fn, self.teacher)
        if a.optimizer == "adamw":
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, a)
        loss, metrics = self.family.loss(self.config, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        self.optimizer.step()
        self.update_ema(step)
        metrics["grad_norm"] = grad_norm.detach()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The EMA weights' loss on the validation rows, with the same noise at every evaluation."""
        if len(self.val_data) == 0:
            return {}
        bs = self.args.batch_size
        totals: dict[str, float] = {}
        forward = self.family.train_module(self.ema)
        world, self.world = self.world, 1  # every rank evaluates the whole validation batch
        try:
            for i in range(self.args.eval_batches):
                rows = np.arange(i * bs, (i + 1) * bs) % len(self.val_data)
                batch = self._loss_input(rows, self.val_data, 10_000_000 + i, 3, forward, self.ema)
                batch.rows, batch.clean = slice(0, bs), torch.from_numpy(self.val_data[rows]).to(self.device)
                _, m = self.family.loss(self.config, batch)
                for k in self.family.shown:
                    totals[k] = totals.get(k, 0.0) + float(m[k])
        finally:
            self.world = world
        return {f"val_{k}": v / self.args.eval_batches for k, v in totals.items()}

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        state = {"family": self.family.name, "config": self.config.to_dict(),
                 "tokenizer": tokenizer_to_json(self.tokenizer),
                 "args": self.args.to_dict(), "data_sha256": self.data_hash, "versions": _versions(),
                 "parameters": self.model.num_parameters()}
        return ckpt_io.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                       keep=self.args.keep_checkpoints, ema=self.ema)

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """On resume, drop log lines past the checkpoint so no step appears twice."""
        log = self.run_dir / "log.jsonl"
        if not (self.is_main and log.is_file()):
            return
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", -1) < self.step]
        log.write_text("".join(ln + "\n" for ln in kept))

    def _all_agree(self, stop: bool) -> bool:
        """Whether any rank wants to stop (a signal, the time limit): under DDP every rank must stop at the
        same step, or the others wait for it forever."""
        if not self.distributed:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _on_signal(self, signum, _frame) -> None:
        self._stop_requested = True

    def close(self) -> None:
        """Tear down the process group this trainer created.

        Leaving it to interpreter exit lets one rank close its gloo sockets while the other still
        holds the group, which occasionally aborts that rank (SIGABRT) after a successful run.
        """
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False

    def run(self) -> dict[str, Any]:
        self.prepare()
        a = self.args
        if self.resume:
            self._trim_log()
        elif self.is_main:  # a fresh run owns the log (a run killed before its first checkpoint left one)
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
        end = a.steps if self.max_new_steps is None else min(a.steps, self.step + self.max_new_steps)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if _main_thread() else {}
        bar = None
        if a.progress and self.is_main and sys.stderr.isatty():  # never bars in a log file
            from tqdm import tqdm

            bar = tqdm(total=a.steps, initial=self.step, desc=f"train {self.family.name}", dynamic_ncols=True)
        last: dict[str, Any] = {}
        interrupted = False
        tokens_seen, t0 = 0.0, time.perf_counter()
        started = self._created
        try:
            for step, rows in iter_batches(len(self.train_data), a.batch_size, a.seed, self.step):
                if step >= end:
                    break
                metrics = self.train_step(step, rows)
                self.step = step + 1
                tokens_seen = tokens_seen + metrics["tokens"]  # on the device: no host sync per step
                evaluated = self.step % a.eval_interval == 0 or self.step == a.steps
                if step % a.log_interval == 0 or evaluated or self.step == end:
                    record = {"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}
                    if evaluated:
                        record.update(self.evaluate(step))
                    elapsed = time.perf_counter() - t0
                    record["seconds"] = round(elapsed, 2)  # since this call started
                    record["tokens_per_s"] = round(float(tokens_seen) / max(elapsed, 1e-9), 1)
                    self._log(record)
                    last = record
                    if bar is not None:
                        bar.set_postfix(**{k: f"{record[k]:.3f}" for k in self.family.shown},
                                        tok_s=f"{record['tokens_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                if self.step % a.checkpoint_interval == 0 and self.step < end:
                    self.save()
                over_time = bool(a.time_limit) and time.perf_counter() - started > a.time_limit
                if self._all_agree(self._stop_requested or over_time):
                    interrupted = self._stop_requested
                    break
        finally:
            if bar is not None:
                bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        path = self.save()
        if self.distributed:
            torch.distributed.barrier()
        return {"step": self.step, "checkpoint": str(path) if path else None, "interrupted": interrupted,
                "last": last, "data": self.data_report}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("imadarem", "selfies", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def train(args: TrainArgs, resume: bool = False, max_new_steps: int | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    trainer = Trainer(args, resume=resume, max_new_steps=max_new_steps, overrides=overrides)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _module_of(weight: str) -> str:
    """The module a weight belongs to, as a user reads it: ``gate_head``, or ``draft.3`` for a list's item."""
    parts = weight.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
