"""train_gpt.py with checkpoints, for comparisons that share one training run (bench/ablate.py):

    CHECKPOINT_OUT=ck.pt AVERAGE_ALSO=ema:0.99,swa:50 python3 bench/lab.py   # train, save the checkpoint
    FROM_CHECKPOINT=ck.pt EMA_DECAY=0.99 SWA_INTERVAL=0 python3 bench/lab.py   # score it another way

It runs train_gpt.main() with every setting of train_gpt.py, plus three of its own:
- CHECKPOINT_OUT: after training, save the raw final weights, every tracked average, the step count and
  the training stream's position (so that GPTQ calibration reads the tokens the run would have read).
- AVERAGE_ALSO: averagers tracked beside the run's own ("ema:DECAY", "swa:INTERVAL[:START_FRAC]",
  comma-separated); needs CHECKPOINT_OUT.
- FROM_CHECKPOINT: train nothing; run the post-training path (averaging, GPTQ, quantization, scoring)
  on such a checkpoint. Only settings in POST_TRAINING_FIELDS may differ from the training run's.
It installs itself through train_gpt's one hook for the lab, `train_weights`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

LAB_SETTINGS = ("CHECKPOINT_OUT", "AVERAGE_ALSO", "FROM_CHECKPOINT")
# Settings that act only after the timed loop (averaging, GPTQ, quantization, the artifact, evaluation,
# logging): one trained checkpoint serves every value of them.
POST_TRAINING_FIELDS = frozenset((
    "run_id", "train_log_every", "val_loss_every", "eval_seq_len", "eval_stride", "val_batch_size", "val_tokens",
    "swa_interval", "ema_decay", "artifact_path", "artifact_limit_bytes", "eval_only",
    "gptq_calib_tokens", "gptq_reserve_seconds", "clip_search", "quant_bits_mlp",
    "quant_bits_embed", "compressor", "int6_matrices", "gptq_selfgen_seqs", "sdclip_attn",
    "sdclip_mlp", "sdclip_embed", "sdclip_other", "gptq_embed", "quant_gates_int8", "lqer_top", "awq_groups",
    "quant_min_range"))
CHECKPOINT_FORMAT = "train_gpt.py checkpoint 1"


@dataclasses.dataclass(frozen=True)
class Lab:
    checkpoint_out: str = ""
    average_also: str = ""
    from_checkpoint: str = ""


def canonical_averager(spec: str) -> str:
    """'ema:DECAY', 'swa:INTERVAL[:START_FRAC]' (default tg.SWA.START_FRAC) or 'none', in one spelling."""
    kind, _, args = spec.strip().partition(":")
    parts = args.split(":")
    try:
        if kind == "ema" and len(parts) == 1 and 0 < float(parts[0]) < 1:
            return f"ema:{float(parts[0])!r}"
        if kind == "swa" and len(parts) <= 2:
            interval, frac = int(parts[0]), float(parts[1]) if len(parts) == 2 else tg.SWA.START_FRAC
            if interval >= 1 and 0 < frac <= 1:
                return f"swa:{interval}:{frac!r}"
    except ValueError:
        pass
    if spec.strip() == "none":
        return "none"
    raise tg.RunError(f"AVERAGE_ALSO: {spec!r} is not ema:DECAY (0 < DECAY < 1), swa:INTERVAL[:START_FRAC] or none")


def own_averager(h: tg.Hyperparameters) -> str:
    """The name of the averaging whose result a run with these settings quantizes and scores."""
    if h.ema_decay:
        return f"ema:{h.ema_decay!r}"
    return f"swa:{h.swa_interval}:{tg.SWA.START_FRAC!r}" if h.swa_interval else "none"


def averager_names(h: tg.Hyperparameters, average_also: str) -> list[str]:
    """The run's own averager, then AVERAGE_ALSO's, each once."""
    names = [own_averager(h)]
    for spec in filter(str.strip, average_also.split(",")):
        name = canonical_averager(spec)
        if name not in names:
            names.append(name)
    return names


def make_averager(name: str, model: torch.nn.Module):
    kind, *args = name.split(":")
    if kind == "ema":
        return tg.EMA(float(args[0]), model)
    return tg.SWA(int(args[0]), float(args[1])) if kind == "swa" else tg.FinalWeights()


def training_config(h: tg.Hyperparameters) -> dict:
    """Everything that decides the trained weights. GPTQ's reserve shortens a capped loop, so the
    loop's cap is compared too."""
    config = {f.name: getattr(h, f.name) for f in dataclasses.fields(h) if f.name not in POST_TRAINING_FIELDS}
    return {**config, "loop_cap_seconds": h.loop_cap_seconds}


def cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_checkpoint(h, path: Path, base_model, loader, steps: int, train_ms: float, averages: dict, log) -> None:
    """The final weights, every tracked average {name: (weights or None, summary)}, steps, the stream position."""
    checkpoint = dict(format=CHECKPOINT_FORMAT, training_config=training_config(h), steps=steps, train_ms=train_ms,
                      stream=dict(file_index=loader.stream.file_index, pos=loader.stream.pos),
                      recur_active=base_model.recur_active, final_weights=cpu_state(base_model.state_dict()),
                      averages={name: dict(weights=None if w is None else cpu_state(w), summary=summary)
                                for name, (w, summary) in {"none": (None, tg.FinalWeights().summary()),
                                                           **averages}.items()})
    tg.write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
    log(f"checkpoint: wrote {path} with averages {','.join(averages)}")


def load_checkpoint(h: tg.Hyperparameters, path: Path) -> dict:
    """FROM_CHECKPOINT, checked: trained under this training config and tracking this run's averaging."""
    if not path.is_file():
        raise tg.RunError(f"FROM_CHECKPOINT={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise tg.RunError(f"FROM_CHECKPOINT={path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise tg.RunError(f"FROM_CHECKPOINT={path}: not a checkpoint written by CHECKPOINT_OUT")
    trained, here = checkpoint["training_config"], training_config(h)
    for name in sorted(trained.keys() | here.keys()):
        if trained.get(name) != here.get(name):
            what = "the loop's cap (MAX_WALLCLOCK_SECONDS less the GPTQ reserve)" if name == "loop_cap_seconds" \
                else name.upper()
            raise tg.RunError(f"FROM_CHECKPOINT={path}: {what} is {here.get(name)} here, {trained.get(name)} in the "
                              f"checkpoint; only post-training settings may differ")
    if own_averager(h) not in checkpoint["averages"]:
        raise tg.RunError(f"FROM_CHECKPOINT={path}: averaging {own_averager(h)} was not tracked (it has "
                          f"{', '.join(checkpoint['averages'])}); add it to the training run's AVERAGE_ALSO")
    return checkpoint


@dataclasses.dataclass
class Stored:
    """An average read from a checkpoint, in the averager's interface."""
    weights: dict | None
    text: str

    def average(self):
        return self.weights

    def summary(self) -> str:
        return self.text


def lab_hook(lab: Lab, train_weights):
    """train_gpt's train_weights, saving (CHECKPOINT_OUT) or restoring (FROM_CHECKPOINT) a checkpoint."""

    def hooked(h, rt, base_model, make_loader, val):
        if lab.from_checkpoint:  # nothing to train: no optimizers, no DDP, no warm-up
            checkpoint = load_checkpoint(h, Path(lab.from_checkpoint))
            base_model.load_state_dict(checkpoint["final_weights"], strict=True)
            base_model.recur_active = checkpoint["recur_active"]
            loader = make_loader()
            loader.stream.seek(checkpoint["stream"]["file_index"], checkpoint["stream"]["pos"])
            rt.log(f"from_checkpoint: {lab.from_checkpoint} steps:{checkpoint['steps']}; nothing is trained")
            entry = checkpoint["averages"][own_averager(h)]
            return (tg.maybe_compile(h, rt, base_model), loader, checkpoint["steps"], checkpoint["train_ms"],
                    [Stored(entry["weights"], entry["summary"])])
        names = averager_names(h, lab.average_also)
        also = [lambda model, name=name: make_averager(name, model) for name in names[1:]]
        model, loader, steps, train_ms, averagers = train_weights(h, rt, base_model, make_loader, val, also)
        if lab.checkpoint_out and rt.is_main:
            averages = {name: (a.average(), a.summary()) for name, a in zip(names, averagers)}
            save_checkpoint(h, Path(lab.checkpoint_out), base_model, loader, steps, train_ms, averages, rt.log)
        return model, loader, steps, train_ms, averagers

    return hooked


def lab_from_env(env: dict) -> Lab:
    """The lab's three settings (taken out of env, where train_gpt would refuse them as unknown), checked."""
    lab = Lab(**{name.lower(): env.pop(name, "") for name in LAB_SETTINGS})
    if lab.average_also and not lab.checkpoint_out:
        raise tg.RunError("AVERAGE_ALSO is kept only by CHECKPOINT_OUT: set it too")
    if lab.from_checkpoint and (lab.checkpoint_out or env.get("EVAL_ONLY")):
        raise tg.RunError("FROM_CHECKPOINT trains nothing: it cannot be combined with CHECKPOINT_OUT or EVAL_ONLY")
    for spec in filter(str.strip, lab.average_also.split(",")):
        canonical_averager(spec)
    if lab.checkpoint_out:
        tg.check_new_output("CHECKPOINT_OUT", lab.checkpoint_out, 1)
    return lab


def main() -> int:
    try:
        lab = lab_from_env(os.environ)
    except tg.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tg.train_weights = lab_hook(lab, tg.train_weights)
    if lab.checkpoint_out:
        tg.PROGRESS.outputs.append(Path(lab.checkpoint_out))
    return tg.main()


if __name__ == "__main__":
    sys.exit(main())
