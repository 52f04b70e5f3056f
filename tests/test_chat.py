"""The Gemma 3 chat format against transformers' `apply_chat_template` with
the official template (tests/data/gemma3_chat_template.jinja, from
google/gemma-3-*-it's tokenizer_config.json), and conversations from JSONL
through windows and a harvest, their template tokens left out."""

from __future__ import annotations

import json
import pathlib
import types

import jax
import numpy as np
import pytest

from gemscope_jax import models
from gemscope_jax.data import harvest as harvest_lib
from gemscope_jax.data import lockstep, pipeline, stream
from gemscope_jax.text import chat, conversations
from gemscope_jax.text.tokenizer import default_tokenizer
from gemscope_jax.text.windows import ordinary_mask
from gemscope_jax.training import plans, schema, sources

TEMPLATE = pathlib.Path(__file__).parent / "data" / "gemma3_chat_template.jinja"

U, A, S = "user", "assistant", "system"


def _m(role, content):
  return {"role": role, "content": content}


def _parts(*texts):
  return [{"type": "text", "text": t} for t in texts]


CONVERSATIONS = {
    "one_user_turn": [_m(U, "What is the capital of France?")],
    "multi_turn": [
        _m(U, "Hi!"), _m(A, "Hello. How can I help?"),
        _m(U, "Name three rivers."), _m(A, "The Seine, the Nile, the Amazon."),
    ],
    "system_string": [
        _m(S, "You are terse."), _m(U, "Explain gravity."),
        _m(A, "Mass attracts mass."), _m(U, "Thanks"),
    ],
    "system_list_and_list_content": [
        _m(S, _parts("  Answer in French. ")),
        _m(U, _parts("  Bonjour ", "\tça va ?\n")),
        _m(A, _parts("Oui, ", " merci.")),
    ],
    "whitespace_to_trim": [
        _m(U, "\n\n   lots of space around   \t\n"), _m(A, "   "),
        _m(U, "  inner    spaces\nand\n\nnewlines stay  "),
    ],
    # The system prompt is not trimmed: its "\n" merges with the template's
    # "\n\n" into one token.
    "system_ending_in_newline": [_m(S, "Be brief.\n"), _m(U, "Hi there")],
    "empty_system_prompt": [_m(S, ""), _m(U, "Hello")],
    "model_role_unicode_and_control_text": [
        _m(U, "Ünïcödé 漢字 😀 and a literal <start_of_turn> in text"),
        _m("model", "d'accord — ok\u2028"),
    ],
    "code": [
        _m(U, "Fix this:\n```python\ndef f(x):\n    return x +\n```"),
        _m(A, "```python\ndef f(x):\n    return x + 1\n```"),
    ],
}

NOT_ALTERNATING = {
    "two_users": [_m(U, "a"), _m(U, "b")],
    "starts_with_assistant": [_m(A, "a"), _m(U, "b")],
    "system_then_assistant": [_m(S, "s"), _m(A, "a")],
    "two_assistants": [_m(U, "a"), _m(A, "b"), _m(A, "c")],
}


@pytest.fixture(scope="module")
def tok():
  return default_tokenizer()


