"""The boundary with learned_optimization (LO): the one layer that touches LO's internals.

`compat` makes LO 0.0.1 (March 2022) import and run on current JAX, numpy and
flax without TensorFlow; `lo_api` tells LO 0.0.1 from LO GitHub main and
holds every difference between them; `inprocess_courier` and
`tensorboard_writer` are the stand-ins compat puts in place of courier and
TensorFlow's summary writer. Importing this package changes nothing:
`import pathology_fix` calls `apply()` explicitly, before anything imports LO.

Everything `apply()` patches (nothing on disk is modified):

| what                                  | becomes                              | why |
|---------------------------------------|--------------------------------------|-----|
| jax.tree_map                          | jax.tree_util.tree_map               | removed in jax 0.6 |
| jax.tree_multimap                     | jax.tree_util.tree_map               | removed in jax 0.3.16; tree_map takes several trees |
| jax.tree_leaves / tree_flatten / tree_unflatten / tree_structure | jax.tree_util.* | removed in jax 0.6 |
| jax.ShapedArray                       | jax.core.ShapedArray                 | top-level alias removed |
| jax.lib.xla_client.Device             | jax.Device                           | xla_client no longer exposed; LO evaluates it in annotations at import |
| numpy.product                         | numpy.prod                           | removed in numpy 2.0 |
| flax orbax checkpoint default         | flax_use_orbax_checkpointing=False   | LO's checkpoints.load_state opens `params_N` as a file |
| tensorflow, tensorflow.compat.v2, tensorflow_datasets | stand-ins while LO modules execute | imported at module level by summary.py and tasks/datasets; only used inside functions |
| flax.metrics.tensorboard              | `tensorboard_writer` while LO modules execute | needs TF and tensorboard; summaries go through tensorboardX instead |
| courier (dm-launchpad)                | `inprocess_courier`                  | no build for this Python; LO's learner/worker servers then run as threads of one process |
| summary.TensorboardWriter / JaxboardWriter (LO main) | `tensorboard_writer.SummaryWriter` | main writes with `tf.summary` instead of flax's writer |
| setup_experiment turning jax_log_compiles on (LO main) | the previous value restored after it | hundreds of "Compiling ..." warnings per run |
| gin's config-file reader (LO main)    | `lo_api.translate_config` first      | main renamed bindings that 0.0.1 configs use |
| sys.meta_path                         | a finder for `learned_optimization.*` (and courier) | runs LO's modules inside the stand-in scope |
| absl and root logging                 | filters for "Oryx not found", "Tensorflow library not found", gin's include probe | errors logged for things that are not used |

Each entry checks for the name it replaces, so one layer serves LO 0.0.1 and
main. When a real package (tensorflow, courier) is installed it is used.
"""


def apply():
  """Applies the table above; idempotent. Raises ImportError if LO came first."""
  from pathology_fix.lo_boundary import compat  # pylint: disable=g-import-not-at-top
  compat.apply()
  # After compat: telling the API apart imports learned_optimization.
  from pathology_fix.lo_boundary import lo_api  # pylint: disable=g-import-not-at-top
  lo_api.install()
