"""A sweep across two processes (jax.distributed, gloo CPU collectives on 127.0.0.1)."""

import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from test_effects import C, H, W, make_logits_fn

from cejax import effects, interventions, masks

WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    import numpy as np
    sys.path.insert(0, "tests")
    from test_effects import H, W, C, make_logits_fn
    from cejax import effects, interventions, masks, sharding
    assert jax.device_count() == 4 and jax.process_count() == 2
    image = jax.random.normal(jax.random.key(1), (H, W, C))
    recipe = masks.rise(jax.random.key(5), num=23, shape=(H, W), cells=3, p=0.5)
    result = effects.causal_effect(make_logits_fn(), image, recipe, batch_size=2,
                                   intervention=interventions.GaussianNoise(num_draws=2),
                                   key=jax.random.key(3), mesh=sharding.mask_mesh())
    np.save(out, np.asarray(result.effects))
    jax.distributed.shutdown()
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(i), str(tmp_path / f"p{i}.npy")],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  image = jax.random.normal(jax.random.key(1), (H, W, C))
  recipe = masks.rise(jax.random.key(5), num=23, shape=(H, W), cells=3, p=0.5)
  single = effects.causal_effect(make_logits_fn(), image, recipe, batch_size=2,
                                 intervention=interventions.GaussianNoise(num_draws=2),
                                 key=jax.random.key(3))
  for i in range(2):
    np.testing.assert_allclose(np.load(tmp_path / f"p{i}.npy"), single.effects,
                               rtol=1e-6, atol=1e-7)
