"""Latent dashboards: scan a dictionary's latents over text, then render
them as a static site that opens from file:// (no network, no server).

  write_site(out, meta, records)   the site (index + one page per latent)
  show(record_or_site, latent)     one latent as notebook output
  serve(site)                      the site over local HTTP
  scan.scan(config, params, dictionary, windows, tokenizer)
                                   every latent's statistics (ScanResult)
  records.records(result, windows, tokenizer)  (meta, latent records)
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "write_site": "gemscope_jax.dashboards.site",
    "read_site": "gemscope_jax.dashboards.site",
    "read_index": "gemscope_jax.dashboards.site",
    "read_latent": "gemscope_jax.dashboards.site",
    "show": "gemscope_jax.dashboards.notebook",
    "serve": "gemscope_jax.dashboards.server",
    "ScanResult": "gemscope_jax.dashboards.scan",
    "meta_record": "gemscope_jax.dashboards.records",
    "latent_record": "gemscope_jax.dashboards.records",
    "Lens": "gemscope_jax.dashboards.lens",
    "logit_lens": "gemscope_jax.dashboards.lens",
    "neighbours": "gemscope_jax.dashboards.lens",
}, submodules=("notebook", "server", "site"))
