"""Train the toy text-to-video model that mpqjax ships as its default model.

  # the shipped model (GPU; --steps auto sizes the run to the time budget and logs the count)
  PYTHONPATH=. python3 benchmarks/train_demo.py --preset gpu --steps auto --time-budget 270 \
      --out $OUT
  # a small run on CPU
  python benchmarks/train_demo.py --preset cpu-tiny --steps 300 --out /tmp/toy

Writes to --out: toyvideo.safetensors + toyvideo.json (EMA weights; rewritten every
--checkpoint-every steps, so a run stopped early still leaves weights), train_demo_<preset>.json
(loss curve, steps, wall time, hardware, command) and train_demo_<preset>.png (loss curve).
Seeded: the same preset, seed and step count give the same run (up to the backend's
floating-point reduction order).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="cpu-tiny", help="gpu | cpu-tiny")
  ap.add_argument("--steps", default="300", help="an integer, or 'auto' (needs --time-budget)")
  ap.add_argument("--time-budget", type=float, default=None,
                  help="seconds: stop after this long (auto: size the run to fit it)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--checkpoint-every", type=int, default=1000)
  ap.add_argument("--log-every", type=int, default=50)
  ap.add_argument("--init", metavar="SAFETENSORS", default=None,
                  help="start from these weights (a toyvideo.safetensors of the same preset) "
                       "instead of the random init; the optimizer starts fresh (with warm-up)")
  ap.add_argument("--plot-stages", nargs="+", metavar="LOG.json", default=None,
                  help="only draw the loss curves of these consecutive runs on one axis into "
                       "--out (a .png path)")
  args = ap.parse_args(argv)
  if args.plot_stages:
    import json

    from mpqjax.toyvideo import train
    logs = [json.load(open(p)) for p in args.plot_stages]
    train.plot_loss_stages(args.out, logs)
    print(f"wrote {args.out}")
    return 0

  import jax

  from mpqjax.toyvideo import train

  cfg = train.preset_config(args.preset)
  init = None
  if args.init:
    from mpqjax.toyvideo.weights import load_params
    init = load_params(args.init)
  t_start = time.perf_counter()
  if args.steps == "auto":
    if not args.time_budget:
      ap.error("--steps auto needs --time-budget")
    # Probe the compiled step's speed on a throwaway run (the real run reuses the compilation).
    probe = 30
    _, plog = train.train(cfg, steps=probe, seed=args.seed, log_every=probe,
                          print_fn=lambda *a: None, init=init)
    per_step = (plog["train_s"] - plog["compile_s"]) / (probe - 1)
    left = args.time_budget - (time.perf_counter() - t_start)
    steps = max(int(0.93 * left / per_step) // 100 * 100, 100)
    print(f"probe: compile {plog['compile_s']:.1f}s, {per_step * 1e3:.2f} ms/step -> "
          f"{steps} steps", flush=True)
  else:
    steps = int(args.steps)
  os.makedirs(args.out, exist_ok=True)
  tag = f"train_demo_{args.preset}"
  command = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))

  def finish_log(log):
    log = dict(log)
    log.update(command=command, steps_chosen=steps, init=args.init, date=datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"),
        params=int(sum(x.size for x in jax.tree.leaves(state_holder["params"]))))
    return log

  state_holder = {}

  def on_checkpoint(state, log):
    state_holder["params"] = state.ema
    full = finish_log(log)
    train.save_model(args.out, state.ema, cfg, full)
    train.save_log(os.path.join(args.out, tag + ".json"), full)
    train.plot_loss(os.path.join(args.out, tag + ".png"), full)
    print(f"checkpoint at step {state.step} -> {args.out}", flush=True)

  limit = None if args.time_budget is None else args.time_budget - (time.perf_counter() - t_start)
  state, log = train.train(cfg, steps=steps, seed=args.seed, log_every=args.log_every,
                           checkpoint_every=args.checkpoint_every, on_checkpoint=on_checkpoint,
                           time_limit_s=limit, print_fn=lambda s: print(s, flush=True),
                           init=init)
  print(f"done: {log['steps_done']} steps in {log['train_s']:.1f}s, final loss "
        f"{log['loss'][-1]:.4f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
