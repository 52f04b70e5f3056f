"""Hookpoint names: parsing, validation, widths and transformers names."""

from __future__ import annotations

import pytest

from gemscope_jax import models
from gemscope_jax.models import hooks


def test_parse_round_trips_and_sorts():
  points = hooks.parse_all(["layer_6/resid_post", "blocks.2.hook_mlp_out",
                            "layer_6/resid_post", "layer_2/attn_out"])
  assert [p.name for p in points] == ["layer_2/attn_out", "layer_2/mlp_out",
                                      "layer_6/resid_post"]
  for p in points:
    assert hooks.parse(p.name) == p


def test_widths_follow_the_config():
  c = models.Gemma3_27B
  assert hooks.parse("layer_0/attn_out").width(c) == 32 * 128
  assert hooks.parse("layer_0/mlp_in").width(c) == 5376


def test_transformers_names_match_design_table():
  assert hooks.parse("layer_3/attn_out").hf_name == (
      "model.layers.3.self_attn.o_proj.input")
  assert hooks.parse("layer_3/mlp_out").hf_name == (
      "model.layers.3.post_feedforward_layernorm.output")
  assert hooks.parse("layer_3/resid_post").hf_name == "model.layers.3.output"


@pytest.mark.parametrize("bad,message", [
    ("layer_x/resid_post", "cannot parse hookpoint"),
    ("layer_1/resid", "unknown hookpoint site 'resid'"),
    ("resid_post", "cannot parse hookpoint"),
])
def test_bad_names_are_explained(bad, message):
  with pytest.raises(ValueError, match=message):
    hooks.parse(bad)


def test_layer_beyond_the_model_is_named():
  with pytest.raises(ValueError, match=r"layer_18/resid_post: gemma3_270m "
                     r"has layers 0\.\.17"):
    hooks.parse_all(["layer_18/resid_post"], models.Gemma3_270M)