@pytest.fixture(scope="module")
def hf():
  """transformers' apply_chat_template with the official template (the
  tokenizer's vocabulary is irrelevant: only rendering is used)."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<unk>": 0, "<bos>": 1}, unk_token="<unk>"))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>",
      chat_template=TEMPLATE.read_text())


def _content_texts(messages):
  """The content the template writes, in order (system prompt untrimmed)."""
  out = []
  for i, m in enumerate(messages):
    c = m["content"]
    if isinstance(c, str):
      out.append(c if m["role"] == S else c.strip())
    else:
      out.append(c[0]["text"] if m["role"] == S
                 else "".join(p["text"].strip() for p in c))
  return out


# --- the format -------------------------------------------------------------


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_and_ids_match_transformers(tok, hf, name, gen):
  messages = CONVERSATIONS[name]
  theirs = hf.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=gen)
  assert chat.render(messages, add_generation_prompt=gen) == theirs
  ids, mask = chat.encode_chat(tok, messages, add_generation_prompt=gen)
  np.testing.assert_array_equal(ids, tok.encode(theirs, add_bos=False))
  assert ids[0] == tok.bos_id and ids.dtype == np.int32
  assert mask.shape == ids.shape and mask.dtype == bool
  if gen:
    assert [tok.id_to_piece(i) for i in ids[-3:]] == [
        "<start_of_turn>", "model", "\n"]
    assert mask[-3:].all()


@pytest.mark.slow
def test_ids_match_transformers_gemma_tokenizer(tok):
  """Token for token against transformers' own Gemma 3 tokenizer (built
  from the default GGUF, about 17 s) applying the official template."""
  transformers = pytest.importorskip("transformers")
  from gemscope_jax import assets
  path = assets.default_gguf_path()
  hf_tok = transformers.AutoTokenizer.from_pretrained(
      str(path.parent), gguf_file=path.name)
  for name, messages in sorted(CONVERSATIONS.items()):
    for gen in (False, True):
      theirs = hf_tok.apply_chat_template(
          messages, chat_template=TEMPLATE.read_text(), tokenize=True,
          add_generation_prompt=gen)
      if not isinstance(theirs, list):
        theirs = theirs["input_ids"]
      ids, _ = chat.encode_chat(tok, messages, add_generation_prompt=gen)
      assert ids.tolist() == list(theirs), (name, gen)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_template_mask_marks_exactly_the_template(tok, name):
  messages = CONVERSATIONS[name]
  ids, mask = chat.encode_chat(tok, messages)
  pieces = {tok.id_to_piece(i) for i in ids[mask]}
  assert pieces <= {"<bos>", "<start_of_turn>", "<end_of_turn>", "user",
                    "model", "\n", "\n\n", "\n\n\n"}
  content = "".join(_content_texts(messages))
  if name == "system_ending_in_newline":
    # The straddling "\n\n\n" token counts as content.
    content = "Be brief.\n\n\nHi there"
  special = np.isin(ids, list(tok.special_ids))
  # Content tokens decode to the content, except literal control tokens
  # (special, so masked) that sit inside it.
  assert tok.decode(ids[~mask]) == content.replace("<start_of_turn>", "")
  assert (mask | ~special).all() and mask[special].all()
  n_turns = len([m for m in messages if m["role"] != S])
  assert (ids == tok.piece_to_id("<start_of_turn>")).sum() == n_turns + (
      name == "model_role_unicode_and_control_text")


def test_template_mask_by_hand(tok):
  messages = [_m(S, "Be kind."), _m(U, " Hi "), _m(A, "Hello!")]
  ids, mask = chat.encode_chat(tok, messages)
  got = [(tok.id_to_piece(i), bool(k)) for i, k in zip(ids, mask)]
  t, c = True, False
  assert got == [
      ("<bos>", t), ("<start_of_turn>", t), ("user", t), ("\n", t),
      ("Be", c), ("▁kind", c), (".", c), ("\n\n", t), ("Hi", c),
      ("<end_of_turn>", t), ("\n", t),
      ("<start_of_turn>", t), ("model", t), ("\n", t), ("Hello", c),
      ("!", c), ("<end_of_turn>", t), ("\n", t)]


@pytest.mark.parametrize("name", sorted(NOT_ALTERNATING))
def test_roles_that_do_not_alternate_raise_in_both(hf, name):
  messages = NOT_ALTERNATING[name]
  with pytest.raises(Exception, match="must alternate"):
    hf.apply_chat_template(messages, tokenize=False)
  with pytest.raises(ValueError, match="must alternate"):
    chat.render(messages)


@pytest.mark.parametrize("messages,match", [
    ([], "no messages"),
    ([_m(S, "only a system prompt")], "no turns"),
    ([_m(U, "a"), _m(S, "late system")], "may only come first"),
    ([_m("tool", "x")], "unknown role 'tool'"),
    ([{"role": U}], "'role' and 'content'"),
    ([_m(U, [{"type": "image", "url": "x.png"}])], "only 'text' parts"),
    ([_m(U, None)], "string or a list"),
    ([_m(S, _parts("a", "b")), _m(U, "c")], "one content part"),
])
def test_malformed_conversations_raise_clearly(messages, match):
  with pytest.raises(ValueError, match=match):
    chat.render(messages)


def test_stop_ids(tok):
  end, eos = chat.stop_ids(tok)
  assert tok.id_to_piece(end) == "<end_of_turn>" and eos == tok.eos_id
  assert tok.encode("<end_of_turn>", add_bos=False) == [end]


# --- JSONL conversations -> windows -----------------------------------------

SEQ_LEN = 16


def _write_jsonl(path, convs, *, bare=()):
  lines = []
  for i, c in enumerate(convs):
    lines.append(json.dumps(c if i in bare else {"messages": c, "id": i}))
    if i == 0:
      lines.append("   ")  # blank lines are skipped
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


@pytest.fixture
def jsonl_files(tmp_path):
  names = sorted(CONVERSATIONS)
  a = _write_jsonl(tmp_path / "a.jsonl",
                   [CONVERSATIONS[n] for n in names[:4]], bare=(1,))
  b = _write_jsonl(tmp_path / "b.jsonl",
                   [CONVERSATIONS[n] for n in names[4:]])
  return [a, b], [CONVERSATIONS[n] for n in names]


def test_conversation_windows_exclude_exactly_the_template(tok, jsonl_files):
  files, convs = jsonl_files
  windows = conversations.windows_from_conversations(tok, files, SEQ_LEN)
  # Expected: each conversation cut on its own (BOS + seq_len - 1 tokens).
  rows = []
  for c in convs:
    ids, mask = chat.encode_chat(tok, c)
    for s in range(1, len(ids), SEQ_LEN - 1):
      chunk, m = ids[s:s + SEQ_LEN - 1], mask[s:s + SEQ_LEN - 1]
      pad = SEQ_LEN - 1 - len(chunk)
      rows.append((np.r_[tok.bos_id, chunk, np.zeros(pad, np.int32)],
                   np.r_[True, np.ones(len(chunk), bool), np.zeros(pad, bool)],
                   np.r_[True, m, np.zeros(pad, bool)]))
  np.testing.assert_array_equal(windows.tokens, [r[0] for r in rows])
  np.testing.assert_array_equal(windows.mask, [r[1] for r in rows])
  np.testing.assert_array_equal(windows.exclude, [r[2] for r in rows])
  # The first window of every conversation is its own start.
  first = chat.encode_chat(tok, convs[0])[0][:SEQ_LEN]
  np.testing.assert_array_equal(windows.tokens[0], first)
  keep = ordinary_mask(tok, windows.tokens, windows.mask, windows.exclude)
  np.testing.assert_array_equal(keep, windows.mask & ~windows.exclude)
  content = sum(int((~chat.encode_chat(tok, c)[1]).sum()) for c in convs)
  assert keep.sum() == content
  # max_tokens trims the real positions, as windows_from_ids does.
  few = conversations.windows_from_conversations(tok, files, SEQ_LEN, 40)
  assert few.num_tokens == 40
  np.testing.assert_array_equal(few.tokens[:2], windows.tokens[:2])


def test_window_source_batches_carry_exclude(tok, jsonl_files):
  files, _ = jsonl_files
  source = conversations.ConversationWindowSource.from_files(
      tok, files, SEQ_LEN)
  windows = source.windows()
  ds = pipeline.make_window_dataset(source, batch_size=4, seed=0,
                                    shuffle=False)
  batches = list(ds)
  assert len(batches) == -(-len(source) // 4)
  for key in ("tokens", "mask", "exclude"):
    got = np.concatenate([b[key] for b in batches])
    np.testing.assert_array_equal(got[:len(source)], getattr(windows, key))
    assert not got[len(source):].any()  # padding rows


@pytest.mark.parametrize("lines,match", [
    (['{"messages": [{"role": "user", "content": "a"}]}', "{not json"],
     r"bad\.jsonl:2: not valid JSON"),
    (['[{"role": "user", "content": "a"}]', '', '{"turns": []}'],
     r"bad\.jsonl:3: a JSON object needs a 'messages' list"),
    (['"just a string"'], r"bad\.jsonl:1: expected an object"),
    (['[{"role": "user", "content": "a"}]',
      '[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]'],
     r"bad\.jsonl:2: message 1: conversation roles must alternate"),
    (['', '  '], r"bad\.jsonl: the JSONL file holds no conversations"),
])
def test_bad_jsonl_names_file_and_line(tok, tmp_path, lines, match):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=match):
    conversations.windows_from_conversations(tok, [path], SEQ_LEN)


def test_jsonl_that_is_not_utf8_names_the_line(tok, tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(b'["ok"]\n{"messages": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
    list(conversations.read_conversations(path))
  with pytest.raises(FileNotFoundError, match="no such JSONL file"):
    list(conversations.read_conversations(tmp_path / "missing.jsonl"))


def test_config_data_format(tmp_path):
  c = schema.default_config()
  assert c.data.format == "text" and c.eval.format == "text"
  assert conversations.check_format("chat_jsonl", "f") == "chat_jsonl"
  with pytest.raises(ValueError, match="config.data.format: unknown format"):
    conversations.check_format("chat", "config.data.format")
  assert schema.from_json(schema.to_json(c)).data.format == "text"
  c.eval.format = "chat"
  with pytest.raises(ValueError, match="config.eval.format: unknown format"):
    plans.make(c)
  c.eval.format = "text"
  c.data.format = "chat_jsonl"
  with pytest.raises(ValueError, match="config.data.text: data.format "
                     "'chat_jsonl' reads JSONL files"):
    plans.make(c)
  c.data.text = str(tmp_path / "c.jsonl")
  _write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS["multi_turn"]])
  plan = plans.make(c)
  assert plan.data.format == "chat_jsonl" and plan.eval.format == "text"


# --- harvesting conversations -----------------------------------------------

TINY = models.Gemma3Config(
    name="tiny_chat", num_layers=2, d_model=32, mlp_dim=64, num_heads=2,
    num_kv_heads=1, head_dim=16, sliding_window=8)
HOOK = "layer_1/resid_post"


@pytest.fixture(scope="module")
def tiny_params():
  # NumPy draws: jax's init of the full-vocabulary embedding takes ~25 s
  # on a busy 2-core machine.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: models.init_params(TINY, jax.random.key(0)))
  return jax.tree.map(
      lambda s: (rng.normal(0, 0.1, s.shape) * (len(s.shape) > 1)
                 ).astype(s.dtype), shapes)


def test_harvest_leaves_template_tokens_out(tok, jsonl_files, tiny_params,
                                            tmp_path):
  """Through the training path (config data.* -> sources.window_dataset ->
  stream.HarvestSource) and the safetensors dump."""
  files, convs = jsonl_files
  windows = conversations.windows_from_conversations(tok, files, SEQ_LEN)
  n = len(windows.tokens)
  plan = types.SimpleNamespace(data=plans.DataPlan(
      text=",".join(map(str, files)), seq_len=SEQ_LEN, model_batch_size=n,
      bucket_tokens=1, cache_dir="", shuffle_windows=False, num_shards=0,
      seed=0, format="chat_jsonl"))
  ds = sources.window_dataset(plan, tok, progress=False)
  source = stream.HarvestSource(TINY, tiny_params, ds, [HOOK], tok,
                                bucket_tokens=1)
  bucket = source.next_bucket()[HOOK]  # one forward over every window
  full = models.forward(tiny_params, windows.tokens, windows.mask,
                        config=TINY, hookpoints=[HOOK], logits=False)
  acts = np.asarray(full.activations[HOOK], np.float32)
  content = windows.mask & ~windows.exclude
  np.testing.assert_allclose(bucket, acts[content], rtol=1e-5, atol=1e-5)
  assert len(bucket) == sum(int((~chat.encode_chat(tok, c)[1]).sum())
                            for c in convs)

  summary = harvest_lib.dump_activations(
      TINY, tiny_params, tok, windows, [HOOK], tmp_path / "acts.safetensors",
      batch_size=4, progress=False)
  from safetensors.numpy import load_file
  dumped = load_file(tmp_path / "acts.safetensors")
  np.testing.assert_array_equal(dumped["special"],
                                windows.exclude[windows.mask])
  assert summary["special"] == int(windows.exclude.sum())
  np.testing.assert_allclose(dumped[HOOK][~dumped["special"]], acts[content],
                             rtol=1e-5, atol=1e-5)


def test_lockstep_shards_leave_template_tokens_out(tok, tmp_path):
  """Two live data shards harvested together (`data.lockstep`), with a fake
  Gemma whose activations are the token ids: no template id comes out."""
  words = "alpha beta gamma delta epsilon zeta eta theta".split()
  convs = [[_m(U, " ".join(words[i % 8:] + words[:i % 8])),
            _m(A, " ".join(words[::-1][i % 5:]))] for i in range(12)]
  path = _write_jsonl(tmp_path / "c.jsonl", convs)
  source = conversations.ConversationWindowSource.from_files(tok, [path], 12)
  datasets = {s: pipeline.make_window_dataset(
      source, batch_size=2, seed=0, num_epochs=None, shard_index=s,
      shard_count=2) for s in range(2)}
  group = lockstep.LockstepHarvest(TINY, None, datasets, [HOOK], tok,
                                   rows_per_bucket=30, mesh=None)
  group._forward = (  # pylint: disable=protected-access
      lambda t, m: {HOOK: t[..., None].astype(np.float32)})
  template = {tok.piece_to_id(p) for p in ("user", "model", "\n")}
  template |= set(tok.special_ids)
  content = set(np.concatenate(
      [tok.encode(m["content"], add_bos=False) for c in convs for m in c]))
  assert not content & template
  for s in range(2):
    got = set(group.next_bucket(s)[HOOK][:, 0].astype(int))
    assert len(got) > 1 and got <= content


def test_eval_on_conversations_leaves_template_tokens_out(tok, jsonl_files,
                                                         tiny_params):
  """config eval.format=chat_jsonl -> training.heldout.eval_windows ->
  evals.evaluate: the statistics count exactly the conversations' own
  tokens, and the MSE is numpy's over those tokens' activations."""
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel  (only here)
  from gemscope_jax.evals import evaluate as eval_lib  # pylint: disable=import-outside-toplevel  (only here)
  from gemscope_jax.training import heldout  # pylint: disable=import-outside-toplevel  (only here)
  files, convs = jsonl_files
  e = plans.EvalPlan(text=",".join(map(str, files)), num_tokens=100_000,
                     loss_tokens=4 * SEQ_LEN, seq_len=SEQ_LEN, batch_size=4,
                     dense_threshold=0.1, at_end=True, format="chat_jsonl")
  windows = heldout.eval_windows(types.SimpleNamespace(eval=e), tok)
  want = conversations.windows_from_conversations(tok, files, SEQ_LEN)
  np.testing.assert_array_equal(windows.tokens, want.tokens)
  np.testing.assert_array_equal(windows.exclude, want.exclude)
  content = sum(int((~chat.encode_chat(tok, c)[1]).sum()) for c in convs)
  keep = windows.mask & ~windows.exclude
  assert keep.sum() == content < windows.mask.sum()

  rng = np.random.default_rng(1)
  d, s = TINY.d_model, 24
  sae = interop.InferenceDictionary(
      w_enc=rng.normal(0, 0.3, (d, s)), w_dec=rng.normal(0, 0.3, (s, d)),
      b_enc=rng.normal(0, 0.1, s), b_dec=np.zeros(d),
      threshold=np.full(s, 0.05), hookpoint=HOOK)
  module, params, norm_scale = interop.as_module(sae)
  result = eval_lib.evaluate(
      model_config=TINY, model_params=tiny_params, hookpoint=HOOK,
      module=module, params=params, norm_scale=norm_scale, windows=windows,
      tokenizer=tok, batch_size=e.batch_size, progress=False,
      loss_tokens=e.loss_tokens)
  m = result.metrics
  assert m["num_tokens"] == content
  assert m["num_special"] == int(windows.mask.sum()) - content
  acts = np.asarray(models.forward(
      tiny_params, windows.tokens, windows.mask, config=TINY,
      hookpoints=[HOOK], logits=False).activations[HOOK], np.float64)

  def mse(sel):
    x = acts[sel]
    return ((x - np.asarray(sae(x), np.float64)) ** 2).sum(-1).mean()
  np.testing.assert_allclose(m["mse"], mse(keep), rtol=1e-4)
  # What plain text's rule keeps (special ids only out) is another number.
  text_rule = ordinary_mask(tok, windows.tokens, windows.mask)
  assert text_rule.sum() > content
  assert not np.isclose(m["mse"], mse(text_rule), rtol=1e-3)
