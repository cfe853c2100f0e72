"""Import one of Google's published SimCLR models (TF2 SavedModel or checkpoint) into a workdir.

  python -m simclr_jax.main --config=configs/import_official.py:r50_1x_sk1 \\
      --config.imported.source=gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk1/saved_model \\
      --workdir=runs/r50_1x_sk1

The part after the colon names the architecture (ARCHITECTURES: the SimCLRv2 models of the
official README's table and the SimCLRv1 ResNet-50s). The written workdir is an ordinary
pretraining workdir (config.json: the ImageNet recipe with that architecture, in float32 as the
published outputs were computed; a checkpoint at step 0 with encoder, projection head and
supervised head), so linear evaluation, fine-tuning, extract and export run on it unchanged.
`import.json` records the source and, for a SavedModel, the self-check's measured errors.
"""
import ml_collections

from configs import imagenet

# name -> (depth, width multiplier, sk_ratio, projection head in the release). The SimCLRv2
# README table: R50/101/152 at 1x/2x with and without SK, and R152-3x with SK; official
# tf2/run.py's flag help: "If it is bigger than 0, it will enable SK. Recommendation: 0.0625."
# The SimCLRv1 releases hold "base network with linear classifier layer" only (tf2/README.md:
# "for these SimCLRv1 checkpoints, the projection head is not available").
ARCHITECTURES = {
    **{f'r{d}_{w}x_sk{sk}': (d, float(w), 0.0625 * sk, True)
       for d in (50, 101, 152) for w in (1, 2) for sk in (0, 1)},
    'r152_3x_sk1': (152, 3.0, 0.0625, True),
    **{f'v1_r50_{w}x': (50, float(w), 0.0, False) for w in (1, 2, 4)},
}


def get_config(architecture: str = 'r50_1x_sk0') -> ml_collections.ConfigDict:
  """The import config for one published architecture (a key of ARCHITECTURES)."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f'configs/import_official.py:{architecture} is not a published SimCLR '
                     f'architecture; choose one of {sorted(ARCHITECTURES)}.')
  depth, width, sk_ratio, projection_head = ARCHITECTURES[architecture]
  c = imagenet.get_config()  # the recipe the published models were pretrained with
  c.job = 'import_official'
  c.cpu_devices = 1  # nothing runs data-parallel here
  c.model.depth, c.model.width, c.model.cifar_stem = depth, width, False
  c.model.sk_ratio, c.model.se_ratio = sk_ratio, 0.0
  c.model.dtype = 'float32'  # the published outputs are float32; bfloat16 would not match them
  c.imported = ml_collections.ConfigDict()
  c.imported.architecture = architecture
  # A SavedModel directory (holding saved_model.pb), a checkpoint directory (the newest
  # checkpoint in it) or a checkpoint prefix (DIR/ckpt-N); local or gs://.
  c.imported.source = ml_collections.config_dict.placeholder(str)
  # False: the release has no projection head; the workdir's is initialised at random
  # (config.seed) and only h is the published network.
  c.imported.projection_head = projection_head
  # The SavedModel self-check: its signature and the imported model on the same seeded
  # images; the job refuses (writing nothing) when a relative error exceeds check_rtol.
  c.imported.check_images = 4
  c.imported.check_rtol = 1e-4
  return c
