"""One process of a multi-host test run (tests/test_multihost.py).

  GEMSCOPE_COORDINATOR=127.0.0.1:PORT GEMSCOPE_NUM_PROCESSES=2 \
  GEMSCOPE_PROCESS_ID=0 python tests/multihost_worker.py WORKDIR OVERRIDES

Trains `experiments/jumprelu_270m.py:OVERRIDES` in WORKDIR through
`trainer.train` (which starts the distributed runtime from the GEMSCOPE_*
variables). MULTIHOST_STEP_DELAY_S slows every step down so that a test can
kill a process mid-run.

Caveat: MULTIHOST_DUMP_S=N dumps every thread's traceback after N seconds
(for a hang); unset, never.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

from gemscope_jax.training import config as config_lib
from gemscope_jax.parallel import distributed
from gemscope_jax.training import trainer

def main(workdir: str, overrides: str) -> None:
  faulthandler.dump_traceback_later(float(os.environ.get("MULTIHOST_DUMP_S", "0")) or 1e9, exit=False)
  c = config_lib.load(f"experiments/jumprelu_270m.py:{overrides}")
  c.eval.at_end = False
  delay = float(os.environ.get("MULTIHOST_STEP_DELAY_S", "0"))
  if delay:
    global_batch = distributed.global_batch

    def slow(batch, sharding):
      time.sleep(delay)
      return global_batch(batch, sharding)

    distributed.global_batch = slow
  result = trainer.train(c, workdir, progress=False)
  print(f"process {distributed.jax.process_index()} done: step "
        f"{result['step']}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
